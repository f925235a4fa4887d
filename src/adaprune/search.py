"""Per-cluster pruning ratios under a budget: from a sensitivity table, or found by search.

Both turn a static budget (MACs, params, bytes, energy) into one plan, cutting each cluster of groups
built alike (:func:`adaprune.sensitivity.clusters`) by its own ratio, its lowest-importance channels first,
with every candidate's cost exact (:class:`~adaprune.cost.predict.CostPredictor`):

- :func:`allocate_from_sensitivity`: the ratios adapt's controller would take from probes (cost saved per
  metric lost, softened, scaled to the budget: :func:`adaprune.allocate.adaptive.allocate_adaptive`), with
  each cluster's probe read off a :class:`~adaprune.sensitivity.Sensitivity` table, and the budget's leftover
  whole channels given back the same way as the search's. It costs the table's evaluations (clusters x
  ratios + 1) and nothing more.
- :func:`search`: a search over the clusters' *weights*, each cluster's ratio being ``min(max_ratio, scale *
  weight)`` with ``scale`` bisected so the plan meets the budget; each candidate plan is evaluated with its
  channels masked (no fine-tuning), as sensitivity evaluates, and the best one is kept, the whole channels
  that rounding left of the budget then given back as adapt's last step gives them back. The sampler is
  Optuna's TPE (Bergstra et al., 2011; the ``search`` extra), asked ``parallel`` candidates at a time (with
  the constant liar for the ones still out), which the executor evaluates at once (``executor="ray"`` spreads
  them over Ray workers). The first candidate is the uniform allocation (every weight 1). Each evaluation is
  of a new plan: the caps and whole channels map many weights to one plan, and a sampled candidate that repeats
  an evaluated one is told that value without costing an evaluation (2 and 4 of a 28-trial search's evaluations
  on MNIST-1D, seeds 0 and 1, were repeats before).
  NetAdapt (Yang et al., 2018) and AMC (He et al., 2018) are the field's anchors for searching layer-wise
  ratios under a resource budget; this is the black-box form of that search, with a fixed number of
  evaluations so it can be compared with the sensitivity allocator at equal cost.
- ``search(method="netadapt")``: NetAdapt's greedy path. ``trials // clusters`` steps to the budget, each step's
  budget geometrically nearer it; in each, one candidate per cluster (that cluster's ratio growing ``gamma``
  times as fast as the others' from the ratios kept so far), the best-judged kept. Judging the earlier steps at
  milder budgets is its point: at a deep cut every masked candidate can be near chance. Unlike NetAdapt it
  does not fine-tune between steps (every candidate is judged from the original weights, as sensitivity's
  probes are); adapt is the place for that. No Optuna needed.

A search's results do not depend on the executor: the sampler sees the same candidates in the same order,
and each evaluation starts from the same seed (:mod:`adaprune.scale`).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._check import (
    as_bool,
    as_float,
    as_int,
    check_callable,
    check_choice,
    check_inputs,
    check_instance,
    check_module,
)
from .adapt.fill import fill
from .allocate import Limits, get_allocator
from .allocate.adaptive import ClusterProbe, allocate_adaptive
from .allocate.search import bisect
from .cost.budget import Budget, static_values
from .cost.predict import CostPredictor
from .errors import BudgetUnreachableError, ConfigError
from .graph import Graph, Group, ignore_items, trace
from .importance import Context, get_importance
from .plan import Plan, plan_from_choice
from .scale import get_executor
from .sensitivity import Sensitivity, _number, clusters
from .task import recalibrate_bn

STEPS = 16
"""Bisection steps of the scale that meets the budget."""
ASKS = 10
"""A search asks its sampler for at most ``ASKS * trials`` candidates: the sampled weights that give a plan already
evaluated (caps and whole channels map many weights to one plan) are told its value without another evaluation."""


class _Space:
    """One model's clusters, their channel ranking, and plans per cluster ratio with exact costs."""

    def __init__(self, model: nn.Module, example_inputs: Any, budget: Budget, importance: Any, ignore: Any,
                 calibration: Any, limits: Limits, graph: Graph | None) -> None:
        check_instance(budget, Budget, "budget", "an adaprune.Budget", "e.g. budget=adaprune.Budget(macs=0.125)")
        budget.refuse_disk("search")
        if budget.needs_latency:
            raise ConfigError("search and allocate_from_sensitivity need a static budget (macs, params, bytes or "
                              "energy): latency is measured, not counted, per candidate; use adapt for a latency budget")
        self.graph = graph or trace(model, example_inputs, ignore=ignore)
        self.scores = get_importance(importance)(model, self.graph.groups, Context(calibration))
        self.units: dict[str, list[Group]] = clusters(model, self.graph.groups)
        self.limits, self.budget = limits, budget
        self.predictor = CostPredictor(model, example_inputs)
        self.base = static_values(self.predictor(Plan()))
        self.uniform = get_allocator("uniform")

    def plan(self, ratios: dict[str, float]) -> Plan:
        chosen: dict[str, list[int]] = {}
        for name, members in self.units.items():
            if ratios.get(name, 0.0) > 0:
                chosen.update(self.uniform(members, self.scores, self.limits, ratio=min(ratios[name], 1.0 - 1e-9)))
        return plan_from_choice(self.graph, chosen)

    def costs(self, plan: Plan) -> dict[str, float]:
        return static_values(self.predictor(plan))

    def met(self, plan: Plan) -> bool:
        return self.budget.met(self.costs(plan), self.base)

    def binding(self) -> tuple[str, float]:
        limits = self.budget.limits(self.base)
        name = min(limits, key=lambda k: limits[k] / max(self.base[k], 1e-12))
        return name, limits[name]

    def reachable(self, plan: Plan | None = None) -> None:
        """BudgetUnreachableError unless ``plan`` (by default every cluster cut to its cap) meets the budget."""
        cap = self.limits.max_ratio
        plan = self.plan({c: cap for c in self.units}) if plan is None else plan
        if not self.met(plan):
            raise BudgetUnreachableError(
                f"the budget cannot be met with every cluster cut to max_ratio={cap:g}: that gives "
                f"{self.budget.describe(self.costs(plan), self.base)}; raise max_ratio or ask for less"
            )

    def scaled(self, weights: dict[str, float]) -> tuple[Plan, dict[str, float]]:
        """The least ``scale`` whose ratios ``min(max_ratio, scale * weight)`` meet the budget, its plan and
        ratios; BudgetUnreachableError when every cluster at its cap does not."""
        cap = self.limits.max_ratio
        top = cap / max(min(weights.values()), 1e-6)

        def at(scale: float) -> tuple[Plan, dict[str, float]]:
            ratios = {c: min(cap, scale * w) for c, w in weights.items()}
            return self.plan(ratios), ratios

        hi = at(top)
        self.reachable(hi[0])
        if self.met(Plan()):
            return Plan(), {c: 0.0 for c in weights}
        return bisect(at, lambda cand: self.met(cand[0]), 0.0, top, hi, STEPS)[1]

    def stepped(self, start: dict[str, float], rates: dict[str, float],
                met: Callable[[Plan], bool]) -> tuple[Plan, dict[str, float]]:
        """The least ``s`` whose ratios ``min(max_ratio, start + s * rate)`` give a plan that is ``met``, its plan
        and ratios (every cluster at its cap must be ``met``: the caller checks the final budget is reachable)."""
        cap = self.limits.max_ratio

        def at(s: float) -> tuple[Plan, dict[str, float]]:
            ratios = {c: min(cap, start[c] + s * r) for c, r in rates.items()}
            return self.plan(ratios), ratios

        top = cap / min(rates.values())
        return bisect(at, lambda cand: met(cand[0]), 0.0, top, at(top), STEPS)[1]

    def fill(self, plan: Plan) -> Plan:
        """``plan`` with the whole channels that rounding left of the budget given back (adapt's last-step
        :func:`~adaprune.adapt.fill.fill`, against the tightest of the budget's bounds). It prices channels
        group by group (seconds on a ResNet-50: some hundred exact counts), so it is done once per result,
        not per candidate."""
        limits = self.budget.limits(self.base)

        def load(p: Plan) -> float:
            costs = self.costs(p)
            return max(costs[k] / max(v, 1e-12) for k, v in limits.items() if k in costs)

        return fill(plan, self.graph, self.scores, 1.0 + 1e-12, load, self.limits.round_to)


