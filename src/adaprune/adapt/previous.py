"""The plan of a previous run, wherever it was kept (for ``adapt(warm_start=)``, ``adaprune.check`` and ``diff``)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .. import fs
from ..errors import ArgumentTypeError, ConfigError, shown
from ..plan import Plan
from .bookkeeping import as_plan
from .state import ControllerState


class UnfinishedRunWarning(UserWarning):
    """The run directory a plan is read from holds a run that did not finish (killed, still running, or
    ended by ``time_limit`` / ``max_evaluations``): its plan is that of the last accepted step."""


def plan_of(previous: Any, what: str = "warm_start") -> Plan:
    """The plan of ``previous``: a :class:`Plan`, a result with a ``plan`` (``AdaptResult``,
    ``PruneResult``), a run directory (``state.json``; a run that did not finish gives the plan of its last
    accepted step, with an :class:`UnfinishedRunWarning`), a directory written by :func:`adaprune.save`
    (``plan.json``) or a plan's JSON file. Errors name ``what`` (the argument it came from)."""
    from ..errors import AdapruneError

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
    try:
        return _read(path, kind, what)
    except AdapruneError as exc:
        if str(exc).startswith(f"{what}:"):
            raise
        raise type(exc)(f"{what}: {exc}") from None


def _read(path: Path, kind: str, what: str) -> Plan:
    from ..io import META, PLAN, read_plan

    if kind == "file" and path.name in ("state.json", META):  # a run's state or a save's metadata: its directory
        return _read(path.parent, "dir", what)
    if kind == "file":
        text = fs.read_text(path, what=f"{what} plan")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or "removals" not in data:
            raise ConfigError(f"{shown(str(path), 200)} is not a plan JSON file (a plan has 'removals'); pass the "
                              f"{PLAN} of a saved model, the directory itself, or a run directory")
        return Plan.from_dict(data)
    if (path / "state.json").is_file():
        state = ControllerState.from_json(fs.read_text(path / "state.json", what="state.json"),
                                          what=str(path / "state.json"))
        if not state.done or state.stopped:
            why = (f"it was stopped ({state.stopped})" if state.stopped else
                   f"it is not finished (killed or still running, after step {state.step})")
            warnings.warn(f"{what}: {path} holds an adapt run that did not finish: {why}; its plan is that of the "
                          "last accepted step", UnfinishedRunWarning, stacklevel=4)
        return as_plan(state.removals, state.sizes)
    if (path / META).is_file():
        return read_plan(path)
    raise ConfigError(
        f"{shown(str(path), 200)} holds neither a run's state.json nor a saved model's {META}; pass the run directory "
        "of an adapt run, a directory written by adaprune.save, or a plan JSON file")


__all__ = ["UnfinishedRunWarning", "plan_of"]
