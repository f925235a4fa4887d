"""Probing: what each prunable unit's cut would cost the task, measured where it matters.

A *unit* is what the allocator gives one ratio: a single group (each layer's heads, each layer's FFN
neurons, each conv's channels), so layers that are built alike are still told apart by what cutting
them costs. A probe masks ``probe_ratio`` of the unit's lowest-scored channels and measures the harm
(:meth:`Prober.harm`: the rise of the task's loss, else the drop of its metric) and the cost saved.

Measuring is the expensive part (one ``task.evaluate`` per unit), so it has a budget,
``probe_budget`` measured probes per step:

- with at most ``probe_budget`` units, every unit is measured;
- with more, a first-order estimate ranks every unit: the summed first-order Taylor importance
  |w · dL/dw| of the channels its probe would mask (Molchanov et al., 2019), from the task's
  calibration batches. The ``probe_budget`` units with the highest estimated cost saved per harm (the
  ones the allocator would cut most, where a wrong estimate costs most) are measured. Every measured
  unit's ratio of measured to estimated harm is kept for the later steps (``ratios``, saved in the
  run's state), since first-order estimates are off per layer in a way that persists (a residual
  branch's Taylor score misjudges it step after step); a unit not measured this step gets its estimate
  times its own latest ratio, or, never measured, the median ratio of this step's measured units. So
  later steps re-measure only the units the allocator would now cut most;
- with more units and no estimate (the task has no calibration batches, or its loss does not fit the
  model's output), units built alike are measured together as one cluster
  (:func:`adaprune.sensitivity.clusters`) and share their cluster's ratio.

Every measured probe's metrics are cached per (weights lineage, masked model): the caller names the
masked model canonically (the controller: every channel removed from the original so far plus the
probe's, so a probe on the next step's weights that leaves the very same channels, which happens when a
step only removed channels the previous probe had masked, is the same model), and the lineage changes
only when a step changed the surviving weights (recovery, refit, BatchNorm statistics). After a
rolled-back step the same weights are never probed again.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..allocate import Limits, lowest
from ..cost.budget import static_values
from ..cost.predict import CostPredictor
from ..errors import ConfigError, NonFiniteError, TraceError
from ..graph import Graph, Group
from ..plan import Plan, plan_from_choice
from ..scale.executor import Executor, Failed, LocalExecutor
from ..sensitivity import clusters


@dataclass
class Probe:
    """One unit's probe: its groups, the harm of masking its lowest-scored channels, the cost that
    saves per field, the channels masked, and whether the harm was measured (else estimated)."""

    groups: list[Group]
    drop: float
    saved: dict[str, float]
    channels: int = 1
    measured: bool = True


def units(work: nn.Module, graph: Graph, budget: int, can_estimate: bool, tied: bool = False) -> dict[str, list[Group]]:
    """The units of this step: one per group, or clusters of groups built alike when there are more
    groups than the probe budget and no first-order estimate to choose which to measure, or always with
    ``tied`` (``uniform_layers``: layers built alike keep equal widths)."""
    if not tied and (len(graph.groups) <= budget or can_estimate):
        return {g.name: [g] for g in graph.groups}
    return clusters(work, graph.groups)


class Prober:
    """Measures probes for the controller, within the probe budget, with a cache across steps.

    ``measure(model)`` is what a probe evaluates (it runs where the executor runs it, so it must pickle for
    Ray), ``finish(raw)`` turns its result into what the cache keeps (checked and counted, here), and the
    executor (:mod:`adaprune.scale`) runs a step's probes, all at once."""

    def __init__(self, probe_ratio: float, budget: int, limits: Limits,
                 measure: Callable[[nn.Module], Any], finish: Callable[[Any], Any],
                 harm: Callable[[dict[str, float], dict[str, float]], float],
                 reprobe: int | None = None, tied: bool = False, executor: Executor | None = None):
        self.ratio, self.budget, self.limits, self.tied = probe_ratio, budget, limits, tied
        self.reprobe = budget if reprobe is None else reprobe
        self.measure_fn, self.finish, self.harm = measure, finish, harm
        self.executor: Executor = executor or LocalExecutor()
        # (lineage, masked model) -> what ``finish`` returned (a metrics dict, or the controller's
        # (metrics, per-example values)); None: NaN or inf
        self.cache: dict[tuple[int, str], Any] = {}
        self.measured = 0  # probes evaluated (not served from the cache)
        self.run_id = uuid.uuid4().hex  # names this run's models for an executor that outlives the run

    def evaluate(self, work: nn.Module, jobs: list[tuple[tuple[int, str], Plan]], token: Any = None) -> None:
        """Measure every job (cache key, plan to mask) not in the cache yet (all of them for a negative
        lineage), through the executor, and cache what each gave (None: NaN or inf)."""
        todo: dict[tuple[int, str], Plan] = {}
        for key, plan in jobs:
            if (key[0] < 0 or key not in self.cache) and key not in todo:
                todo[key] = plan
        if not todo:
            return
        found = self.executor.map(work, list(todo.values()), self.measure_fn, catch=(NonFiniteError,), token=token)
        for key, raw in zip(todo, found):
            self.measured += 1
            try:  # the task refused a NaN loss: as harmful as can be
                self.cache[key] = None if isinstance(raw, Failed) else self.finish(raw)
            except NonFiniteError:
                self.cache[key] = None

    def harm_of(self, key: tuple[int, str], metrics_now: dict[str, float]) -> float:
        masked = self.cache[key]
        if masked is None:
            return math.inf
        return self.harm(metrics_now, masked[0] if isinstance(masked, tuple) else masked)

    def plan(self, members: list[Group], scores: dict[str, torch.Tensor],
             predictor: CostPredictor) -> tuple[list[Group], dict[str, list[int]], Plan, dict[str, float]] | None:
        """A unit's probe: its members, the channels cut, the plan and the plan's predicted costs.

        Members whose cut makes the model fail to run (a size written in the code, which tracing cannot
        see) are left out, so the others can still be probed and cut; ``None`` when no member is left or
        nothing would be cut."""

        def probe(ms: list[Group]) -> tuple[dict[str, list[int]], Plan]:
            chosen = {g.name: lowest(scores[g.name], g.size - self.limits.kept(g.size, int(self.ratio * g.size)))
                      for g in ms}
            return chosen, plan_from_choice(Graph(ms), chosen)

        def costs(plan: Plan) -> dict[str, float] | None:
            try:
                return static_values(predictor(plan))
            except TraceError:
                return None

        chosen, plan = probe(members)
        after = None if plan.is_empty else costs(plan)
        if after is None and not plan.is_empty:
            members = [g for g in members if costs(probe([g])[1]) is not None]
            chosen, plan = probe(members)
            after = None if plan.is_empty else costs(plan)
        return None if after is None else (members, chosen, plan, after)

    def measure(self, work: nn.Module, plan: Plan, metrics_now: dict[str, float], version: int,
                name: str | None = None) -> float:
        """The harm of masking ``plan`` on ``work``: its metrics cached per (``version``, ``name``, the
        masked model's canonical name, by default the plan itself)."""
        key = (version, plan.to_json() if name is None else name)
        self.evaluate(work, [(key, plan)])
        return self.harm_of(key, metrics_now)

    def unmasked(self, work: nn.Module, version: int, name: str) -> dict[str, float]:
        """``work``'s own metrics as probes measure them, cached per (``version``, ``name``: the model's
        canonical name), as the reference of the probes' harm when probes see part of the data."""
        key = (version, name)
        got = self.cache.get(key) if version >= 0 else None
        if got is None:
            token = (self.run_id, *key) if version >= 0 else None
            raw = self.executor.map(work, [Plan()], self.measure_fn, token=token)[0]
            got = self.finish(raw)
            out: dict[str, float] = got[0] if isinstance(got, tuple) else got
            if not math.isfinite(self.harm(out, out)):  # nothing to measure the probes' harm against
                raise NonFiniteError(
                    f"the current model's metrics on the probes' part of the validation data (probe_data) are "
                    f"not finite ({out}), though they measured finite on all of it: raise probe_data so the part "
                    "holds enough examples"
                )
            if version >= 0:
                self.cache[key] = got
        return got[0] if isinstance(got, tuple) else got

    def run(self, work: nn.Module, graph: Graph, scores: dict[str, torch.Tensor], predictor: CostPredictor,
            metrics_now: dict[str, float], version: int, estimate: dict[str, torch.Tensor] | None,
            field: str, ratios: dict[str, float] | None = None,
            canonical: Callable[[Plan], str] | None = None) -> dict[str, Probe]:
        """Every unit's probe: measured, or (beyond the budget) estimated and calibrated on the measured.

        ``ratios`` (unit -> measured / estimated harm at its latest measurement) calibrates the units not
        measured now and is updated in place with this step's measurements; ``canonical`` names the model a
        probe plan masks, for the cache (by default the plan)."""
        ratios = {} if ratios is None else ratios
        now = static_values(predictor(Plan()))
        planned: dict[str, tuple[list[Group], dict[str, list[int]], Plan, dict[str, float]]] = {}
        for name, members in units(work, graph, self.budget, estimate is not None, self.tied).items():
            found = self.plan(members, scores, predictor)
            if found is not None:
                planned[name] = found
        # the first step measures up to probe_budget units; later ones, with calibrated estimates, reprobe
        limit = min(self.reprobe, self.budget) if ratios else self.budget
        guess: dict[str, float] = {}
        chosen_units = set(planned)
        if estimate is not None:
            for name, (members, chosen, _, _) in planned.items():
                guess[name] = sum(float(estimate[g].reshape(-1)[chosen[g]].sum()) for g in chosen if g in estimate)
            key = "macs" if field == "latency" else field

            def worth(name: str) -> float:  # estimated cost saved per harm: what the allocator would cut most
                saved = max(now.get(key, 0.0) - planned[name][3].get(key, 0.0), 0.0)
                return saved / (ratios.get(name, 1.0) * guess[name] + 1e-12)

            if len(planned) > limit:
                chosen_units = set(sorted(planned, key=worth, reverse=True)[:limit])
        keys = {name: (version, plan.to_json() if canonical is None else canonical(plan))
                for name, (_, _, plan, _) in planned.items() if name in chosen_units}
        # every unit measured now goes to the executor at once (the masks are independent of each other)
        self.evaluate(work, [(keys[name], planned[name][2]) for name in keys],
                      None if canonical is None or version < 0 else (self.run_id, version, canonical(Plan())))
        out: dict[str, Probe] = {}
        for name, (members, chosen, plan, after) in planned.items():
            drop = self.harm_of(keys[name], metrics_now) if name in chosen_units else math.nan
            channels = sum(len(c) for c in chosen.values())
            out[name] = Probe(members, drop, {k: now[k] - after[k] for k in now}, channels, name in chosen_units)
        if guess:
            # (a measured improvement is noise around no harm: ratio 0, so the unit ranks first to be re-measured)
            now_ratios = {n: max(out[n].drop, 0.0) / guess[n] for n in chosen_units
                          if guess[n] > 0 and math.isfinite(out[n].drop)}
            factor = statistics.median(now_ratios.values()) if now_ratios else 1.0
            for name, p in out.items():
                if not p.measured:
                    p.drop = ratios.get(name, factor) * guess[name]
            ratios.update(now_ratios)
        return out


def first_order(work: nn.Module, groups: list[Group], batches: Any, taylor: Callable[[], dict[str, torch.Tensor]],
                scores: dict[str, torch.Tensor], importance: str) -> dict[str, torch.Tensor] | None:
    """Per-channel first-order Taylor estimates of the loss each channel's removal costs (the step's own
    scores when the criterion is already ``taylor``; else ``taylor()``); None when the task gives no
    calibration batches or its loss does not fit the model's output (the prober then clusters what it
    cannot measure)."""
    if importance == "taylor":
        return scores
    if batches is None:
        return None
    try:
        found: dict[str, torch.Tensor] = taylor()  # the task's Taylor scores (per task, combined, for a MultiTask)
    except (ConfigError, NonFiniteError):
        return None
    return found


__all__ = ["Probe", "Prober", "first_order", "units"]
