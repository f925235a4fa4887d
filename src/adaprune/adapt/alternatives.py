"""Alternative step sizes (``alternatives=k``): a step tries ``k`` sizes at once and keeps the largest that
stays within tolerance.

A step normally cuts one size, recovers, measures and, past the tolerance, rolls back and tries a smaller
size in the next step (probed and blamed again). With ``alternatives=k`` it also allocates the sizes
``size * shrink``, ``size * shrink**2`` ... (down to ``min_step``) from the same probes, and cuts, recovers
and measures every one of them independently, each from the working model with the step's seed: on an
executor's workers they run side by side (:meth:`adaprune.scale.Executor.map_runs`), here one after another.
The largest one within tolerance goes on; the others are in the history as tried and not used (their
recovery's optimizer steps are counted). When none is within tolerance the step rolls back as a step does,
with the smallest size blamed and halved.

The result does not depend on where the sizes ran: every one is cut from the same model, recovered from the
same seed and judged on the controller by the same rule. It does differ from ``alternatives=1``, which
probes again between the sizes it tries; what the parallel sizes buy is the steps a rolled-back size costs.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..graph import Graph
from ..plan import Plan
from ..scale.distributed import active, broadcast
from ..surgery import remove
from ..surgery.check import find_broken
from ..task import Criterion, Task
from .attempts import adopt, conclude
from .bookkeeping import examine
from .config import AdaptConfig
from .recovery import Examples, Recovery
from .state import ControllerState, StepRecord

if TYPE_CHECKING:
    from .controller import Controller, Verdict


class WorkerThreadsWarning(UserWarning):
    """A step's sizes run at the caller's torch thread count on workers that reserved fewer CPUs."""


Option = tuple[float, Plan, dict[str, float]]
"""One size a step tries: the size (of the binding cost), its plan, and its per-cluster ratios."""

Measured = tuple[nn.Module, dict[str, float], Examples, str, str]
"""A size's outcome: the cut, recovered model, its metrics and per-example values, what failed, what the refit did."""


def tried_key(version: int, plan: Plan) -> str:
    """Names a plan tried on the weights of the ``version``-th accepted step (``state.rejected`` holds those
    rolled back: not measured again)."""
    return hashlib.sha256(f"{version}|{plan.to_json()}".encode()).hexdigest()[:16]


def smaller_sizes(ctl: Controller, work: nn.Module, state: ControllerState, graph: Graph, first: Option, version: int,
                  plan_at: Callable[[float], tuple[Plan, dict[str, float]]]) -> list[Option]:
    """``first`` and the smaller sizes of the step, each allocated by ``plan_at`` from the step's probes:
    ``size * shrink**i`` for ``i < alternatives`` and not below ``min_step``. A size whose plan is empty,
    the same as a larger one's, rolled back on these weights before, or cutting what breaks the model is
    left out (``graph`` is the step's, without the protected groups, so no plan cuts those)."""
    options, seen = [first], {first[1].to_json()}
    size = first[0]
    for _ in range(ctl.cfg.alternatives - 1):
        size *= ctl.cfg.shrink
        if size < ctl.cfg.min_step:
            break
        plan, ratios = plan_at(size)
        text = plan.to_json()
        if plan.is_empty or text in seen or tried_key(version, plan) in state.rejected:
            continue
        if find_broken(work, plan, graph, ctl.x):
            continue
        seen.add(text)
        options.append((size, plan, ratios))
    if active():  # under torchrun every process tries rank 0's sizes and plans (all at once: as many everywhere)
        sent = broadcast([(s, p.to_json(), r) for s, p, r in options])
        options = [(s, Plan.from_json(text), r) for s, text, r in sent]
    return options


@dataclass(frozen=True)
class Job:
    """One size to try, as it travels to a worker (the working model travels once per step, beside it)."""

    plan: str  # its JSON
    step: int


class Runner(Recovery):
    """The recovery and measurement of one size, where it runs (a worker holds one per call): the
    controller's :meth:`~adaprune.adapt.recovery.Recovery.measure`, with the task's evaluation checked as the
    controller checks it, and counted."""

    def __init__(self, cfg: AdaptConfig, task: Task, criteria: list[Criterion], counts: dict[str, int]) -> None:
        self.cfg, self.task, self.criteria, self.counts = cfg, task, criteria, counts
        self.evaluations = 0

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Examples]:
        self.evaluations += 1
        return examine(self.task.evaluate_criteria(model), self.task.metric, self.criteria, self.counts)


