"""The controller's bookkeeping: removals folded across steps (relative to the original model), a run's
removals replayed on a copy of the original, and the checks that a model's weights and a task's numbers
are finite numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PlanError, RunDirError, shown
from ..plan import Plan
from ..surgery.remove import remove
from ..task import Criterion
from .noise import check_examples
from .state import ControllerState


def compose(removals: dict[str, dict[str, list[int]]], shapes: dict[str, tuple[int, ...]], plan: Plan) -> None:
    """Fold a step's plan (indices of the current model) into removals relative to the original."""
    for tensor, dims in plan.removals.items():
        for d, idx in dims.items():
            done = set(removals.get(tensor, {}).get(str(d), []))
            kept = [i for i in range(shapes[tensor][d]) if i not in done]
            done.update(kept[i] for i in idx)
            removals.setdefault(tensor, {})[str(d)] = sorted(done)


def as_plan(removals: dict[str, dict[str, list[int]]], sizes: dict[str, dict[str, int]] | None = None) -> Plan:
    """The run's removals (relative to the original model) as a :class:`Plan`, with the original sizes of
    the dims it cuts when known (``state.sizes``)."""
    return Plan({t: {int(d): tuple(i) for d, i in dims.items()} for t, dims in removals.items()}, (),
                {t: {int(d): n for d, n in dims.items()} for t, dims in (sizes or {}).items()})


def replay(model: nn.Module, state: ControllerState, where: str) -> None:
    """Cut ``model`` (a copy of the original) as the run's removals say; removals that do not fit it are a
    damaged or foreign ``state.json``, refused with the model unchanged."""
    try:
        remove(model, as_plan(state.removals, state.sizes))
    except PlanError as exc:
        raise RunDirError(
            f"cannot resume {where}: state.json's removals do not fit the model ({shown(str(exc), 160)})"
        ) from None


def same_weights(work: nn.Module, snapshot: nn.Module, plan: Plan) -> bool:
    """Whether ``work`` is ``snapshot`` with ``plan`` removed and nothing else changed (``snapshot`` is cut)."""
    remove(snapshot, plan)
    mine, theirs = work.state_dict(), snapshot.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)


def non_finite_weights(model: nn.Module) -> str:
    """Which parameter or floating-point buffer of ``model`` holds NaN or inf values, and how many
    (the first one found, e.g. ``"'fc.weight' (3 NaN, 0 inf of 80)"``); ``""`` when all are finite."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            return f"{name!r} ({nan} NaN, {inf} inf of {t.numel()})"
    return ""


def non_finite_metrics(metrics: dict[str, float]) -> str:
    """The metrics that are NaN or inf, e.g. ``"'loss' = nan"``; ``""`` when all are finite."""
    return ", ".join(f"{k!r} = {v}" for k, v in metrics.items() if not math.isfinite(v))


def as_number(key: str, value: Any) -> float:
    """One value of ``task.evaluate``'s dict as a float (a Python or NumPy number, a one-element tensor)."""
    if not isinstance(value, (bool, str, bytes)) and hasattr(type(value), "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ConfigError(
        f"task.evaluate returned {key!r}: {shown(value)} ({type(value).__name__}), which is not a number; "
        "every value of its dict must be a number (a float, an int or a one-element tensor)"
    )


def checked(out: Any, metric: str) -> dict[str, float]:
    """What ``task.evaluate`` returned, as metric name -> float; it must hold the task's ``metric``."""
    if not isinstance(out, Mapping):
        raise ConfigError(
            f"task.evaluate returned {shown(out)} ({type(out).__name__}); it must return a dict of "
            f"metric name -> number that includes the task's metric {metric!r}"
        )
    if metric not in out:
        raise ConfigError(f"task.evaluate returned {shown(sorted(map(str, out)))}, without the task's metric {metric!r}")
    return {str(k): as_number(str(k), v) for k, v in out.items()}


def examine(raw: tuple[Any, Mapping[str, Any]], metric: str, criteria: list[Criterion],
            counts: Mapping[str, int]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """What ``task.evaluate_criteria`` returned, checked: the metrics (:func:`checked`) and, per criterion,
    its per-example values checked against its metric and the original model's example count (``counts``,
    absent before the original is measured); left out when the task gave none or the metric is not finite."""
    out, found = raw
    metrics = checked(out, metric)
    values: dict[str, torch.Tensor] = {}
    for c in criteria:
        if c.metric not in metrics:
            raise ConfigError(f"task.evaluate returned no {c.metric!r} (the metric of task {c.name!r}); "
                              f"it returned {shown(sorted(metrics), 60)}")
        value, given = metrics[c.metric], found.get(c.name)
        if given is None or not math.isfinite(value):
            continue
        kept = check_examples(given, value, c.metric, counts.get(c.name))
        if kept is not None:
            values[c.name] = kept
    return metrics, values


__all__ = ["as_number", "as_plan", "checked", "compose", "examine", "non_finite_metrics", "non_finite_weights", "replay", "same_weights"]
