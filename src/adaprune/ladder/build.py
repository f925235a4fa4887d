"""``ap.ladder``: one set of weights at several nested widths, each chosen adaptively for its budget.

1. **Order.** The model is traced, its channels scored (``importance``, as in :func:`adaprune.prune`)
   and permuted in place, most important first (:func:`~adaprune.ladder.nested.order_channels`): every
   rung will keep a prefix of every group.
2. **Allocate.** Rung by rung, from the largest budget to the smallest, :func:`adaprune.adapt` prunes a
   copy of the previous rung to the rung's budget with the ``"position"`` importance (the last channels
   of a group go first, so what it removes is a suffix) and no fine-tuning: the widths come from the
   adaptive controller's measured sensitivity (per group, not one uniform ratio), the shared weights
   are not changed, and since each rung starts from the one before, per-group widths never grow.
   Every allocation run accepts any metric drop (the budgets bind; the tolerance is judged after
   recovery, below).
3. **Recover.** ``finetune_steps`` optimizer steps train all rungs at once over the shared weights
   (sandwich rule and in-place distillation, :mod:`adaprune.ladder.recovery`); then every rung gets
   its own BatchNorm statistics from the task's calibration batches.
4. **Measure.** Each rung's costs (exact MACs, params, bytes; measured latency) and
   metrics, and whether its metric stayed within ``tolerance`` of the original model's (for a
   :class:`~adaprune.MultiTask`, whether every task's did, each within its own tolerance).

The model passed in becomes the ladder's live model (like :func:`adaprune.prune`, in place); if
anything fails, it is restored as it was.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._check import as_bool, as_float, as_int, check_inputs, check_instance, check_module
from ..adapt.ownership import LADDER_RUN_FILES, LADDER_STATE
from ..adapt.rundir import RunDir
from ..adapt.state import model_signature
from ..cost import count
from ..cost.budget import Budget
from ..cost.latency import measure_latency
from ..cost.registry import static_values
from ..errors import ArgumentTypeError, ConfigError
from ..graph import Graph, ignore_items, ignore_names, trace
from ..importance.registry import Context, default_loss, get_importance
from ..multitask import MultiTask, task_settings
from ..plan import Plan
from ..scale import get_executor
from ..task import Task, as_task
from .nested import NestedWidths, all_tensors, order_channels
from .recovery import joint_recovery, recalibrate_rungs
from .run import LadderRun, LadderState, settings_of

DEFAULT_RUNGS = (Budget(macs=0.75), Budget(macs=0.5), Budget(macs=0.25))


@dataclass(frozen=True)
class Rung:
    """One operating point of a ladder.

    Attributes:
        index: 0 for the full model, then from the largest budget to the smallest.
        budget: the budget it was allocated for (``None`` for rung 0).
        widths: channels kept per group (a prefix of each group).
        costs: its exact static costs (``macs``, ``params``, ``bytes`` ...) and ``latency``: the median ms
            of the live model at this rung on the example inputs, on the latency budget's backend and
            threads when a rung bounds latency, else on torch with one thread.
        metrics: the task's metrics at this rung, after recovery.
        budget_met: whether ``costs`` meet ``budget`` (True for rung 0).
        drop: how far its primary metric fell below the original model's (positive: worse; a
            :class:`~adaprune.MultiTask`'s first task's, every task's metric being in ``metrics``).
        within_tolerance: ``drop <= tolerance``; for a MultiTask, every task's drop within its own tolerance.
    """

    index: int
    budget: Budget | None
    widths: dict[str, int]
    costs: dict[str, float]
    metrics: dict[str, float]
    budget_met: bool
    drop: float
    within_tolerance: bool


class Ladder:
    """One set of weights at nested widths: :meth:`use` switches the live model in place,
    :meth:`export` returns a standalone pruned copy. Made by :func:`ladder`.

    Attributes:
        model: the live model (at rung :attr:`current`).
        rungs: per rung its budget, widths, costs and metrics (:class:`Rung`).
        original: the metrics of the model before the ladder was built.
        finetune_steps: optimizer steps of the joint recovery (each trains up to three rungs).
        evaluations: calls of the task's evaluation, allocation included.
        ignore: names of the modules kept at full width (the classifier ...).
    """

    def __init__(self, nested: NestedWidths, rungs: list[Rung], original: dict[str, float],
                 finetune_steps: int, evaluations: int, ignore: Iterable[str] = ()) -> None:
        self.nested, self.rungs, self.original = nested, rungs, original
        self.finetune_steps, self.evaluations = finetune_steps, evaluations
        self.ignore = list(ignore)

    def __len__(self) -> int:
        return len(self.rungs)

    def __repr__(self) -> str:
        return f"Ladder({len(self)} rungs, at rung {self.current})"

    @property
    def model(self) -> nn.Module:
        return self.nested.model

    @property
    def current(self) -> int:
        return self.nested.current

    def use(self, k: int) -> nn.Module:
        """Switch the live model to rung ``k`` in place (views of the shared weights) and return it."""
        return self.nested.use(k)

    def export(self, k: int) -> nn.Module:
        """Rung ``k`` as a standalone, physically pruned model (works with :func:`adaprune.save` and
        :func:`adaprune.export_onnx`); its outputs equal the in-place rung's."""
        return self.nested.export(k)

    def plan(self, k: int) -> Plan:
        """What rung ``k`` removes from the full (ordered) model."""
        return self.nested.plans[self.nested._index(k)]