@dataclass(frozen=True)
class Trial:
    """What a worker runs for each :class:`Job`, given the working model: cut the plan from a copy, recover,
    measure, at the caller's torch ``threads`` (a sum over more or fewer threads may come out other in its last
    bits, and fine-tuning compounds that: at the caller's count the numbers are those of the caller, bit for
    bit, on the same kind of CPU). Returns the :data:`Measured` outcome and the number of evaluations it made.
    It pickles (with the task) for an executor whose workers are other processes; one is made per run."""

    cfg: AdaptConfig
    task: Task
    criteria: list[Criterion]
    counts: dict[str, int]
    threads: int

    def __call__(self, work: nn.Module, job: Job) -> tuple[Measured, int]:
        plan = Plan.from_json(job.plan)
        model = copy.deepcopy(work)
        remove(model, plan)
        runner = Runner(self.cfg, self.task, self.criteria, self.counts)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            metrics, examples, failure, refit = runner.measure(model, work, plan, job.step)
        finally:
            torch.set_num_threads(before)
        return (model, metrics, examples, failure, refit), runner.evaluations


def measure_all(ctl: Controller, work: nn.Module, state: ControllerState, options: list[Option]) -> list[Measured]:
    """Every option cut from ``work`` (left as it is), recovered and measured: through the controller's
    executor, or under torchrun in this process on every rank (the task's fine-tuning then spans the ranks)."""
    if active():
        out: list[Measured] = []
        for _, plan, _ in options:
            model = copy.deepcopy(work)
            remove(model, plan)
            out.append((model, *ctl.measure(model, copy.deepcopy(work), plan, state.step)))
        return out
    if ctl.trial is None:  # (once per run: the workers keep it while it is the same object)
        ctl.trial = Trial(ctl.cfg, ctl.task, ctl.criteria, ctl.example_counts(), torch.get_num_threads())
        reserved = getattr(ctl.executor, "threads", None)
        if isinstance(reserved, int) and reserved < ctl.trial.threads:
            warnings.warn(
                f"alternatives={ctl.cfg.alternatives}: each size runs at this process's {ctl.trial.threads} torch "
                f"threads (so the numbers are this process's), on workers that reserved {reserved} CPU(s) each: "
                f"they run more threads than they reserved, which can be several times slower. Pass "
                f"{type(ctl.executor).__name__}(threads={ctl.trial.threads}) on a cluster with the CPUs for it, or "
                f"torch.set_num_threads({reserved}) here", WorkerThreadsWarning,
                stacklevel=6)  # (user -> adapt -> run -> step -> try_sizes -> here)
    done = ctl.executor.map_runs(work, [Job(plan.to_json(), state.step) for _, plan, _ in options], ctl.trial)
    ctl.evaluations += sum(n for _, n in done)
    return [m for m, _ in done]


def try_sizes(ctl: Controller, work: nn.Module, state: ControllerState, options: list[Option], version: int
              ) -> tuple[nn.Module, StepRecord, list[Verdict], Option]:
    """Try every option at once; keep the largest within tolerance. Returns the model to go on with (the
    kept size's, else ``work`` as it was), the deciding record (the kept size's, else the smallest's, last
    in the history), its verdicts and its option. The other sizes are recorded before it, as not used."""
    measured = measure_all(ctl, work, state, options)
    judged = [conclude(ctl, state, plan, size, model, metrics, examples, failure, refit)
              for (size, plan, _), (model, metrics, examples, failure, refit) in zip(options, measured)]
    kept = next((i for i, (record, _) in enumerate(judged) if record.accepted), None)
    last = len(options) - 1 if kept is None else kept
    sizes = f"{len(options)} sizes tried at once ({', '.join(f'{s:.1%}' for s, _, _ in options)})"
    for i, (record, _) in enumerate(judged):
        if i == last:
            continue
        if record.accepted:
            record.accepted, record.unused = False, True
            record.reason += f"; not used: the larger {options[last][0]:.1%} is within tolerance too"
        else:
            state.rejected.append(tried_key(version, options[i][1]))
            record.reason += (f": rolled back, {options[last][0]:.1%} tried beside it is kept" if kept is not None
                              else ": rolled back, a smaller size tried beside it")
        state.history.append(record)
    record, verdicts = judged[last]
    state.history.append(record)
    if kept is None:
        record.reason = f"{sizes}, none within tolerance; smallest: {record.reason}"
        return work, record, verdicts, options[last]
    adopt(ctl, measured[kept][0], work, state, options[kept][1])  # (cuts work: the kept size's model goes on)
    record.reason += f"; the largest of {sizes} within tolerance"
    if kept > 0:
        state.step_size = options[kept][0]  # as a run of one size at a time would have shrunk to it
    return measured[kept][0], record, verdicts, options[kept]


__all__ = ["Job", "Runner", "Trial", "WorkerThreadsWarning", "measure_all", "smaller_sizes", "tried_key", "try_sizes"]

