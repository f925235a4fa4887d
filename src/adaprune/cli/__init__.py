"""The ``adaprune`` command line: ``adaprune demo | adapt | sensitivity | report | export | zoo``.

The entry point is :data:`app` (a Typer application); ``python -m adaprune`` runs it too.
"""

from __future__ import annotations

from .app import app
from .config import CliError, RunConfig, load_config

__all__ = ["CliError", "RunConfig", "app", "load_config", "main"]


def main() -> None:
    """Run the command line (what the ``adaprune`` script does)."""
    app()
