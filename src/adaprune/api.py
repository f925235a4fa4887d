"""The static entry point: ``prune`` (one shot, preset ratio or budget) and its result."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._check import as_bool, as_float, check_inputs, check_instance, check_module, check_plan, check_selection
from .allocate import Limits, get_allocator
from .allocate.search import bisect
from .cost import Cost, count, count_with_output
from .cost.budget import Budget, static_values
from .cost.predict import CostPredictor
from .errors import ArgumentTypeError, BudgetUnreachableError, ConfigError, SurgeryError, TraceError, shown
from .graph import Frozen, Graph, call_model, ignore_items, resolve_ignore, trace
from .importance import Context, default_loss, get_importance
from .plan import GroupCut, Plan
from .surgery import Reconstruction, reconstruct, remove
from .surgery.remove import output_shapes, removal


@dataclass
class PruneResult:
    """What :func:`prune` did: the (same, now smaller) model, the plan, costs before and after.

    When the plan removes nothing, :attr:`reason` says why (also in :meth:`summary`).
    """

    model: nn.Module
    plan: Plan
    before: Cost
    after: Cost
    graph: Graph
    frozen: list[Frozen] = field(default_factory=list)
    ratio: float = 0.0
    reconstruction: Reconstruction | None = None

    @property
    def reason(self) -> str:
        """Why nothing was pruned ("" when something was): every channel pinned by the model's output,
        by ``ignore``, by ops the graph does not understand (named) or by sizes fixed in the code; every
        group broken by the check after surgery; or the limits (ratio, max_ratio, min_channels, round_to)."""
        from .graph.reasons import nothing_removed_reason

        if not self.plan.is_empty:
            return ""
        return nothing_removed_reason(self.graph, self.frozen, self.ratio)

    def summary(self) -> str:
        r = self.after.ratio_to(self.before)
        text = (
            f"MACs {self.before.macs:,} -> {self.after.macs:,} ({r['macs']:.1%}), "
            f"params {self.before.params:,} -> {self.after.params:,} ({r['params']:.1%})"
        )
        return f"{text}; nothing was pruned: {self.reason}" if self.plan.is_empty else text


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ArgumentTypeError(f"{name} must be a number in [0, 1), got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(
            f"{name}={shown(ratio)} is outside [0, 1): {name} is the fraction of channels removed from each "
            "group (0.5 removes half); use a value such as 0.3"
        )
    return float(ratio)


def plan_from_choice(graph: Graph, chosen: dict[str, list[int]]) -> Plan:
    """The :class:`Plan` removing ``chosen[group name]`` channels of each group."""
    removals: dict[str, dict[int, set[int]]] = {}
    cuts = []
    for g in graph.groups:
        channels = chosen.get(g.name, [])
        cuts.append(GroupCut(g.name, g.size, tuple(channels)))
        if channels:
            for tensor, dims in g.removals(channels).items():
                for d, pos in dims.items():
                    removals.setdefault(tensor, {}).setdefault(d, set()).update(pos)
    frozen = {t: {d: tuple(sorted(p)) for d, p in dims.items()} for t, dims in removals.items()}
    return Plan(frozen, tuple(cuts))


def choose(
    graph: Graph,
    scores: dict[str, torch.Tensor],
    allocation: Any,
    limits: Limits,
    ratio: float,
) -> Plan:
    """Let the allocator choose at ``ratio`` and turn the choice into a :class:`Plan`."""
    return plan_from_choice(graph, get_allocator(allocation)(graph.groups, scores, limits, ratio=ratio))


def find_broken(
    model: nn.Module, plan: Plan, graph: Graph, example_inputs: Any, commit: bool = False,
    expected: list[tuple[int, ...]] | None = None, then: Callable[[], None] | None = None,
) -> list[Frozen]:
    """Groups whose cut in ``plan`` breaks the model when applied (dry runs; the model is unchanged).

    Some sizes live in the code rather than in the tensors (``x.split(self.n_embd)``,
    ``view(B, 512, -1)``): tracing cannot see them, a forward pass after surgery can. The whole plan
    is tried first; if it fails, each group with a cut is tried alone, and the ones that break the
    model are returned so the caller keeps them whole. With ``commit=True`` a plan that passes as a
    whole stays applied, after ``then()`` ran on the cut model inside the same transaction (if it
    raises, the model is restored and the exception propagates). ``expected``: the model's output
    shapes, when the caller already has them.
    """
    if expected is None:
        expected = output_shapes(eval_call(model, example_inputs))

    def run() -> Any:
        return eval_call(model, example_inputs)

    try:
        with removal(model, plan, check=run, expected_shapes=expected) as applied:
            if not commit:
                applied.rollback()
            elif then is not None:
                then()
        return []
    except SurgeryError as first:
        cut = [g for g in plan.groups if g.removed]
        if len(cut) <= 1:
            raise
        error = first
    frozen = []
    for g in cut:
        try:
            remove(model, plan_from_choice(graph, {g.name: list(g.removed)}), run, expected, commit=False)
        except SurgeryError as exc:
            reason = str(exc.__cause__ or exc).split("; the model was restored")[0]
            frozen.append(Frozen(g.name, "surgery check", f"pruning this group breaks the model: {reason}"))
    if not frozen:
        raise error
    return frozen


def without(graph: Graph, names: set[str]) -> Graph:
    """``graph`` minus the named groups."""
    return Graph([g for g in graph.groups if g.name not in names], graph.frozen, graph.frozen_slots)


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


def search_budget(
    plan_at: Callable[[float], Plan], cost_of: Callable[[Plan], Cost], budget: Budget, original: Cost,
    steps: int = 16,
) -> tuple[float, Plan]:
    """Bisect the allocator's ratio for the least pruning whose exact cost meets ``budget``.

    Uses :func:`adaprune.allocate.search.bisect`, the bisection the adaptive allocation shares.
    """
    base = static_values(original)

    def met(p: Plan) -> bool:
        return budget.met(static_values(cost_of(p)), base)

    hi = 1.0 - 1e-9
    hi_plan = plan_at(hi)
    if not met(hi_plan):
        raise BudgetUnreachableError(
            "the budget cannot be met under the per-group limits: pruning as far as they allow "
            f"gives {budget.describe(static_values(cost_of(hi_plan)), base)}. Loosen "
            "max_ratio/min_channels/round_to, ignore fewer modules, or ask for a smaller reduction"
        )
    if budget.met(base, base):
        return 0.0, plan_at(0.0)
    return bisect(plan_at, met, 0.0, hi, hi_plan, steps)


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
    if refit and calibration is None:
        raise ConfigError("refit=True needs calibration= batches: the layers are refit on their outputs there")
    if ratio is not None and budget is not None:
        raise ConfigError("pass ratio= or budget=, not both: a budget chooses the ratio itself")
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigError(f"budget must be an adaprune.Budget, got {type(budget).__name__}")
    if budget is not None and budget.needs_latency:
        raise ConfigError(
            "prune() is one-shot and does not measure latency: use adaprune.adapt(...) for a latency "
            "budget, or bound macs=/params=/bytes=/energy= here"
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
    graph = trace(model, example_inputs, ignore=ignore)
    scores = criterion(model, graph.groups, ctx)
    finished: list[tuple[Reconstruction | None, Cost]] = []

    def finish() -> None:  # on the cut model, inside the removal's transaction: a failure restores the model
        report = None
        if original is not None and calibration is not None:
            report = reconstruct(model, original, ctx.calibration or calibration, plan.removals)
        finished.append((report, count(model, example_inputs)))

    def check() -> Any:
        return eval_call(model, example_inputs)

    if budget is None:
        plan = choose(graph, scores, allocation, limits, ratio)
        broken = find_broken(model, plan, graph, example_inputs, commit=True, expected=expected, then=finish)
        if broken:  # the whole plan failed the check: without the groups that broke it
            plan = choose(without(graph, {f.module for f in broken}), scores, allocation, limits, ratio)
            with removal(model, plan, check, expected):
                finish()
    else:
        hi = choose(graph, scores, allocation, limits, 1.0 - 1e-9)
        broken = find_broken(model, hi, graph, example_inputs, expected=expected)
        usable = without(graph, {f.module for f in broken})
        predictor = CostPredictor(model, example_inputs)
        ratio, plan = search_budget(
            lambda r: choose(usable, scores, allocation, limits, r), predictor, budget, before
        )
        with removal(model, plan, check, expected):
            finish()
    report, after = finished[-1]
    return PruneResult(model, plan, before, after, graph, list(graph.frozen) + broken, ratio, report)


def eval_call(model: nn.Module, example_inputs: Any) -> Any:
    """One forward pass in eval mode without gradients; training flags are restored."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    finally:
        for m, flag in was_training.items():
            m.training = flag


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Any = None) -> nn.Module:
    """Replay ``plan`` on ``model`` (e.g. a fresh copy): physical removal, checked when inputs are given.

    Raises:
        TraceError: ``model`` does not run on ``example_inputs`` (before anything is cut).
        PlanMismatchError: ``plan`` does not fit ``model``.
        SurgeryError: the cut model fails the check; it was restored.
    """
    check_module(model)
    check_plan(plan)
    if example_inputs is not None:
        check_inputs(example_inputs)
    if example_inputs is None:
        remove(model, plan)
    else:
        try:
            expected = output_shapes(eval_call(model, example_inputs))
        except Warning:
            raise
        except Exception as exc:  # the model as given does not run: nothing was cut yet
            raise TraceError.model_failed(exc) from exc
        remove(model, plan, check=lambda: eval_call(model, example_inputs), expected_shapes=expected)
    return model
