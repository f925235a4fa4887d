"""``adapt``: prune in steps toward a budget, measuring the task and the target after every step."""

from __future__ import annotations

import copy
import difflib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._check import as_bool, check_callable, check_inputs, check_instance, check_module
from ..calls import eval_call
from ..cost.budget import Budget
from ..cost.registry import cost_order
from ..errors import ArgumentTypeError, ConfigError, SurgeryError, shown
from ..graph import ignore_items, ignore_names
from ..plan import Plan
from ..scale import get_executor
from ..scale.distributed import join, leader
from ..surgery.hf_config import UnsaveableConfigWarning
from ..surgery.remove import output_shapes, removal
from ..task import as_task
from .bookkeeping import as_plan, replay
from .config import AdaptConfig
from .controller import Controller
from .rundir import RunDir
from .state import ControllerState, StepRecord, check_resumable, model_signature, run_settings
from .warm import warm_key


class WarmStartWarning(UserWarning):
    """Part of a warm start's previous plan did not map onto the updated model (the message says which)."""


@dataclass
class AdaptResult:
    """What :func:`adapt` did: the pruned model, the plan from the original, the history and why it stopped.

    ``optimizer_steps`` counts the optimizer steps adapt spent: what every recovery fine-tune asked the
    task's ``finetune(model, steps)`` for, over accepted and rolled-back steps alike (the sum of the
    history's ``optimizer_steps``), plus any fine-tuning after the loop (adapt runs none). A comparison
    gives every other method this many steps.

    ``evaluations`` counts the task's evaluations (the original, every probe measured, every step's
    model; a resumed run includes the ones before it was killed), ``part_evaluations`` how many of them
    were of part of the validation data (probes, with ``probe_data < 1``). ``stopped`` names the limit
    (``time_limit`` / ``max_evaluations``) that ended the run, ``""`` when none did; ``warnings`` is
    what the run warned about (a validation set too small for the tolerance).

    ``warm_start`` (with ``adapt(warm_start=)``): what the warm start did (:mod:`adaprune.adapt.warm`):
    ``outcome`` (``"kept"``: the previous plan held; ``"grown back"``: it held with the groups in
    ``restored`` uncut; ``"abandoned"``; ``"not tried"``: the budget held without it), ``tries``, the mapped
    plan's channels per group (``removed``), what did not map (``dropped``, also warned as
    :class:`WarmStartWarning`), what the mapping also cut (``extended``) or could not check (``notes``),
    and the measured ``harms`` per group when the whole plan was rolled back; ``None`` without a warm start.
    """

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
    optimizer_steps: int = 0
    evaluations: int = 0
    part_evaluations: int = 0
    stopped: str = ""
    warnings: list[str] = field(default_factory=list)
    warm_start: dict[str, Any] | None = None

    def summary(self) -> str:
        lines = [self.message]
        if self.warm_start is not None:
            w = self.warm_start
            tries = f"{w['tries']} {'try' if w['tries'] == 1 else 'tries'}"
            lines.append(f"warm start: {w['outcome'] or 'not finished'} after {tries}"
                         + (f"; grown back: {', '.join(w['restored'])}" if w["restored"] and w["outcome"] != "abandoned" else "")
                         + (f"; {len(w['dropped'])} part{'s' if len(w['dropped']) > 1 else ''} of the previous plan did not map "
                            "(warm_start['dropped'])" if w["dropped"] else ""))
        for k in sorted(set(self.before) & set(self.after)):
            lines.append(f"{k}: {self.before[k]:.4f} -> {self.after[k]:.4f}")
        for k in cost_order(self.costs_before):  # every registered cost measured, in registry order
            if k in self.costs_after:
                b, a = self.costs_before[k], self.costs_after[k]
                lines.append(f"{k}: {b:,.4g} -> {a:,.4g} ({a / b:.1%})" if b else f"{k}: {b} -> {a}")
        accepted, unused = sum(r.accepted for r in self.history), sum(r.unused for r in self.history)
        rolled = len(self.history) - accepted - unused
        steps = len({r.step for r in self.history})
        lines.append(f"steps: {steps} ({accepted} accepted, {rolled} rolled back)" if steps == len(self.history) else
                     f"steps: {steps}, {len(self.history)} sizes tried ({accepted} accepted, {rolled} rolled back, "
                     f"{unused} within tolerance and not used)")
        lines.append(f"optimizer steps: {self.optimizer_steps} (fine-tuning in every step tried)")
        lines.append(f"evaluations: {self.evaluations}" + (
            f" ({self.part_evaluations} of part of the validation data: probe_data)" if self.part_evaluations else ""))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def adapt(
    model: nn.Module,
    example_inputs: Any,
    task: Any,
    budget: Budget,
    tolerance: float = 0.01,
    *,
    ignore: Iterable[nn.Module | str] | None = None,
    run_dir: str | os.PathLike[str] | RunDir | None = None,
    resume: bool = False,
    force: bool = False,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    warm_start: Any = None,
    executor: Any = None,
    **options: Any,
) -> AdaptResult:
    """Prune ``model`` in place, in measured steps, until ``budget`` is met or ``tolerance`` binds.

    Args:
        model: the model to prune (changed in place only when the run finishes).
        example_inputs: inputs the model runs on (costs and latency are measured on them).
        task: a :class:`~adaprune.task.Task` (``evaluate`` with a primary ``metric``; optional
            ``finetune(model, steps)``, ``calibration()`` and ``set_teacher(model)``), e.g.
            :class:`ClassificationTask`, or an object with those methods that does not subclass Task.
        budget: a :class:`Budget` over MACs, params, bytes, energy and/or latency.
        tolerance: the largest acceptable drop of the task's metric below the original model's.
        ignore: modules (or names) whose output width must not change (classifiers).
        run_dir: directory for the run's state, written atomically after every step (a path, or an
            open :class:`RunDir`). It must be new, empty or an adaprune run directory, and is locked
            while the run holds it (see :mod:`adaprune.adapt.rundir`).
        resume: continue the run in ``run_dir`` (a killed run ends with the same plan). The settings
            and the model must be those the run started with (checked before anything is changed).
        force: start over in a ``run_dir`` that holds a run (deleting only the files adaprune wrote
            there), or use a directory that is not a run directory (writing only names that are free).
        loss: ``loss(output, targets) -> scalar`` for gradient-based criteria (``importance="taylor"``) on
            the task's calibration batches, as in :func:`adaprune.prune`; default: cross-entropy on the
            model's logits (:func:`adaprune.importance.default_loss`). Not part of the run's settings: a
            resumed run takes the one it is given.
        warm_start: a previous result to start from, when ``model`` is an update of the model it pruned:
            an :class:`AdaptResult`, a :class:`~adaprune.plan.Plan`, a run directory, a directory written
            by :func:`adaprune.save` or a plan JSON file. Its plan is mapped onto ``model`` by tensor
            name (:func:`adaprune.updates.map_plan`; what does not map is in ``warnings`` and
            ``warm_start``), tried first as one step, and grown back where the update needs what it cut
            (:mod:`adaprune.adapt.warm`). A plan for another model is a ``PlanMismatchError``.
        executor: where each step's probes (and, with ``alternatives=k``, its sizes: each cut, fine-tuned and
            measured) run: ``None``/``"local"`` (here, one after another), ``"ray"`` or an
            :class:`adaprune.Executor` such as ``RayExecutor(workers=4)`` (each worker holds a copy of the
            model and the task, which must then pickle). The run's plan is the same with any of them (the sizes
            run at this process's torch thread count; ``"ray"``'s workers reserve 1 CPU each, and a
            ``WorkerThreadsWarning`` says when they would run more threads than that). Not part of the run's
            settings: a resumed run may use another.
        **options: fields of :class:`AdaptConfig` (``importance``, ``step``, ``finetune_steps`` ...).

    Returns:
        An :class:`AdaptResult`. An unreachable budget is not an error: ``budget_met`` is False and
        the model is the most pruned one that kept the tolerance.
    """
    check_module(model)
    check_inputs(example_inputs)
    task = as_task(task)  # checked, and a protocol object wrapped: its hooks are resolved once, here
    check_instance(budget, Budget, "budget", "an adaprune.Budget", "e.g. budget=adaprune.Budget(macs=0.5)")
    budget.refuse_disk("adapt")
    resume, force = as_bool(resume, "resume"), as_bool(force, "force")
    if loss is not None:
        check_callable(loss, "loss", "a callable loss(output, targets) -> scalar tensor")
    unknown = sorted(set(options) - set(AdaptConfig.__dataclass_fields__))
    if unknown:
        close = difflib.get_close_matches(unknown[0][:100], list(AdaptConfig.__dataclass_fields__), 1)
        raise ConfigError(
            f"adapt got unknown options {shown(unknown, 40)}; "
            + (f"did you mean {close[0]!r}?" if close
               else "the options are the fields of adaprune.AdaptConfig (tolerance, importance, step, finetune_steps ...)")
        )
    ignore = ignore_items(ignore)  # a generator is read once, here
    names = ignore_names(model, ignore)
    config = AdaptConfig(tolerance=tolerance, **options)
    join()  # under torchrun: the process group (docs/scale-out.md); only rank 0 holds the run directory
    if resume and run_dir is None:
        raise ConfigError("resume=True needs run_dir= (the directory of the run to continue)")
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike, RunDir)):
        raise ArgumentTypeError(f"run_dir must be a path or a RunDir, got {type(run_dir).__name__}")
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir) if run_dir is not None else None
    if not leader():
        rd = None
    mapped = None
    if warm_start is not None:
        if rd is not None and isinstance(warm_start, (str, os.PathLike)) and \
                os.path.realpath(warm_start) == os.path.realpath(rd.path):
            raise ConfigError(f"warm_start is this run's own run_dir ({rd.path}): pass the previous run's directory "
                              "and a new run_dir for the re-pruned model")
        mapped = _warm_mapping(warm_start, model, example_inputs, names)
        for line in [*mapped.dropped, *mapped.notes]:
            warnings.warn(f"warm start: {'not mapped' if line in mapped.dropped else 'note'}: {line}",
                          WarmStartWarning, stacklevel=2)
    runner, owned = get_executor(executor)
    try:
        runner.prepare()  # (Ray's workers start while the original model is measured)
        controller = Controller(model, example_inputs, task, budget, config, names, rd, loss, mapped,  # checks the weights
                                runner)
        opened = rd is not None and not rd.is_open
        if rd is not None and opened:
            rd.open(resume=resume, force=force)
        try:
            # (gradients on: recovery fine-tunes and gradient-based criteria score, whatever the caller's mode)
            with warnings.catch_warnings(), torch.enable_grad():  # the working copy's config: said once, below
                warnings.simplefilter("ignore", UnsaveableConfigWarning)
                work, state = controller.run(resume)
            plan = as_plan(state.removals, state.sizes)
            after = controller.current_metrics(state)  # as measured on exactly these weights
            costs_after = _final_costs(state)
            _apply(model, plan, work, example_inputs)
        finally:
            if rd is not None and opened:
                rd.close()
    finally:
        if owned:
            runner.close()
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
        optimizer_steps=sum(h.optimizer_steps for h in state.history),  # nothing is fine-tuned after the loop
        evaluations=state.evaluations,
        part_evaluations=state.part_evaluations,
        stopped=state.stopped,
        warnings=list(state.warnings),
        warm_start=None if state.warm is None else dict(state.warm),
    )


