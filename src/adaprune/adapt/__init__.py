"""``adapt``: prune in steps toward a budget, measuring the task and the target after every step."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..api import apply_plan
from ..cost.budget import Budget
from ..errors import ConfigError
from ..graph import resolve_ignore
from ..plan import Plan
from .controller import AdaptConfig, Controller, as_plan
from .state import ControllerState, RunDir, StepRecord


@dataclass
class AdaptResult:
    """What :func:`adapt` did: the pruned model, the plan from the original, the history and why it stopped."""

    model: nn.Module
    plan: Plan
    history: list[StepRecord]
    budget_met: bool
    message: str
    before: dict[str, float]
    after: dict[str, float]
    costs_before: dict[str, float]
    costs_after: dict[str, float]
    protected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [self.message]
        for k in sorted(set(self.before) & set(self.after)):
            lines.append(f"{k}: {self.before[k]:.4f} -> {self.after[k]:.4f}")
        for k in ("macs", "params", "bytes", "energy", "latency"):
            if k in self.costs_before and k in self.costs_after:
                b, a = self.costs_before[k], self.costs_after[k]
                lines.append(f"{k}: {b:,.4g} -> {a:,.4g} ({a / b:.1%})" if b else f"{k}: {b} -> {a}")
        accepted = sum(r.accepted for r in self.history)
        lines.append(f"steps: {len(self.history)} ({accepted} accepted, {len(self.history) - accepted} rolled back)")
        return "\n".join(lines)


def _check_task(task: Any) -> None:
    for attr in ("evaluate", "metric", "higher_is_better"):
        if not hasattr(task, attr):
            raise ConfigError(
                f"task has no {attr!r}: a task needs evaluate(model) -> dict, a primary `metric` name and "
                "`higher_is_better`; adaprune.ClassificationTask is a ready one"
            )


def adapt(
    model: nn.Module,
    example_inputs: Any,
    task: Any,
    budget: Budget,
    tolerance: float = 0.01,
    *,
    ignore: Iterable[nn.Module | str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    **options: Any,
) -> AdaptResult:
    """Prune ``model`` in place, in measured steps, until ``budget`` is met or ``tolerance`` binds.

    Args:
        model: the model to prune (changed in place only when the run finishes).
        example_inputs: inputs the model runs on (costs and latency are measured on them).
        task: a :class:`~adaprune.task.Task` (``evaluate`` with a primary ``metric``; optional
            ``finetune(model, steps)`` and ``calibration()``), e.g. :class:`ClassificationTask`.
        budget: a :class:`Budget` over MACs, params, bytes, energy and/or latency.
        tolerance: the largest acceptable drop of the task's metric below the original model's.
        ignore: modules (or names) whose output width must not change (classifiers).
        run_dir: directory for the run's state, written atomically after every step.
        resume: continue the run in ``run_dir`` (a killed run ends with the same plan).
        **options: fields of :class:`AdaptConfig` (``importance``, ``step``, ``finetune_steps`` ...).

    Returns:
        An :class:`AdaptResult`. An unreachable budget is not an error: ``budget_met`` is False and
        the model is the most pruned one that kept the tolerance.
    """
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be an adaprune.Budget, got {type(budget).__name__}")
    _check_task(task)
    unknown = set(options) - set(AdaptConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"adapt got unknown options {sorted(unknown)}; known: {sorted(AdaptConfig.__dataclass_fields__)}"
        )
    config = AdaptConfig(tolerance=tolerance, **options)
    ids = resolve_ignore(model, ignore)
    names = [n for n, m in model.named_modules() if id(m) in ids]
    if resume and run_dir is None:
        raise ConfigError("resume=True needs run_dir= (the directory of the run to continue)")
    rd = RunDir(run_dir) if run_dir is not None else None
    controller = Controller(model, example_inputs, task, budget, config, names, rd)
    work, state = controller.run(resume)
    plan = as_plan(state.removals)
    apply_plan(model, plan, example_inputs)
    model.load_state_dict(work.state_dict())
    after = controller.metrics(model)
    costs_after = controller.costs(model)
    met = budget.met(costs_after, state.original_costs)
    return AdaptResult(
        model=model,
        plan=plan,
        history=state.history,
        budget_met=met,
        message=state.message,
        before=state.baseline,
        after=after,
        costs_before=state.original_costs,
        costs_after=costs_after,
        protected=list(state.protected),
    )


__all__ = ["AdaptConfig", "AdaptResult", "ControllerState", "RunDir", "StepRecord", "adapt"]
