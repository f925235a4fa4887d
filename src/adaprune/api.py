"""The static entry point: ``prune`` (one shot, preset ratio or budget) and its result."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._check import as_bool, as_float, check_inputs, check_instance, check_module, check_ratio
from .allocate import Limits, get_allocator, search_budget
from .cost import Cost, count_with_output, counted_call
from .cost.budget import Budget
from .cost.predict import CostPredictor
from .cost.registry import COSTS
from .errors import ConfigError
from .graph import Grouped, check_grouped, ignore_items, resolve_ignore, trace
from .importance import Context, default_loss, get_importance
from .planner import check_selection, choose
from .result import PruneResult
from .surgery import Reconstruction, reconstruct
from .surgery.check import find_broken
from .surgery.remove import output_shapes, removal


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float | None = None,
    budget: Budget | None = None,
    importance: Any = "l2",
    allocation: Any = "uniform",
    ignore: Iterable[nn.Module | str] | None = None,
    calibration: Iterable[tuple[Any, Any]] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    max_ratio: float = 1.0,
    min_channels: int = 1,
    round_to: int = 1,
    refit: bool = False,
    grouped: Grouped = "inside",
) -> PruneResult:
    """Prune ``model`` in place, once: the static baseline.

    Args:
        model: the model to prune; it is changed in place (and left exactly as it was on error).
        example_inputs: inputs ``model`` runs on (tensor, tuple of args, or dict of kwargs).
        ratio: fraction of channels removed from each prunable group, in [0, 1) (default 0.5 when
            no budget is given). For ``global``/``lamp`` allocation: the fraction of all channels.
        budget: instead of a ratio, a :class:`Budget` (e.g. ``Budget(macs=0.5)``); the least
            pruning whose exact cost meets it is found by bisection on the allocator's ratio.
        importance: criterion name (``l2``, ``l1``, ``lamp``, ``fpgm``, ``bn_scale``, ``taylor``,
            ``activation``, ``apoz``, ``wanda``, ``random``) or a callable.
        allocation: ``uniform``, ``global`` or ``lamp`` (or a callable allocator).
        ignore: modules (or names) whose output width must not change, e.g. ``[model.fc]``.
        calibration: ``(inputs, targets)`` batches for data-driven criteria.
        loss: ``loss(output, targets)`` for ``taylor`` (default: cross-entropy on the logits).
        max_ratio: the largest fraction of any group that may be removed.
        min_channels: channels every group keeps at least.
        round_to: kept widths are rounded up to a multiple of this (hardware-friendly sizes).
        refit: after removal, refit the layers that lost inputs to the original outputs on the
            ``calibration`` batches (:func:`adaprune.surgery.reconstruct`); keeps a copy of the model
            while it runs. The report is ``result.reconstruction``.
        grouped: grouped convolutions lose the same positions ``"inside"`` every group (default,
            ``groups`` kept) or ``"whole"`` groups (see :func:`adaprune.trace`).
    """
    check_module(model)
    check_inputs(example_inputs)
    if ratio is not None:
        ratio = as_float(ratio, "ratio", low=0.0, high=1.0, high_open=True,
                         hint="the fraction of channels removed from each group, e.g. 0.3")
    if budget is not None:
        check_instance(budget, Budget, "budget", "an adaprune.Budget", "e.g. budget=adaprune.Budget(macs=0.5)")
    check_selection(model, importance=importance, allocation=allocation, calibration=calibration, loss=loss,
                    max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)
    ignore = ignore_items(ignore)  # a generator is read once, here
    resolve_ignore(model, ignore)
    refit = as_bool(refit, "refit")
    grouped = check_grouped(grouped)
    if refit and calibration is None:
        raise ConfigError("refit=True needs calibration= batches: the layers are refit on their outputs there")
    if ratio is not None and budget is not None:
        raise ConfigError("pass ratio= or budget=, not both: a budget chooses the ratio itself")
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigError(f"budget must be an adaprune.Budget, got {type(budget).__name__}")
    if budget is not None:
        budget.refuse_disk("prune")
    if budget is not None and budget.needs_latency:
        raise ConfigError(
            "prune() is one-shot and does not measure latency: use adaprune.adapt(...) for a latency "
            f"budget, or bound {'/'.join(f'{e.name}=' for e in COSTS.static())} here"
        )
    ratio = check_ratio(0.5 if ratio is None and budget is None else (0.0 if ratio is None else ratio))
    limits = Limits(max_ratio=max_ratio, min_channels=min_channels, round_to=round_to)
    criterion = get_importance(importance)
    get_allocator(allocation)
    ctx = Context(calibration, loss or default_loss)
    if calibration is not None:
        ctx.calibration = ctx.batches(str(importance))
    before, output = count_with_output(model, example_inputs)
    expected = output_shapes(output)
    del output
    original = copy.deepcopy(model) if refit else None
    graph = trace(model, example_inputs, ignore=ignore, grouped=grouped)
    scores = criterion(model, graph.groups, ctx)
    finished: list[tuple[Reconstruction | None, Cost]] = []
    counts: list[Cost] = []

    def check() -> Any:  # the check after surgery counts the cut model too: it runs once
        cost, out = counted_call(model, example_inputs)
        counts.append(cost)
        return out

    def finish() -> None:  # on the cut model, inside the removal's transaction: a failure restores the model
        report = None
        if original is not None and calibration is not None:
            report = reconstruct(model, original, ctx.calibration or calibration, plan.removals)
        finished.append((report, before if plan.is_empty else counts[-1]))  # an empty plan runs no check

    if budget is None:
        plan = choose(graph, scores, allocation, limits, ratio)
        broken = find_broken(model, plan, graph, example_inputs, True, expected, finish, check)
        if broken:  # the whole plan failed the check: without the groups that broke it
            plan = choose(graph.without({f.module for f in broken}), scores, allocation, limits, ratio)
            with removal(model, plan, check, expected):
                finish()
    else:
        hi = choose(graph, scores, allocation, limits, 1.0 - 1e-9)
        broken = find_broken(model, hi, graph, example_inputs, expected=expected, run=check)
        usable = graph.without({f.module for f in broken})
        predictor = CostPredictor(model, example_inputs)
        ratio, plan = search_budget(
            lambda r: choose(usable, scores, allocation, limits, r), predictor, budget, before
        )
        with removal(model, plan, check, expected):
            finish()
    report, after = finished[-1]
    return PruneResult(model, plan, before, after, graph, list(graph.frozen) + broken, ratio, report)