def widths_of(graph: Graph, pruned: nn.Module) -> dict[str, int]:
    """Each group's width in ``pruned`` (a copy of the model with channels removed), read from a
    tensor dim the group spans alone."""
    tensors = all_tensors(pruned)
    out = {}
    for g in graph.groups:
        for slot, owner in zip(g.slots, g.channel_of):
            if bool((owner >= 0).all()) and owner.numel() % g.size == 0 and slot.tensor in tensors:
                out[g.name] = tensors[slot.tensor].shape[slot.dim] // (owner.numel() // g.size)
                break
        else:
            raise ConfigError(f"ladder: group {g.name!r} spans no tensor dim alone; its width cannot be read")
    return out


def ladder(
    model: nn.Module,
    example_inputs: Any,
    task: Any,
    rungs: Iterable[Budget] = DEFAULT_RUNGS,
    tolerance: float = 0.01,
    *,
    ignore: Iterable[nn.Module | str] | nn.Module | str | None = None,
    finetune_steps: int = 0,
    importance: Any = "l2",
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    lr: float | None = None,
    seed: int = 0,
    allocation: dict[str, Any] | None = None,
    run_dir: str | os.PathLike[str] | RunDir | None = None,
    resume: bool = False,
    force: bool = False,
    checkpoint_every: int = 100,
    executor: Any = None,
) -> Ladder:
    """Build a ladder of nested widths over ``model``'s weights (the module doc), in place.

    Args:
        model: a trained model; it becomes the ladder's live model (channels reordered, same function).
        example_inputs: inputs the model runs on (costs are counted on them).
        task: a :class:`~adaprune.Task` (``evaluate``; ``training_batches`` and ``loss`` for recovery;
            ``calibration`` for BatchNorm statistics and data-driven importance).
        rungs: one budget per rung below the full model, from the largest to the smallest.
        tolerance: the largest acceptable drop of the task's metric (reported per rung; a
            :class:`~adaprune.MultiTask` judges each task by its own tolerance instead).
        ignore: modules (or names) whose output width must not change (classifiers).
        finetune_steps: optimizer steps of the joint recovery of all rungs.
        importance: how channels are ordered (a criterion name or callable, as in :func:`adaprune.prune`).
        loss: ``loss(output, targets)`` for gradient-based importance criteria (default cross-entropy).
        lr: the joint recovery's learning rate (default: the task's ``lr``, else 3e-4).
        seed: seeds the recovery's choice of middle rungs, the allocation runs and whatever the build draws
            from torch's generator (a shuffling loader's batches), in a forked generator: the caller's is
            left as it was, and the same arguments build the same ladder.
        allocation: extra :class:`~adaprune.adapt.AdaptConfig` options for the allocation runs.
        run_dir: a directory where the build records each stage (:mod:`adaprune.ladder.run`): the
            ordered weights, each rung's widths once allocated, a checkpoint of the joint recovery
            every ``checkpoint_every`` steps. New, empty or an adaprune run directory; locked while
            the build runs.
        resume: continue the build in ``run_dir`` (the same model as it was before the build, the same
            rungs and options); a killed build so ends with the ladder an uninterrupted one builds
            when the task's batches and evaluation are deterministic.
        force: start over in a ``run_dir`` that holds a build (deleting only the files adaprune wrote).
        checkpoint_every: recovery steps between checkpoints in ``run_dir`` (0: only after the last).
        executor: where the allocation runs evaluate their probes (as in :func:`adaprune.adapt`:
            ``None``, ``"local"``, ``"ray"`` or an :class:`adaprune.Executor`); one for the whole build.

    Raises:
        ConfigError: bad arguments (naming them), or a task without training batches when
            ``finetune_steps > 0``. On any error the model is restored as it was.
        RunDirError: ``run_dir`` is not usable, or its build cannot be resumed with these arguments.
    """
    check_module(model)
    check_inputs(example_inputs)
    task = as_task(task)
    budgets: list[Budget] = [rungs] if isinstance(rungs, Budget) else list(rungs)
    if not budgets:
        raise ConfigError("ladder: rungs= is empty; give at least one Budget, e.g. [Budget(macs=0.5)]")
    for i, b in enumerate(budgets):
        check_instance(b, Budget, f"rungs[{i}]", "an adaprune.Budget", "e.g. rungs=[Budget(macs=0.5)]")
        b.refuse_disk("ladder")
    tolerance = as_float(tolerance, "tolerance", low=0.0, hint="the largest acceptable drop of the metric")
    finetune_steps = as_int(finetune_steps, "finetune_steps", low=0)
    every = as_int(checkpoint_every, "checkpoint_every", low=0)
    rate = as_float(lr if lr is not None else getattr(task, "lr", 3e-4), "lr", low=0.0, low_open=True)
    resume, force = as_bool(resume, "resume"), as_bool(force, "force")
    options = dict(allocation or {})
    if "executor" in options:
        raise ConfigError("ladder: give the executor as ladder(executor=...), not in allocation=")
    names = ignore_names(model, ignore_items(ignore))
    if resume and run_dir is None:
        raise ConfigError("ladder: resume=True needs run_dir= (the directory of the build to continue)")
    if resume and force:
        raise ConfigError("ladder: resume=True and force=True contradict each other: continue the build, or start over")
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike, RunDir)):
        raise ArgumentTypeError(f"ladder: run_dir must be a path or a RunDir, got {type(run_dir).__name__}")
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir) if run_dir is not None else None
    runner, owned = get_executor(executor)
    opened = rd is not None and not rd.is_open
    if rd is not None and opened:
        rd.open(resume=resume, force=force, names=LADDER_RUN_FILES, state=LADDER_STATE)
    try:
        run = LadderRun(rd) if rd is not None else None
        settings = {**settings_of(budgets, tolerance, names, finetune_steps, importance, rate, seed, options),
                    **task_settings(task)}  # a MultiTask's tasks and tolerances: a resume must share them
        state = run.load(settings, model) if run is not None and resume and run.exists() else None
        stages = _Stages(run, state, settings, every)
        saved = {id(t): (t, t.data.clone()) for t in all_tensors(model).values()}  # (the recovery updates in place)
        nested: NestedWidths | None = None
        try:
            # whatever the build draws from torch's generator (a shuffling loader's calibration batches and the
            # recovery's) follows ``seed``, and the caller's generator is left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nested, built = _build(model, example_inputs, task, budgets, tolerance, names, finetune_steps,
                                       importance, loss, rate, seed, {**options, "executor": runner}, stages)
            return built
        except BaseException:
            if nested is not None:
                nested.use(0)
            for t, data in saved.values():
                t.data = data
            raise
    finally:
        if owned:
            runner.close()
        if rd is not None and opened:
            rd.close()


