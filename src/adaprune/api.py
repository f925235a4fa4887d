"""The static entry point: ``prune`` (one shot, preset ratio) and its result."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .allocate import get_allocator
from .cost import Cost, count
from .errors import ConfigError
from .graph import Frozen, Graph, call_model, trace
from .importance import get_importance
from .plan import GroupCut, Plan
from .surgery import remove
from .surgery.remove import output_shapes


@dataclass
class PruneResult:
    """What :func:`prune` did: the (same, now smaller) model, the plan, costs before and after."""

    model: nn.Module
    plan: Plan
    before: Cost
    after: Cost
    graph: Graph
    frozen: list[Frozen] = field(default_factory=list)

    def summary(self) -> str:
        r = self.after.ratio_to(self.before)
        return (
            f"MACs {self.before.macs:,} -> {self.after.macs:,} ({r['macs']:.1%}), "
            f"params {self.before.params:,} -> {self.after.params:,} ({r['params']:.1%})"
        )


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ConfigError(f"ratio must be a number in [0, 1), got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(
            f"ratio={ratio} is outside [0, 1): ratio is the fraction of channels removed from each "
            "group (0.5 removes half); use a value such as 0.3"
        )
    return float(ratio)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def plan_for(
    model: nn.Module,
    graph: Graph,
    *,
    ratio: float,
    importance: Any = "l2",
    allocation: Any = "uniform",
    min_channels: int = 1,
    round_to: int = 1,
) -> Plan:
    """Score every group, let the allocator choose, and turn the choice into a :class:`Plan`."""
    criterion = get_importance(importance)
    allocator = get_allocator(allocation)
    scores = {g.name: criterion(model, g) for g in graph.groups}
    chosen = allocator(graph.groups, scores, ratio=ratio, min_channels=min_channels, round_to=round_to)
    removals: dict[str, dict[int, list[int]]] = {}
    cuts = []
    for g in graph.groups:
        channels = chosen.get(g.name, [])
        cuts.append(GroupCut(g.name, g.size, tuple(channels)))
        if not channels:
            continue
        for tensor, dims in g.removals(channels).items():
            for d, pos in dims.items():
                removals.setdefault(tensor, {}).setdefault(d, []).extend(pos)
    frozen = {t: {d: tuple(sorted(set(p))) for d, p in dims.items()} for t, dims in removals.items()}
    return Plan(frozen, tuple(cuts))


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float = 0.5,
    importance: Any = "l2",
    allocation: Any = "uniform",
    ignore: Iterable[nn.Module | str] | None = None,
    min_channels: int = 1,
    round_to: int = 1,
) -> PruneResult:
    """Prune ``model`` in place, once, at a preset ratio: the static baseline.

    Args:
        model: the model to prune; it is changed in place (and left exactly as it was on error).
        example_inputs: inputs ``model`` runs on (tensor, tuple of args, or dict of kwargs).
        ratio: fraction of channels removed from each prunable group, in [0, 1).
        importance: a registered criterion name (``"l2"``, ``"l1"``, ``"random"``) or a callable
            ``(model, group) -> scores``.
        allocation: a registered allocator name (``"uniform"``) or a callable.
        ignore: modules (or names) whose output width must not change, e.g. ``[model.fc]``.
        min_channels: channels every group keeps at least.
        round_to: kept widths are rounded up to a multiple of this (hardware-friendly sizes).

    Returns:
        A :class:`PruneResult` with the plan and the costs before and after.
    """
    ratio = _check_ratio(ratio)
    _check_int("min_channels", min_channels, 1)
    _check_int("round_to", round_to, 1)
    get_importance(importance)  # fail on a bad name before doing any work
    get_allocator(allocation)
    before = count(model, example_inputs)
    graph = trace(model, example_inputs, ignore=ignore)
    plan = plan_for(
        model, graph, ratio=ratio, importance=importance, allocation=allocation,
        min_channels=min_channels, round_to=round_to,
    )
    expected = _expected_shapes(model, example_inputs)
    remove(model, plan, check=lambda: _eval_call(model, example_inputs), expected_shapes=expected)
    after = count(model, example_inputs)
    return PruneResult(model, plan, before, after, graph, list(graph.frozen))


def _eval_call(model: nn.Module, example_inputs: Any) -> Any:
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    finally:
        for m, flag in was_training.items():
            m.training = flag


def _expected_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    return output_shapes(_eval_call(model, example_inputs))


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Any = None) -> nn.Module:
    """Replay ``plan`` on ``model`` (e.g. a fresh copy): physical removal, checked when inputs are given."""
    if example_inputs is None:
        remove(model, plan)
    else:
        expected = _expected_shapes(model, example_inputs)
        remove(model, plan, check=lambda: _eval_call(model, example_inputs), expected_shapes=expected)
    return model
