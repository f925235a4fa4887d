"""One attempt of a step: cut a plan, recover, measure, judge and record it (:func:`attempt`), and the two
halves other ways of trying a plan share (:mod:`adaprune.adapt.alternatives`): the judged record of a
measured cut (:func:`conclude`) and folding an accepted cut into the run's state (:func:`adopt`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from ..errors import NonFiniteError, shown
from ..plan import Plan
from ..scale.distributed import active, broadcast
from ..surgery import remove
from .bookkeeping import compose, same_weights
from .recovery import Examples
from .state import ControllerState, StepRecord

if TYPE_CHECKING:
    from .controller import Controller, Verdict


def over_tolerance(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts whose judged drop exceeds their criterion's tolerance."""
    return [v for v in verdicts if v.judged > float(v.criterion.tolerance or 0.0) + 1e-12]


def conclude(ctl: Controller, state: ControllerState, plan: Plan, size: float, model: nn.Module,
             metrics: dict[str, float], examples: Examples, failure: str, refit: str, steps: int | None = None,
             prefix: str = "") -> tuple[StepRecord, list[Verdict]]:
    """The record of ``plan`` cut (``size`` of the binding cost) into ``model`` and measured: judged by every
    criterion, its costs measured on ``model``, accepted when nothing failed and every judged drop is within
    its tolerance, with the reason in words (after ``prefix``). Not yet in the history; the state is unchanged.
    ``steps``: the optimizer steps its recovery asked for (by default ``finetune_steps``)."""
    verdicts = [] if failure else ctl.judge(state, metrics, examples)
    over = over_tolerance(verdicts)
    binding = max(verdicts, key=lambda v: v.judged - float(v.criterion.tolerance or 0.0), default=None)
    interval = None if binding is None or binding.interval is None else [binding.interval.low, binding.interval.high]
    cuts = {g.name: len(g.removed) for g in plan.groups if g.removed}
    # the recovery ran whatever was decided: its optimizer steps are spent
    record = StepRecord(state.step, size, cuts, metrics, ctl.costs(model), False, "", ctl.recovery_steps(steps),
                        interval, refit)
    if failure or over:
        record.reason = prefix + (failure or "; ".join(f"{ctl.said(v)} exceeds tolerance {v.criterion.tolerance}"
                                                       for v in over))
    else:
        record.accepted = True
        record.reason = prefix + "; ".join(f"{ctl.said(v)} within tolerance {v.criterion.tolerance}" for v in verdicts)
    return record, verdicts


def adopt(ctl: Controller, model: nn.Module, snapshot: nn.Module, state: ControllerState, plan: Plan) -> None:
    """Fold an accepted cut into the run: ``plan``'s removals (relative to the original) and sizes into the
    state, and a new weights' lineage when ``model`` is not just ``snapshot`` (the model before the cut,
    cut here: pass a copy you no longer need) with the plan removed."""
    if not same_weights(model, snapshot, plan):  # recovered: probes of the earlier weights do not apply
        ctl.lineage += 1
    compose(state.removals, ctl.shapes, plan)
    for tensor, dims in plan.removals.items():
        state.sizes.setdefault(tensor, {}).update({str(d): ctl.shapes[tensor][d] for d in dims})


def attempt(ctl: Controller, work: nn.Module, state: ControllerState, plan: Plan, size: float,
            steps: int | None = None, more: int = 0) -> tuple[nn.Module, StepRecord, list[Verdict]]:
    """Cut ``plan`` from ``work``, recover (``steps`` optimizer steps, by default ``finetune_steps``),
    measure and judge; record the step in the history. Accepted: the removals are folded into the
    state and ``work`` is the model to go on with. Rolled back: the record's reason says why, and the
    returned snapshot (``work`` as it was) is. Returns the snapshot, the record and the verdicts.

    ``more``: when the verdict is undecided (every point drop within its tolerance, an interval's upper
    end above it), recover ``more`` steps further and judge once again (the warm start's first try)."""
    if active():  # under torchrun every process cuts rank 0's plan
        plan = Plan.from_json(broadcast(plan.to_json()))
    snapshot = copy.deepcopy(work)
    # (with probe_data < 1 the cache holds evaluations of part of the data: not a step's measurement)
    key = (ctl.lineage, ctl.canonical(state, plan)) if ctl.cfg.probe_data >= 1.0 and ctl.as_cut(work, steps) else None
    remove(work, plan)
    cached = ctl.prober.cache.get(key) if key is not None else None
    if isinstance(cached, tuple):  # blame or a probe measured this very model
        metrics, examples, failure, refit = ctl.finished(work, cached[0], cached[1], "")
    else:
        metrics, examples, failure, refit = ctl.measure(work, snapshot, plan, state.step, steps)
        if key is not None and not failure and not refit:
            ctl.prober.cache[key] = (metrics, examples)
    verdicts = [] if failure else ctl.judge(state, metrics, examples)
    over = over_tolerance(verdicts)
    extended = ""
    if over and more > 0 and ctl.recovery_steps(more) and all(
            v.drop <= float(v.criterion.tolerance or 0.0) for v in verdicts):
        first = "; ".join(ctl.said(v) for v in over)
        try:
            ctl.recover(work, state.step + 1_000_000, more)  # (its own seed: not the first recovery's draw)
            metrics, examples, failure, _ = ctl.finished(work, *ctl.evaluate(work), refit)
        except NonFiniteError as exc:
            metrics, examples, failure = {}, {}, f"recovery failed ({type(exc).__name__}: {shown(str(exc), 200)})"
        steps = ctl.recovery_steps(steps) + ctl.recovery_steps(more)
        extended = f"undecided after the first recovery ({first}), recovered {more} steps more: "
    record, verdicts = conclude(ctl, state, plan, size, work, metrics, examples, failure, refit, steps, extended)
    state.history.append(record)
    if record.accepted:
        adopt(ctl, work, snapshot, state, plan)
    return snapshot, record, verdicts


__all__ = ["adopt", "attempt", "conclude", "over_tolerance"]