class _Stages:
    """Where the build records and finds its stages: a :class:`~adaprune.ladder.run.LadderRun`, or
    nothing without a run directory (every method then does nothing)."""

    def __init__(self, run: LadderRun | None, state: LadderState | None, settings: dict[str, Any], every: int) -> None:
        self.run, self.state, self.settings, self.every = run, state, settings, every

    def start(self, model: nn.Module, original: dict[str, float], values: dict[str, float], evaluations: int) -> None:
        """The channels are ordered: record the ordered weights and the original metrics and costs."""
        if self.run is None:
            return
        self.state = LadderState(format="adaprune-ladder-run", version=1, settings=self.settings,
                                 signature=model_signature(model), original=dict(original), values=dict(values),
                                 evaluations=evaluations, steps=0, checkpoint="")
        self.run.save_ordered(model)
        self.run.commit(self.state)

    def allocated(self, work: nn.Module, widths: list[dict[str, int]], evaluations: int) -> None:
        """A rung is allocated: record its model (the next is cut from it) and the widths so far."""
        if self.run is not None and self.state is not None:
            self.state.widths, self.state.evaluations = [dict(w) for w in widths], evaluations
            self.run.save_rung(self.state, work)

    def rung(self, model: nn.Module, graph: Graph, widths: list[dict[str, int]]) -> nn.Module:
        """The last rung allocated before the build was resumed, as its allocation left it."""
        assert self.run is not None
        work = NestedWidths(model, graph, widths).export(len(widths))
        self.run.load_rung(work, len(widths))
        return work

    def checkpoint(self, model: nn.Module) -> Callable[[int, torch.optim.Optimizer], None] | None:
        if self.run is None or self.state is None:
            return None
        run, state = self.run, self.state
        return lambda steps, opt: run.save_recovery(state, model, opt, steps)


