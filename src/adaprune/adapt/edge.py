"""The recovery-only step: after a cut rolled back by a little from a model that had already spent over half
the tolerance, the next step cuts nothing and only recovers (kept when it measures better)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from ..errors import NonFiniteError, shown
from .recovery import Examples
from .state import ControllerState, StepRecord

if TYPE_CHECKING:
    from .controller import Controller


def at_the_edge(ctl: Controller, state: ControllerState) -> bool:
    """Whether this step should only recover: the last step was a cut rolled back by a little (at most
    twice the tolerance), from a model that had already spent over half of it, and the task
    fine-tunes. Any cut from there is a coin flip on the validation data's noise; recovering first
    buys back tolerance (a detector at 1/4 of its MACs lost three steps in a row by 3 to 30% over the
    tolerance, from a model 0.004 below it)."""
    last = state.history[-1] if state.history else None
    if last is None or last.accepted or not last.cuts or ctl.recovery_steps() == 0:
        return False
    if not state.suspects or state.suspects[0].over > 2.0:
        return False
    verdicts = ctl.judge(state, ctl.current_metrics(state), {})
    return any(v.drop > float(v.criterion.tolerance or 0.0) / 2 for v in verdicts)


def recover_only(ctl: Controller, work: nn.Module, state: ControllerState) -> nn.Module:
    """A step that cuts nothing: recover (``finetune_steps``, BatchNorm recalibration) and measure; kept
    when the model is measured better than before (by the task's judged drop), else rolled back."""
    snapshot = copy.deepcopy(work)
    before = ctl.judge(state, ctl.current_metrics(state), {})
    metrics: dict[str, float] = {}
    examples: Examples = {}
    try:
        steps = ctl.recover(work, state.step)
        metrics, examples, failure, _ = ctl.finished(work, *ctl.evaluate(work), "")
    except NonFiniteError as exc:
        steps, failure = ctl.recovery_steps(), f"recovery failed ({type(exc).__name__}: {shown(str(exc), 200)})"
    verdicts = [] if failure else ctl.judge(state, metrics, examples)
    better = bool(verdicts) and all(v.drop < b.drop for v, b in zip(verdicts, before))
    binding = max(verdicts, key=lambda v: v.judged - float(v.criterion.tolerance or 0.0), default=None)
    interval = None if binding is None or binding.interval is None else [binding.interval.low, binding.interval.high]
    record = StepRecord(state.step, 0.0, {}, metrics, ctl.costs(work), better, "", steps, interval)
    state.history.append(record)
    said = failure or "; ".join(ctl.said(v) for v in verdicts)
    if better:
        record.reason = f"recovery only (the last cut failed by a little, over half the tolerance spent): {said}"
        ctl.lineage += 1
        return work
    record.reason = f"recovery only: {said}, no better than before: rolled back"
    return snapshot


__all__ = ["at_the_edge", "recover_only"]
