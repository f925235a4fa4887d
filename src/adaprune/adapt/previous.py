"""The plan of a previous run, wherever it was kept (for ``adapt(warm_start=)``, ``adaprune.check`` and ``diff``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import fs
from ..errors import ArgumentTypeError, ConfigError, shown
from ..plan import Plan
from .controller import as_plan
from .state import ControllerState


def plan_of(previous: Any, what: str = "warm_start") -> Plan:
    """The plan of ``previous``: a :class:`Plan`, a result with a ``plan`` (``AdaptResult``,
    ``PruneResult``), a run directory (``state.json``), a directory written by :func:`adaprune.save`
    (``plan.json``) or a plan's JSON file."""
    if isinstance(previous, Plan):
        return previous
    found = getattr(previous, "plan", None)
    if isinstance(found, Plan):
        return found
    if not isinstance(previous, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{what}: expected an AdaptResult, a Plan, a run directory, a saved model directory or a plan JSON "
            f"file, got {type(previous).__name__}")
    path = Path(previous)
    kind = fs.kind(path, what=what, error=ConfigError)
    if kind is None:
        raise ConfigError(f"{what}: {shown(str(path), 200)} does not exist")
    if kind == "file":
        return Plan.from_json(fs.read_text(path, what=f"{what} plan"))
    if (path / "state.json").is_file():
        state = ControllerState.from_json(fs.read_text(path / "state.json", what="state.json"),
                                          what=str(path / "state.json"))
        return as_plan(state.removals, state.sizes)
    from ..io import META, read_plan

    if (path / META).is_file():
        return read_plan(path)
    raise ConfigError(
        f"{what}: {shown(str(path), 200)} holds neither a run's state.json nor a saved model's {META}; pass the "
        "run directory of an adapt run, a directory written by adaprune.save, or a plan JSON file")


__all__ = ["plan_of"]
