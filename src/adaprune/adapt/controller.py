"""The adaptive loop: step toward the budget, recover, measure, accept or roll back, resize the step.

Every step:

1. re-trace the working model and measure each cluster's *sensitivity*: the metric lost when a
   probe fraction of its channels is masked (no fine-tuning), per unit of cost that saves;
2. allocate: each cluster's removal ratio is proportional to cost saved per metric lost (capped),
   scaled so the step cuts ``step_size`` of the binding cost (exact MACs/params/bytes from a meta
   copy; latency from the calibrated per-group table);
3. remove the channels physically, recover (the task's fine-tune, else BatchNorm recalibration),
   evaluate, measure the costs (latency on the target backend);
4. accept if the metric dropped at most ``tolerance`` below the original (grow the step when there
   is slack), else roll back, halve the step and cap the unit whose cut hurt most (measured at the
   start of the next step, from the probe budget it leaves: :mod:`adaprune.adapt.blame`).

It stops when the budget is met, or when the step has shrunk below ``min_step`` (the budget cannot
be met within tolerance: the best model that keeps the tolerance is returned with a message saying
how far the budget remains). State goes to the run directory after every step.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._check import check_tolerance_scale
from ..allocate import Limits, lowest
from ..allocate.adaptive import ClusterProbe, allocate_adaptive
from ..calls import eval_call
from ..cost import count
from ..cost.budget import Budget, static_values
from ..cost.latency import measure_latency
from ..cost.predict import CostPredictor
from ..errors import ConfigError, NonFiniteError
from ..graph import Graph, Group, trace
from ..importance import default_loss
from ..multitask import calibration_of, task_scores, task_settings
from ..plan import Plan, plan_from_choice
from ..scale.distributed import active, broadcast, on_leader, sync_model
from ..scale.executor import Executor, LocalExecutor
from ..surgery.check import find_broken
from ..task import Criterion, Task
from .alternatives import Trial, smaller_sizes, tried_key, try_sizes
from .attempts import attempt
from .blame import blame, suspects_of
from .bookkeeping import (
    checked,
    compose,
    examine,
    non_finite_metrics,
    non_finite_weights,
    replay,
)
from .config import AdaptConfig
from .edge import at_the_edge, recover_only
from .fill import fill
from .latency_table import LatencyTable
from .noise import Interval, SmallValidationWarning, paired_interval, resolvable
from .probing import Probe, Prober, first_order
from .recovery import Examples, Recovery
from .retime import retime
from .rundir import RunDir
from .state import ControllerState, check_resumable, model_signature, run_settings
from .warm import warm_key, warm_state, warm_step

if TYPE_CHECKING:
    from ..mapping import MappedPlan


@dataclass(frozen=True)
class ProbeMeasure:
    """What a probe evaluates, where the executor runs it (a copy of the task on a Ray worker): the task's
    full evaluation with per-example values, or with ``fraction < 1`` its evaluation of that part of the
    validation data (:meth:`Controller.probed` checks and counts the result)."""

    task: Any
    fraction: float

    def __call__(self, model: nn.Module) -> Any:
        if self.fraction >= 1.0:
            return self.task.evaluate_criteria(model)
        return self.task.evaluate_part(model, self.fraction)


@dataclass(frozen=True)
class Verdict:
    """One criterion's judgement of a step: the point drop of its metric, the number judged against its
    tolerance (the interval's upper end, else the point drop) and the interval."""

    criterion: Criterion
    drop: float
    judged: float
    interval: Interval | None


class Controller(Recovery):
    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        task: Task,  # adapt() made it one (adaprune.task.as_task): every hook is called directly
        budget: Budget,
        config: AdaptConfig,
        ignore: list[str],
        run_dir: RunDir | None,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        warm: MappedPlan | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.model, self.x, self.task, self.budget, self.cfg = model, example_inputs, task, budget, config
        self.warm = warm  # a previous plan mapped onto this model (adaprune.adapt.warm), tried first
        self.ignore, self.run_dir = ignore, run_dir
        self.executor: Executor = executor or LocalExecutor()  # probes, and a step's alternative sizes
        self.trial: Trial | None = None  # what the executor runs for a step's alternative sizes (made once)
        self.loss = loss or default_loss  # for gradient-based criteria (taylor) on the calibration batches
        limits = Limits(min_channels=config.min_channels, round_to=config.round_to)
        # (full evaluations: a step whose model is a probe's masked model reuses it, per-example values included)
        self.prober = Prober(config.probe_ratio, config.probe_budget, limits, ProbeMeasure(task, config.probe_data),
                             self.probed, self.harm, config.reprobe, config.uniform_layers, executor)
        self.evaluations = 0  # calls of the task's evaluation this run (a resumed run starts from the state's)
        self.part_evaluations = 0  # of them, evaluations of part of the validation data (probe_data < 1)
        if config.probe_data < 1.0 and not task.evaluates_parts:
            lacking = [n for n, t in getattr(task, "tasks", {}).items() if not t.evaluates_parts]  # (a MultiTask's)
            who = (f"task {lacking[0]!r} of the MultiTask" if lacking
                   else f"the task ({type(getattr(task, 'wrapped', task)).__name__})")
            raise ConfigError(
                f"probe_data={config.probe_data:g} measures probes on part of the validation data, and {who} has no "
                "evaluate_part(model, fraction): implement it (adaprune.Task.evaluate_part), or leave probe_data at 1"
            )
        self.started = time.monotonic()
        self.lineage = 0  # the weights' lineage: a new one when a step changed the surviving weights
        # what a step is judged on: the task's metric, or one per task of a MultiTask (each its own tolerance)
        self.criteria = [c if c.tolerance is not None else replace(c, tolerance=config.tolerance) for c in task.criteria()]
        self.baseline_values: dict[str, torch.Tensor] = {}  # per criterion, the original model's per-example values
        self.shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
        self.shapes.update({n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)})
        self.sign = 1.0 if task.higher_is_better else -1.0
        bad = non_finite_weights(model)
        if bad:
            raise NonFiniteError(
                f"the model to adapt has non-finite weights: {bad}; adapt measures every step against the "
                "original model, so it must be finite (check how it was trained or loaded)"
            )

    # -- measuring ---------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, float]:
        """``task.evaluate(model)`` checked: a dict of numbers that holds the task's metric (which may
        be NaN or inf: the caller decides what that means)."""
        self.evaluations += 1
        return self.checked(on_leader(self.task.evaluate, model))

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Examples]:
        """:meth:`metrics` plus, per criterion, the per-example values (``task.evaluate_criteria``),
        checked against its metric and the original model's example count (left out when the task
        has none, or the metric is not finite)."""
        return self.examined(on_leader(self.task.evaluate_criteria, model))  # (under torchrun: rank 0's)

    def examined(self, raw: tuple[Any, Mapping[str, Any]]) -> tuple[dict[str, float], Examples]:
        """What ``task.evaluate_criteria`` returned, counted and checked (:meth:`evaluate`)."""
        self.evaluations += 1
        return examine(raw, self.task.metric, self.criteria, self.example_counts())

    def example_counts(self) -> dict[str, int]:
        """Per criterion, how many per-example values the original model's evaluation gave."""
        return {name: t.numel() for name, t in self.baseline_values.items()}

    def probed(self, raw: Any) -> Any:
        """What a probe measured (:class:`ProbeMeasure`'s result, wherever it ran), counted and checked:
        the full evaluation with its per-example values (so a step whose model is a probe's masked model
        reuses it), or, with ``probe_data < 1``, the metrics of that part of the validation data."""
        if self.cfg.probe_data >= 1.0:
            return self.examined(raw)
        self.evaluations += 1
        self.part_evaluations += 1
        return self.checked(raw)

    def probe_now(self, work: nn.Module, state: ControllerState, cached: bool = True) -> dict[str, float]:
        """What probes of ``work`` are measured against: its metrics as measured (:meth:`current_metrics`),
        or with ``probe_data < 1`` its evaluation on the same part of the validation data (once per
        weights and model with ``cached``: through the prober's cache)."""
        if self.cfg.probe_data >= 1.0:
            return self.current_metrics(state)
        return self.prober.unmasked(work, self.lineage if cached else -1, self.canonical(state, Plan()))

    def checked(self, out: Any) -> dict[str, float]:
        return checked(out, self.task.metric)

    def baseline(self, model: nn.Module) -> tuple[dict[str, float], Examples]:
        """The original model's metrics (which every step is measured against: they must be finite) and
        per-example values."""
        metrics, values = self.evaluate(model)
        bad = non_finite_metrics(metrics)
        if bad:
            raise NonFiniteError(
                f"task.evaluate on the original model gave {bad}; adapt measures every step against the "
                "original model's metrics, so they must be finite (check the model, and the task's "
                "evaluation data and loss)"
            )
        return metrics, values

    def judge(self, state: ControllerState, metrics: dict[str, float], values: Examples) -> list[Verdict]:
        """Per criterion, the step's metric drop and, with per-example values, its paired interval; the
        number judged against the criterion's tolerance is the interval's upper end (else the point drop)."""
        out = []
        for c in self.criteria:
            sign = 1.0 if c.higher_is_better else -1.0
            point = sign * (state.baseline[c.metric] - metrics[c.metric])
            now, base = values.get(c.name), self.baseline_values.get(c.name)
            if now is None or base is None or now.numel() != base.numel():
                out.append(Verdict(c, point, point, None))
            else:
                interval = paired_interval(base, now, sign, self.cfg.confidence)
                out.append(Verdict(c, point, interval.high, interval))
        return out

    def said(self, v: Verdict) -> str:
        """A verdict in words: the drop (its interval at the confidence, when measured), the task named
        when there are several."""
        text = (f"metric drop {v.interval.describe()} (upper end at {self.cfg.confidence:.0%} confidence)"
                if v.interval is not None and self.cfg.confidence > 0 else f"metric drop {v.drop:.4f}")
        return f"task {v.criterion.name!r} {text}" if len(self.criteria) > 1 else text

    @staticmethod
    def current_metrics(state: ControllerState) -> dict[str, float]:
        """The working model's metrics as measured on exactly its weights, never measured again: the
        last accepted step's (a rolled-back step restores the model those were measured on), or the
        original model's before any step was accepted."""
        accepted = [h for h in state.history if h.accepted]
        return dict(accepted[-1].metrics if accepted else state.baseline)

    def drop(self, state: ControllerState, metrics: dict[str, float]) -> float:
        return self.sign * (state.baseline[self.task.metric] - metrics[self.task.metric])

    def costs(self, model: nn.Module, repeats: int | None = None) -> dict[str, float]:
        values = static_values(count(model, self.x, disk=False))
        if self.budget.needs_latency:
            lat = on_leader(  # (under torchrun: rank 0's timing, on every process)
                measure_latency, model, self.x, backend=self.budget.backend, threads=self.budget.threads,
                repeats=repeats or self.cfg.latency_repeats,
            )
            values["latency"] = lat.median_ms
        return values

    def binding(self, state: ControllerState, values: dict[str, float]) -> tuple[str, float]:
        limits = self.budget.limits(state.original_costs)
        name = max(limits, key=lambda k: values[k] / max(limits[k], 1e-12))
        return name, limits[name]

    # -- one step ----------------------------------------------------------------------------
    def harm(self, now: dict[str, float], masked: dict[str, float]) -> float:
        """How much masking hurt: the rise of the task's ``loss`` when it reports one that tracks its metric
        (``task.loss_tracks_metric``; smooth, so small differences between clusters are seen), else the
        drop of its metric. A NaN or inf result is the
        most harm there is (``inf``): that cluster is not cut."""
        if len(self.criteria) > 1:  # several tasks: the one that needs the unit most, in units of its tolerance
            worst = 0.0
            for c in self.criteria:
                lost = (1.0 if c.higher_is_better else -1.0) * (now[c.metric] - masked.get(c.metric, math.nan))
                if not math.isfinite(lost):
                    return math.inf
                worst = max(worst, lost / max(float(c.tolerance or 0.0), 1e-6))
            return worst
        if "loss" in now and "loss" in masked and self.task.loss_tracks_metric:
            lost = masked["loss"] - now["loss"]
        else:
            lost = self.sign * (now[self.task.metric] - masked[self.task.metric])
        return max(lost, 0.0) if math.isfinite(lost) else math.inf

    def macs_by_cluster(self, plan: Plan, probes: dict[str, Probe], predictor: CostPredictor) -> dict[str, float]:
        """The MACs ``plan`` saves (exact: counted on the cut model by the predictor), split over the
        clusters it cuts in proportion to their channels removed times their probe's MACs per channel."""
        removed = {g.name: len(g.removed) for g in plan.groups}
        cut = {c: sum(removed.get(g.name, 0) for g in p.groups) for c, p in probes.items()}
        weight = {c: n * max(probes[c].saved["macs"], 0.0) / max(probes[c].channels, 1) for c, n in cut.items() if n}
        if not sum(weight.values()):
            weight = {c: float(n) for c, n in cut.items() if n}
        total = sum(weight.values())
        if not total:
            return {}
        saved = static_values(predictor(Plan()))["macs"] - static_values(predictor(plan))["macs"]
        return {c: saved * w / total for c, w in weight.items()}

    def allocate(self, graph: Graph, scores: dict[str, torch.Tensor], probes: dict[str, Probe],
                 predictor: CostPredictor, field: str, target: float, values: dict[str, float],
                 table: LatencyTable, caps: dict[str, float]) -> tuple[Plan, dict[str, float]]:
        """The step's plan and per-cluster ratios: :func:`~adaprune.allocate.adaptive.allocate_adaptive`
        (ratios ∝ cost saved per metric lost, scaled by bisection to reach ``target``) over this step's probes.

        Each candidate is judged by the channels its plan actually removes (ratios round down to whole
        channels): its exact MACs/params/bytes, or for latency the latency table applied to the exact MACs
        it saves, so a latency budget cuts whenever a MACs budget would. A cluster may lose at most its
        (halved) cap of ``max_group_ratio`` and what keeps its groups at ``min_width``."""
        limits = Limits(min_channels=self.cfg.min_channels, round_to=self.cfg.round_to)
        default_rate = values.get("latency", 0.0) / max(values["macs"], 1.0)

        def evaluate(ratios: dict[str, float]) -> tuple[Plan, float]:
            chosen = {g.name: lowest(scores[g.name], g.size - limits.kept(g.size, int(ratios[c] * g.size)))
                      for c, p in probes.items() for g in p.groups}
            plan = plan_from_choice(graph, chosen)
            if field == "latency":
                saved = self.macs_by_cluster(plan, probes, predictor)
                return plan, values["latency"] - table.predict_saving(saved, default_rate)
            return plan, static_values(predictor(plan))[field]

        found = allocate_adaptive(
            {c: ClusterProbe(p.saved, p.drop) for c, p in probes.items()}, field, target, evaluate,
            caps={c: self.cfg.max_group_ratio * min(caps.get(g.name, 1.0) for g in p.groups)
                  for c, p in probes.items()},
            width_caps={c: min(self.floor_cap(g) for g in p.groups) for c, p in probes.items()},
        )
        return found.candidate, found.ratios

    def floor_cap(self, group: Group) -> float:
        """The most of ``group`` a step may cut and still keep ``min_width`` of its original width."""
        if self.cfg.min_width <= 0:
            return 1.0
        slot = next((s for s in group.slots if s.is_param), group.slots[0])
        original = group.size * self.shapes[slot.tensor][slot.dim] / max(slot.size, 1)
        return max(0.0, 1.0 - self.cfg.min_width * original / group.size)

    def canonical(self, state: ControllerState, plan: Plan) -> str:
        """The name of the model ``plan`` cuts (or masks) from the working model: every channel of the
        original it lacks (the prober's cache key, with the weights' lineage)."""
        removals = copy.deepcopy(state.removals)
        compose(removals, self.shapes, plan)
        return json.dumps(removals, sort_keys=True)

    def step(self, work: nn.Module, state: ControllerState, values: dict[str, float]) -> nn.Module:
        """Try one step; return the working model to continue with (the same, or the restored copy)."""
        torch.manual_seed(self.cfg.seed * 100_003 + state.step)  # every step replays identically on resume
        if at_the_edge(self, state):
            return recover_only(self, work, state)
        field, limit = self.binding(state, values)
        final = state.step_size >= 1.0 - limit / values[field]  # this step aims at the budget itself
        size = min(state.step_size, 1.0 - limit / values[field])  # never aim past the budget
        graph = trace(work, self.x, ignore=self.ignore).without(set(state.protected))
        batches = calibration_of(self.task)  # drawn once per step: a shuffling loader gives other batches per call
        scores = task_scores(self.task, self.cfg.importance, work, graph.groups, self.loss, batches)
        predictor = CostPredictor(work, self.x)
        version = sum(h.accepted for h in state.history)
        estimate = (first_order(work, graph.groups, batches,
                                lambda: task_scores(self.task, "taylor", work, graph.groups, self.loss, batches), scores,
                                self.cfg.importance)
                    if len(graph.groups) > min(self.cfg.probe_budget, self.cfg.reprobe) else None)

        def canonical(probe: Plan) -> str:
            return self.canonical(state, probe)

        measured = self.prober.measured
        probes = self.prober.run(work, graph, scores, predictor, self.probe_now(work, state), self.lineage,
                                 estimate, field, state.probe_ratios, canonical)
        if state.suspects:  # the last step was rolled back: blame it, from the probe budget this step left
            rolled = next((h for h in reversed(state.history) if h.step == state.suspects[0].step), None)
            note = blame(self, work, graph, state, canonical,
                         self.cfg.probe_budget - (self.prober.measured - measured))
            if rolled is not None:
                rolled.reason += note
            graph = graph.without(set(state.protected))
            probes = {c: p for c, p in probes.items() if all(g.name not in state.protected for g in p.groups)}
        table = LatencyTable(state.latency_table)

        def plan_at(at: float, to_budget: bool = False) -> tuple[Plan, dict[str, float]]:
            found, ratios = self.allocate(graph, scores, probes, predictor, field, values[field] * (1.0 - at), values,
                                          table, state.caps)
            if to_budget and not found.is_empty and field != "latency":
                tied = [[g.name for g in p.groups] for p in probes.values()] if self.cfg.uniform_layers else None
                found = fill(found, graph, scores, values[field] * (1.0 - at),
                             lambda p: static_values(predictor(p))[field], self.cfg.round_to, tied)
            return found, ratios

        plan, ratios = plan_at(size, final)
        if plan.is_empty:
            state.done = True
            state.message = self.unmet(state, values, self.why_empty(probes))
            return work
        broken = find_broken(work, plan, graph, self.x)
        if broken:
            state.protected.extend(f.module for f in broken)
            graph = graph.without({f.module for f in broken})  # (the smaller sizes are allocated without them too)
            plan = plan_from_choice(graph, {g.name: list(g.removed) for g in plan.groups})
            if plan.is_empty:  # every group it cut breaks the model: allocate again without them
                return work
        if tried_key(version, plan) in state.rejected:  # rolled back on these very weights before: not measured again
            state.step_size = size * self.cfg.shrink
            return work
        options = smaller_sizes(self, work, state, graph, (size, plan, ratios), version, plan_at)
        if len(options) > 1:  # alternatives=k: the sizes at once, the largest within tolerance kept
            work, record, verdicts, (size, plan, ratios) = try_sizes(self, work, state, options, version)
            snapshot = work
        else:
            snapshot, record, verdicts = attempt(self, work, state, plan, size)
        new_values = record.costs
        if record.accepted:
            if "latency" in values:
                table.calibrate(self.macs_by_cluster(plan, probes, predictor),
                                values["latency"] - new_values["latency"], values["latency"] / max(values["macs"], 1.0))
                state.latency_table = table.table
            if all(v.drop < float(v.criterion.tolerance or 0.0) / 2 for v in verdicts):
                state.step_size = min(self.cfg.max_step, state.step_size * self.cfg.grow)
                record.reason += "; slack left, step grows"
            left = self.cfg.max_iterations - state.step - 1
            if left > 0 and field in new_values and new_values[field] > limit:
                # steps of this size could not reach the budget in the iterations left: take the size that could
                # (each step is still judged against the tolerance, and rolled back past it)
                need = 1.0 - (limit / new_values[field]) ** (1.0 / left)
                if need > state.step_size:
                    state.step_size = min(self.cfg.max_step, need)
                    record.reason += f"; step raised to {state.step_size:.1%} to reach the budget in the {left} steps left"
            return work
        # how many tolerances the step's recovered drop came to (2 where it failed: its cap is halved)
        over = max((v.judged / float(v.criterion.tolerance) for v in verdicts if v.criterion.tolerance), default=2.0)
        state.suspects = suspects_of(plan, probes, ratios, record.step,  # blamed by the next step (adapt/blame.py)
                                     over if math.isfinite(over) else 2.0)
        state.step_size = size * self.cfg.shrink  # strictly smaller than what was just tried
        record.reason += ": rolled back, step halved"
        state.rejected.append(tried_key(version, plan))
        return snapshot

    def limit_reached(self) -> str:
        """Which of ``time_limit`` / ``max_evaluations`` the run has reached (``""``: neither)."""
        elapsed = time.monotonic() - self.started
        if self.cfg.time_limit is not None and elapsed >= self.cfg.time_limit:
            return f"time_limit={self.cfg.time_limit:g} s reached ({elapsed:.1f} s)"
        if self.cfg.max_evaluations is not None and self.evaluations >= self.cfg.max_evaluations:
            return f"max_evaluations={self.cfg.max_evaluations} reached ({self.evaluations} evaluations)"
        return ""

    def why_empty(self, probes: dict[str, Probe]) -> str:
        """Why a step found nothing to cut."""
        if probes and all(math.isinf(p.drop) for p in probes.values()):
            return ("masking any cluster's lowest-importance channels made the metric NaN or inf, "
                    "so none can be cut")
        return "no prunable channels are left outside protected groups"

    def protect(self, state: ControllerState, groups: list[Group], name: str, factor: float = 0.5) -> str:
        """Scale how much the groups that hurt may lose per step by ``factor`` (by default halve it);
        protect them fully once that is under a tenth."""
        caps = [state.caps.get(g.name, 1.0) * factor for g in groups]
        for g, c in zip(groups, caps):
            state.caps[g.name] = c
            if c < 0.1 and g.name not in state.protected:
                state.protected.append(g.name)
        return f", protected {name}" if min(caps) < 0.1 else f", capped {name} at {min(caps):.0%} of the step"

    def unmet(self, state: ControllerState, values: dict[str, float], why: str) -> str:
        return (
            f"budget not met within tolerance ({why}): "
            f"{self.budget.describe(values, state.original_costs)}"
        )

    # -- the loop ----------------------------------------------------------------------------
    def resumable(self, config: dict[str, Any], signature: Any) -> ControllerState:
        """The run directory's state, checked against these settings and this model."""
        assert self.run_dir is not None
        state = self.run_dir.load()
        check_resumable(state, config, signature, str(self.run_dir.path))
        return state

    def run(self, resume: bool) -> tuple[nn.Module, ControllerState]:
        config = run_settings(self.cfg, self.budget, self.ignore, {**task_settings(self.task), **warm_key(self.warm)})
        signature = model_signature(self.model)
        # (under torchrun only rank 0 holds the run directory: it reads and checks, the others receive)
        resumed = broadcast(resume and self.run_dir is not None and self.run_dir.exists())
        if resumed:
            state = on_leader(self.resumable, config, signature)
            work = copy.deepcopy(self.model)
            replay(work, state, str(self.run_dir.path) if self.run_dir is not None else "the run directory")
            if self.run_dir is not None:
                self.run_dir.load_weights(state, work)
            sync_model(work)
            self.evaluations, self.part_evaluations = state.evaluations, state.part_evaluations
            if state.stopped:  # a run ended by a limit goes on, under the limits it is resumed with
                state.done, state.stopped, state.message = False, "", ""
            if state.baseline_examples:
                self.baseline_values[""] = torch.tensor(state.baseline_examples, dtype=torch.float64)
            for name, kept in state.task_examples.items():
                self.baseline_values[name] = torch.tensor(kept, dtype=torch.float64)
        else:
            work = copy.deepcopy(self.model)
            state = ControllerState(step_size=self.cfg.step, config=config, signature=signature)
            self.task.set_teacher(self.model)  # before anything is measured: a distilling task measures against it
            state.baseline, self.baseline_values = self.baseline(work)  # finite, or NonFiniteError
            for c in self.criteria:  # (a percentage meant as a fraction, found before anything is cut)
                check_tolerance_scale(float(c.tolerance or 0.0), state.baseline[c.metric], c.metric,
                                      f"task {c.name!r}: " if c.name else "")
            for c in self.criteria:
                if c.name not in self.baseline_values:
                    continue
                base = self.baseline_values[c.name]
                if c.name:
                    state.task_examples[c.name] = base.tolist()
                else:
                    state.baseline_examples = base.tolist()
                small = resolvable(base, float(c.tolerance or 0.0), self.cfg.confidence)
                if small and self.cfg.confidence > 0:
                    small = f"task {c.name!r}: {small}" if c.name else small
                    warnings.warn(small, SmallValidationWarning, stacklevel=3)  # (user -> adapt -> run)
                    state.warnings.append(small)
            state.evaluations, state.part_evaluations = self.evaluations, self.part_evaluations
            # every relative latency bound is a fraction of this one number: measured three times as long
            state.original_costs = self.costs(work, repeats=3 * self.cfg.latency_repeats)
            if self.warm is not None:  # (what did not map: in state.warm, warned by adapt())
                state.warm = warm_state(self.warm)
            if self.run_dir is not None:
                self.run_dir.save(state, work)
        if resumed:
            self.task.set_teacher(self.model)  # (a fresh run set it before measuring the original)
        values = self.costs(work) if state.history else dict(state.original_costs)
        while not state.done:
            if self.budget.met(values, state.original_costs) and retime(self, work, state, values):
                state.done, state.message = True, "budget met: " + self.budget.describe(values, state.original_costs)
                if state.warm is not None and not state.warm["outcome"]:
                    state.warm["outcome"] = "not tried"  # the budget held before the previous plan was needed
                break
            if state.step_size < self.cfg.min_step or state.step >= self.cfg.max_iterations:
                state.done = True
                why = ("the step cannot shrink further" if state.step_size < self.cfg.min_step
                       else f"max_iterations={self.cfg.max_iterations} steps taken")
                state.message = self.unmet(state, values, why)
                break
            limit = broadcast(self.limit_reached())  # (under torchrun: rank 0's clock and count decide)
            if limit:
                state.done, state.stopped = True, limit
                state.message = self.unmet(state, values, f"stopped: {limit}; the last accepted model is returned")
                break
            warming = state.warm is not None and not state.warm["outcome"]
            work = warm_step(self, work, state, values) if warming else self.step(work, state, values)
            state.step += 1
            state.evaluations, state.part_evaluations = self.evaluations, self.part_evaluations
            if state.history and state.history[-1].accepted and state.history[-1].step == state.step - 1:
                values = dict(state.history[-1].costs)
            if active():  # every process goes on from rank 0's state (they cannot have drifted, and must not)
                state = broadcast(state)
            if self.run_dir is not None:
                self.run_dir.save(state, work)
        if self.run_dir is not None:
            self.run_dir.save(state, work)  # the final state says done, with the message
        eval_call(work, self.x)
        return work, state
