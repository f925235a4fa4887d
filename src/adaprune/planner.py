"""From scores to a plan: the argument checks ``prune`` and ``plan_for`` share, ``choose`` (an allocator's
choice as a :class:`~adaprune.plan.Plan`) and ``plan_for`` (the plan ``prune`` would apply, nothing changed)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._check import (
    a_type,
    as_float,
    check_batches,
    check_callable,
    check_instance,
    check_module,
    check_name,
    check_ratio,
    given,
)
from .allocate import ALLOCATORS, Limits, get_allocator
from .errors import ArgumentTypeError
from .graph import Graph
from .importance import Context, default_loss, get_importance
from .plan import Plan, plan_from_choice


def check_selection(
    model: nn.Module,
    *,
    importance: Any,
    allocation: Any,
    calibration: Any,
    loss: Any,
    max_ratio: Any,
    min_channels: Any,
    round_to: Any,
) -> None:
    """The arguments :func:`~adaprune.prune` and ``plan_for`` share: how channels are scored and chosen."""
    get_importance(importance)  # a wrong type or an unknown name raises
    if isinstance(allocation, str):
        check_name(allocation, ALLOCATORS.names(), "allocation", "allocator")
    elif not callable(allocation):
        raise ArgumentTypeError(
            f"{given('allocation', allocation)} is {a_type(allocation)}; expected an allocator name "
            f"({', '.join(ALLOCATORS.names())}) or a callable"
        )
    if calibration is not None:
        check_batches(calibration, "calibration")
    if loss is not None:
        check_callable(loss, "loss", "a callable loss(output, targets) -> scalar tensor")
    Limits(max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)


def choose(
    graph: Graph,
    scores: dict[str, torch.Tensor],
    allocation: Any,
    limits: Limits,
    ratio: float,
) -> Plan:
    """Let the allocator choose at ``ratio`` and turn the choice into a :class:`Plan`."""
    return plan_from_choice(graph, get_allocator(allocation)(graph.groups, scores, limits, ratio=ratio))


def plan_for(
    model: nn.Module,
    graph: Graph,
    *,
    ratio: float,
    importance: Any = "l2",
    allocation: Any = "uniform",
    calibration: Iterable[tuple[Any, Any]] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    max_ratio: float = 1.0,
    min_channels: int = 1,
    round_to: int = 1,
) -> Plan:
    """The plan :func:`prune` would apply at ``ratio`` on an already traced model (nothing is changed)."""
    check_module(model)
    check_instance(graph, Graph, "graph", "an adaprune.Graph", "trace the model first: graph = ap.trace(model, x)")
    ratio = as_float(ratio, "ratio", low=0.0, high=1.0, high_open=True,
                     hint="the fraction of channels removed from each group, e.g. 0.3")
    check_selection(model, importance=importance, allocation=allocation, calibration=calibration, loss=loss,
                    max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)
    scores = get_importance(importance)(model, graph.groups, Context(calibration, loss or default_loss))
    limits = Limits(max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)
    return choose(graph, scores, allocation, limits, check_ratio(ratio))