def _checked(model: nn.Module, example_inputs: Any, graph: Graph | None) -> None:
    check_module(model)
    if graph is None:
        check_inputs(example_inputs)
    else:
        check_instance(graph, Graph, "graph", "an adaprune.Graph (from adaprune.trace) or None")


def allocate_from_sensitivity(
    model: nn.Module, example_inputs: Any, table: Sensitivity, budget: Budget, *, importance: Any = "l2",
    ignore: Iterable[nn.Module | str] | None = None, calibration: Iterable[tuple[Any, Any]] | None = None,
    max_ratio: float = 0.9, min_channels: int = 1, round_to: int = 1, graph: Graph | None = None,
) -> Plan:
    """The plan that meets ``budget`` with per-cluster ratios from a sensitivity table (the module's doc).

    Each cluster's probe is its curve's harm per fraction cut (the mean over the table's ratios of the
    metric lost, divided by the ratio) against the cost that fraction saves; the table must come from
    :func:`adaprune.sensitivity` on this model with ``cluster=True`` and the same ``importance``."""
    _checked(model, example_inputs, graph)
    check_instance(table, Sensitivity, "table", "an adaprune.Sensitivity (from adaprune.sensitivity)")
    space = _Space(model, example_inputs, budget, importance, ignore_items(ignore), calibration,
                   Limits(max_ratio=max_ratio, min_channels=min_channels, round_to=round_to), graph)
    missing = sorted(set(space.units) - {r.cluster for r in table.rows})
    if missing:
        raise ConfigError(f"the sensitivity table has no curve for cluster(s) {missing[:3]}: compute it on this model "
                          "with cluster=True and the same ignore=")
    field_, target = space.binding()
    probes: dict[str, ClusterProbe] = {}
    for name in space.units:
        curve = table.curve(name)
        harm = sum(max(table.baseline - m, 0.0) / r for r, m in curve if r > 0) / max(len(curve), 1)
        half = space.costs(space.plan({name: 0.5}))
        probes[name] = ClusterProbe({k: 2.0 * (space.base[k] - half[k]) for k in space.base}, harm)

    def evaluate(ratios: dict[str, float]) -> tuple[Plan, float]:
        plan = space.plan(ratios)
        return plan, space.costs(plan)[field_]

    caps = {name: max_ratio for name in space.units}
    found = allocate_adaptive(probes, field_, target, evaluate, caps=caps)
    space.reachable(found.candidate)
    return space.fill(found.candidate)