def check_resume(
    run_dir: RunDir,
    model: nn.Module,
    budget: Budget,
    tolerance: float = 0.01,
    *,
    ignore: Iterable[nn.Module | str] | None = None,
    task: Any = None,
    warm_start: Any = None,
    example_inputs: Any = None,
    **options: Any,
) -> None:
    """Raise :class:`~adaprune.errors.RunDirError` if the run in ``run_dir`` cannot be resumed with these
    settings on this model (and ``task``: several tasks must be the same, with the same tolerances).
    Reads only: call it before writing anything into the run directory."""
    from ..multitask import task_settings

    config = AdaptConfig(tolerance=tolerance, **options)
    names = ignore_names(model, ignore)
    state = run_dir.load()
    warm = None
    if warm_start is not None:  # the same previous plan, mapped the same way
        warm = _warm_mapping(warm_start, model, example_inputs, names)
    settings = run_settings(config, budget, names, {**(task_settings(task) if task is not None else {}), **warm_key(warm)})
    check_resumable(state, settings, model_signature(model), str(run_dir.path))
    replay(copy.deepcopy(model), state, str(run_dir.path))  # (a copy: the caller's model is not touched)


def _warm_mapping(warm_start: Any, model: nn.Module, example_inputs: Any, names: list[str]) -> Any:
    """``warm_start``'s plan mapped onto ``model`` (:func:`adaprune.mapping.map_plan`); a plan that does not fit
    is a ``PlanMismatchError`` naming ``warm_start``."""
    from ..errors import PlanError
    from ..mapping import map_plan
    from .previous import plan_of

    plan = plan_of(warm_start, "warm_start")
    try:
        return map_plan(plan, model, example_inputs, ignore=names)
    except PlanError as exc:
        raise type(exc)(f"warm_start: {exc}") from None