def _build(model: nn.Module, x: Any, task: Task, budgets: list[Budget], tolerance: float, ignore: list[str],
           steps: int, importance: Any, loss: Any, lr: float, seed: int,
           options: dict[str, Any], stages: _Stages) -> tuple[NestedWidths, Ladder]:
    from ..adapt import adapt

    calls = [0]

    def evaluate(m: nn.Module) -> dict[str, float]:
        calls[0] += 1
        return task.evaluate(m)

    latency = next((b for b in budgets if b.needs_latency), None)
    backend, threads = (latency.backend, latency.threads) if latency is not None else ("torch", 1)
    resumed = stages.state
    calibration = task.calibration()
    if resumed is None:
        before = evaluate(model)
        graph = trace(model, x, ignore=ignore)
        scores = get_importance(importance)(model, graph.groups, Context(calibration, loss or default_loss))
        order_channels(model, graph, scores)
        values = static_values(count(model, x, disk=False))
        if latency is not None:
            values["latency"] = measure_latency(model, x, backend=backend, threads=threads).median_ms
        widths: list[dict[str, int]] = []
        stages.start(model, before, values, calls[0])
    else:  # the ordered weights, the original's metrics and costs, the rungs allocated: as recorded
        assert stages.run is not None
        stages.run.load_ordered(model)
        graph = trace(model, x, ignore=ignore)
        before, values, widths = dict(resumed.original), dict(resumed.values), [dict(w) for w in resumed.widths]
        calls[0] = resumed.evaluations
    # each rung is cut from the previous one as its allocation left it, so per-group widths never grow
    work = stages.rung(model, graph, widths) if widths else copy.deepcopy(model)
    sizing = task  # the allocation runs are not judged (tolerance 0.999): a MultiTask's own tolerances neither
    if isinstance(task, MultiTask):
        sizing = copy.copy(task)
        sizing.tolerance = dict.fromkeys(task.tasks, 0.999)
    for i in range(len(widths) + 1, len(budgets) + 1):
        res = adapt(work, x, sizing, budgets[i - 1].absolute(values), tolerance=0.999, ignore=ignore,
                    importance="position", finetune_steps=0, confidence=0.0, seed=seed + i, **options)
        calls[0] += res.evaluations
        widths.append(widths_of(graph, work))
        stages.allocated(work, widths, calls[0])
    del work
    nested = NestedWidths(model, graph, widths)
    task.set_teacher(model)  # the ordered model before any recovery step
    start, optimizer_state = 0, None
    if resumed is not None and resumed.checkpoint:
        assert stages.run is not None
        optimizer_state = stages.run.load_recovery(resumed, model)
        start = resumed.steps
    torch.manual_seed(seed)  # the recovery's batches as an uninterrupted build draws them, on a resumed build too
    taken = joint_recovery(nested, task, steps, lr, seed, start=start, optimizer_state=optimizer_state,
                           checkpoint=stages.checkpoint(model), every=stages.every)
    if calibration is not None:
        recalibrate_rungs(nested, list(calibration))
    runner = options["executor"]
    if runner.workers > 1:  # each rung exported with its own statistics, evaluated by the workers at once
        found = runner.map_models([nested.export(k) for k in range(len(nested))], task.evaluate)
    else:  # in place, one after another (no copies)
        found = [runner.map(nested.use(k), [Plan()], task.evaluate)[0] for k in range(len(nested))]
    calls[0] += len(found)
    out = []
    for k, metrics in enumerate(found):
        live = nested.use(k)
        costs = static_values(count(live, x, disk=False))
        budget = budgets[k - 1] if k else None
        costs["latency"] = measure_latency(live, x, backend=backend, threads=threads).median_ms
        drops = [(c, (1.0 if c.higher_is_better else -1.0) * (before[c.metric] - metrics[c.metric]))
                 for c in task.criteria()]  # one per task of a MultiTask, each with its own tolerance
        within = all(d <= (tolerance if c.tolerance is None else c.tolerance) + 1e-12 for c, d in drops)
        out.append(Rung(k, budget, dict(nested.widths[k]), costs, metrics,
                        budget.met(costs, values) if budget is not None else True, drops[0][1], within))
    nested.use(0)
    return nested, Ladder(nested, out, before, taken, calls[0], ignore)


__all__ = ["DEFAULT_RUNGS", "Ladder", "Rung", "ladder", "widths_of"]