class Recalibrated:
    """``evaluate`` of a candidate after its BatchNorm statistics are re-estimated on ``batches`` (adaptive
    BatchNorm, as EagleEye, Li et al. 2020, evaluates pruning candidates: a cut model's old statistics say
    little about what fine-tuning will recover); the model's buffers are put back afterwards. Picklable when
    ``evaluate`` is, so it runs on Ray workers too; use it for every method of a comparison alike."""

    def __init__(self, evaluate: Callable[[nn.Module], float], batches: Iterable[tuple[Any, Any]],
                 max_batches: int = 8) -> None:
        self.evaluate, self.batches, self.max_batches = evaluate, list(batches), max_batches

    def __call__(self, model: nn.Module) -> float:
        saved = {name: b.detach().clone() for name, b in model.named_buffers()}
        try:
            recalibrate_bn(model, self.batches, self.max_batches)
            return self.evaluate(model)
        finally:
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


class Tuned:
    """``evaluate`` of a candidate after ``steps`` optimizer steps of ``task.finetune`` on the masked model (the
    masked channels stay zero), its weights and buffers put back afterwards: NetAdapt's short-term fine-tune
    (Yang et al., 2018), which judges a candidate by what a little recovery makes of it rather than by the cut
    alone. Costs ``steps`` optimizer steps per evaluation; picklable when the task and ``evaluate`` are. For the
    same numbers on every executor, the task's training loader should shuffle with the global generator (which
    each evaluation seeds), not a generator of its own (whose state differs from worker to worker)."""

    def __init__(self, evaluate: Callable[[nn.Module], float], task: Any, steps: int) -> None:
        self.evaluate, self.task = evaluate, task
        self.steps = as_int(steps, "steps", low=1, hint="optimizer steps per candidate")

    def __call__(self, model: nn.Module) -> float:
        saved = {name: t.detach().clone() for name, t in model.state_dict().items()}
        try:
            with torch.enable_grad():
                self.task.finetune(model, self.steps)
            return self.evaluate(model)
        finally:
            model.load_state_dict(saved)


