"""``python -m adaprune``: the command line (see :mod:`adaprune.cli`)."""

from .cli.app import app

app(prog_name="adaprune")