def _final_costs(state: ControllerState) -> dict[str, float]:
    """The pruned model's costs as the controller measured them when it accepted its last step (the
    static costs are exact counts; a fresh latency timing would differ by noise and could contradict
    the run's own verdict)."""
    accepted = [h for h in state.history if h.accepted]
    return dict(accepted[-1].costs) if accepted else dict(state.original_costs)


def _apply(model: nn.Module, plan: Plan, work: nn.Module, example_inputs: Any) -> None:
    """Make ``model`` the pruned ``work`` model, as one transaction: the plan is cut and the values are
    swapped in (``.data``, so parameter objects that stay keep their identity); if anything fails or
    the process is interrupted, ``model`` is restored exactly."""
    values = dict(work.state_dict(keep_vars=True))
    expected = output_shapes(eval_call(work, example_inputs))
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with removal(model, plan, check=lambda: eval_call(model, example_inputs), expected_shapes=expected):
            for name, t in model.state_dict(keep_vars=True).items():
                new = values[name]
                if tuple(new.shape) != tuple(t.shape):
                    raise SurgeryError(f"the pruned {name!r} has shape {tuple(new.shape)}, the model {tuple(t.shape)}")
                swapped.append((t, t.data))
                t.data = new.detach()
    except BaseException:  # the removal restored the cut tensors; the values swapped in go back too
        for t, old in reversed(swapped):
            t.data = old
        raise


__all__ = ["AdaptConfig", "AdaptResult", "ControllerState", "RunDir", "StepRecord", "WarmStartWarning", "adapt",
           "check_resume"]