@dataclass
class Trial:
    """One evaluated candidate: the sampler's weights (NetAdapt: each cluster's rate in that step, the favoured
    one's ``gamma``), the ratios, the metric, the costs, the plan that was evaluated (before any fill: e.g. to
    fine-tune the top few and keep the best of those), and whether it meets the search's budget (NetAdapt's
    earlier steps' candidates meet milder ones)."""

    number: int
    weights: dict[str, float]
    ratios: dict[str, float]
    metric: float
    costs: dict[str, float]
    plan: Plan = field(default_factory=Plan)
    final: bool = True


@dataclass
class SearchResult:
    """The best plan a search found (with the whole channels left of the budget given back: ``metric`` is its
    candidate's, measured before), its metric, and every evaluated trial in the order they were asked (each a
    different plan)."""

    plan: Plan
    metric: float
    trials: list[Trial] = field(default_factory=list)
    repeats: int = 0
    """Sampled candidates whose plan had been evaluated already: told its value, not evaluated again."""

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    @property
    def best(self) -> Trial:
        """The trial with the highest metric among those that meet the budget."""
        return max((t for t in self.trials if t.final), key=lambda t: t.metric)


class _Judge:
    """Evaluates plans on the executor, each plan once: a plan seen before (keyed by its JSON) or twice in one
    batch is told the stored value and costs no evaluation."""

    def __init__(self, runner: Any, model: nn.Module, evaluate: Callable[[nn.Module], float], out: SearchResult) -> None:
        self.runner, self.model, self.evaluate, self.out = runner, model, evaluate, out
        self.seen: dict[str, float] = {}
        self.token = ("search", uuid.uuid4().hex)  # (the model does not change during the search: shipped once)

    def __call__(self, plans: list[Plan]) -> tuple[list[float], list[bool]]:
        """Each plan's metric, and whether it was evaluated (new) or told."""
        keys = [p.to_json() for p in plans]
        new: dict[str, Plan] = {}
        for k, p in zip(keys, plans):
            if k not in self.seen and k not in new:
                new[k] = p
        values = self.runner.map(self.model, list(new.values()), self.evaluate, token=self.token) if new else []
        self.seen.update({k: _number(v) for k, v in zip(new, values)})
        fresh = set(new)
        first = [k in fresh and keys.index(k) == i for i, k in enumerate(keys)]
        self.out.repeats += first.count(False)
        return [self.seen[k] for k in keys], first

    def record(self, space: _Space, weights: dict[str, float], ratios: dict[str, float], plan: Plan, metric: float,
               final: bool) -> None:
        out = self.out
        out.trials.append(Trial(len(out.trials), weights, ratios, metric, space.costs(plan), plan, final))
        if final and metric > out.metric:
            out.plan, out.metric = plan, metric


def _tpe(space: _Space, judge: _Judge, trials: int, parallel: int, seed: int, min_weight: float) -> None:
    import optuna

    names = list(space.units)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=max(1, min(10, trials // 4)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({f"w{i}": 1.0 for i in range(len(names))})  # the uniform allocation first
    out, asks = judge.out, 0
    while len(out.trials) < trials and asks < trials * ASKS:
        made: list[tuple[Any, dict[str, float], Plan, dict[str, float], str]] = []
        twins: list[tuple[Any, str]] = []  # repeats of a plan asked in this same batch: told once it is known
        while len(made) < min(parallel, trials - len(out.trials)) and asks < trials * ASKS:
            t = study.ask()
            asks += 1
            weights = {n: t.suggest_float(f"w{i}", min_weight, 1.0) for i, n in enumerate(names)}
            plan, ratios = space.scaled(weights)
            key = plan.to_json()
            if key in judge.seen:
                study.tell(t, judge.seen[key])
                out.repeats += 1
            elif any(key == m[4] for m in made):
                twins.append((t, key))
                out.repeats += 1
            else:
                made.append((t, weights, plan, ratios, key))
        values, _ = judge([m[2] for m in made])
        for (t, weights, plan, ratios, _key), value in zip(made, values):
            study.tell(t, value)
            judge.record(space, weights, ratios, plan, value, True)
        for t, key in twins:
            study.tell(t, judge.seen[key])


def _netadapt(space: _Space, judge: _Judge, trials: int, gamma: float) -> None:
    """NetAdapt's greedy path (Yang et al., 2018): ``trials // clusters`` steps, each to a budget geometrically
    nearer the target (the binding field's limit ``base * (limit / base) ** (t / T)``; the last step meets the whole
    budget); in each step one candidate per cluster, that cluster's ratio growing ``gamma`` times as fast as the
    others' from the ratios kept so far; the best-judged candidate is kept. The masked judge reads the earlier,
    milder steps where a cut model still says something, rather than only the target, where at a deep cut every
    candidate may be near chance."""
    names = list(space.units)
    steps = trials // len(names)
    if steps < 1:
        raise ConfigError(f"search(method='netadapt') judges one candidate per cluster a step: trials={trials} is fewer "
                          f"than the model's {len(names)} clusters; pass trials >= {len(names)}")
    field_, limit = space.binding()
    start = space.base[field_]
    ratios = {n: 0.0 for n in names}
    for t in range(1, steps + 1):
        target = start * (limit / start) ** (t / steps)
        final = t == steps

        def met(plan: Plan, target: float = target, final: bool = final) -> bool:
            return space.met(plan) if final else space.costs(plan)[field_] <= target * (1 + 1e-9)

        proposals = []
        for c in names:
            rates = {n: gamma if n == c else 1.0 for n in names}
            plan, r = space.stepped(ratios, rates, met)
            proposals.append((rates, plan, r))
        values, first = judge([p[1] for p in proposals])
        for (rates, plan, r), value, new in zip(proposals, values, first):
            if new:
                judge.record(space, rates, r, plan, value, final)
        keep = max(range(len(proposals)), key=lambda i: values[i])
        ratios = proposals[keep][2]
        if final:
            judge.out.plan, judge.out.metric = proposals[keep][1], values[keep]


METHODS = ("tpe", "netadapt")


def search(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    budget: Budget,
    *,
    trials: int = 64,
    method: str = "tpe",
    parallel: int = 2,
    importance: Any = "l2",
    ignore: Iterable[nn.Module | str] | None = None,
    calibration: Iterable[tuple[Any, Any]] | None = None,
    max_ratio: float = 0.9,
    min_channels: int = 1,
    round_to: int = 1,
    min_weight: float = 0.05,
    gamma: float = 3.0,
    recalibrate: bool = False,
    seed: int = 0,
    executor: Any = None,
    graph: Graph | None = None,
) -> SearchResult:
    """Search per-cluster ratios that meet ``budget`` for the highest ``evaluate(masked model)``.

    Args:
        evaluate: ``evaluate(model) -> float``, higher is better (e.g. minus the validation loss), called on the
            model with a candidate's channels masked; it must pickle for Ray.
        trials: how many candidates are evaluated (the search's whole cost in evaluations). Each is a different
            plan: weights that give a plan already evaluated are told its value and asked again, at most
            ``10 * trials`` times in all (fewer evaluations only where the space has fewer plans the sampler finds).
            NetAdapt uses ``clusters * (trials // clusters)`` of them (fewer where a step's candidates repeat).
        method: ``"tpe"`` (Optuna's TPE over the clusters' weights, each candidate at the budget; the ``search``
            extra) or ``"netadapt"`` (a greedy path of ``trials // clusters`` steps to the budget, one candidate per
            cluster a step, the best kept: the module's doc; no extra needed).
        parallel: candidates asked of the TPE sampler at a time, evaluated at once by ``executor`` (the results do
            not depend on the executor, only on ``parallel`` and ``seed``); NetAdapt evaluates a step's at once.
        min_weight: the least weight TPE can give a cluster (its ratio is at least this fraction of the
            most-cut cluster's, before the caps).
        gamma: how many times as fast a NetAdapt candidate's favoured cluster is cut as the others in its step.
        recalibrate: evaluate each candidate after re-estimating its BatchNorm statistics on ``calibration``
            (:class:`Recalibrated`); the score then predicts the fine-tuned model's much better on models with
            BatchNorm.
        seed: the TPE sampler's seed (NetAdapt is deterministic).
        executor: ``None``/``"local"``, ``"ray"`` or an :class:`adaprune.Executor`.

    Returns:
        A :class:`SearchResult` (the model is left as it was).
    """
    _checked(model, example_inputs, graph)
    check_callable(evaluate, "evaluate", "a callable evaluate(model) -> float (higher is better)")
    trials = as_int(trials, "trials", low=1)
    parallel = as_int(parallel, "parallel", low=1)
    seed = as_int(seed, "seed", low=0, high=2**32 - 1)
    method = check_choice(method, "method", METHODS)
    gamma = as_float(gamma, "gamma", low=1.0, low_open=True, hint="a NetAdapt candidate's favoured cluster is cut "
                     "gamma times as fast as the others")
    if method == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError as exc:
            raise ConfigError("search(method='tpe') needs Optuna: pip install 'adaprune[search]' "
                              "(or method='netadapt', which does not)") from exc
    if as_bool(recalibrate, "recalibrate"):
        if calibration is None:
            raise ConfigError("search(recalibrate=True) re-estimates BatchNorm statistics on calibration batches: "
                              "pass calibration=[(inputs, targets), ...]")
        calibration = list(calibration)
        evaluate = Recalibrated(evaluate, calibration)
    space = _Space(model, example_inputs, budget, importance, ignore_items(ignore), calibration,
                   Limits(max_ratio=max_ratio, min_channels=min_channels, round_to=round_to), graph)
    space.reachable()  # before any evaluation (NetAdapt's steps bisect toward a plan they assume meets it)
    runner, owned = get_executor(executor)
    runner.prepare()
    out = SearchResult(Plan(), -math.inf)
    judge = _Judge(runner, model, evaluate, out)
    try:
        if method == "netadapt":
            _netadapt(space, judge, trials, gamma)
        else:
            _tpe(space, judge, trials, parallel, seed, min_weight)
    finally:
        if owned:
            runner.close()
    out.plan = space.fill(out.plan)
    return out


__all__ = ["Recalibrated", "SearchResult", "Trial", "Tuned", "allocate_from_sensitivity", "search"]

