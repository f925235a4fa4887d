"""Adaptive hybrid compression: prune, share and quantize, step by step, into the smallest artifact
that keeps the task within tolerance.

``ap.compress(model, x, task, Budget(disk_bytes=0.05), tolerance=0.01)`` measures the task on the
model and then takes steps until the compressed artifact (:mod:`adaprune.artifact`) fits the budget.
Each step is one of:

- **prune**: :func:`adaprune.adapt` cuts ``prune_step`` of the parameters (adaptively, with its own
  recovery) within the tolerance still unspent; a step that fails is retried at half the size;
- **quantize / share**: some layers go one rung down the ladder ``float -> int8 -> share6 -> ... ->
  share1`` (per-channel int8; k-means codebooks of ``2**b`` centroids).

Pruning comes first, as in Deep Compression (a float model prunes and recovers best; the codebooks are
fitted on the pruned weights), and cuts only what the levels cannot give cheaply: before the first step
every layer is probed down the ladder (alone, no recovery, within a quarter of the tolerance), the
levels found are backed off until together they lose at most half of it, and the prune phase keeps
``limit / that size`` of the parameters. A prune-phase step that loses more than its share of the
tolerance (by the log bytes it saves, plus three quarters for noise) is rolled back and ends the phase.

Then every layer's next rung is probed on the task (no recovery) and ranked by how much worse it
makes the model per byte it saves: by the loss the task reports beside its metric where it reports
one (it moves with every example, where accuracy on a few hundred examples ties most small moves),
else by the metric. The best-ranked layers whose probed harms fit half the unspent tolerance move
together. Every step recovers (``finetune_steps`` of the task's fine-tuning, the shared codebooks
trainable) and is judged on the task: past the tolerance it is rolled back (the worse half of its
layers is dropped and the rest retried; a single layer that fails stays where it is). When no layer
can move and the artifact is still over the limit, the level moves are undone and pruning goes on
from where the prune phase ended, by the factor the levels missed by (at most twice; then a prune
step on the encoded model is the last resort). The run stops when the budget holds, or when nothing
can move without breaking the tolerance (then ``budget_met`` is False and the result is the smallest
model that kept it). The history says which method each step used and what it bought.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._check import as_float, as_int, check_callable, check_inputs, check_instance, check_module
from ..artifact import disk_bytes, float_bytes
from ..cost.budget import Budget
from ..errors import ArgumentTypeError, ConfigError, shown
from ..graph import ignore_names
from ..plan import Plan
from ..task import as_task
from .levels import FLOAT, ladder, level_bytes, realize, weight_shapes
from .result import CompressResult, CompressStep

METHODS = ("prune", "share", "quantize")


def _values(task: Any, model: nn.Module) -> dict[str, Any]:
    values = task.evaluate(model)
    if not isinstance(values, dict) or task.metric not in values:
        raise ConfigError(f"task.evaluate must return a dict holding the task's metric {task.metric!r}")
    return values


def _metric(task: Any, model: nn.Module) -> float:
    from ..adapt.bookkeeping import as_number

    return as_number(task.metric, _values(task, model)[task.metric])


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out if math.isfinite(out) else None


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_prune_options(options: Any, methods: tuple[str, ...]) -> dict[str, Any]:
    """``prune_options`` checked up front: a dict of :class:`~adaprune.AdaptConfig` fields that compress
    does not set itself."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ArgumentTypeError(f"compress: prune_options={shown(options)}; expected a dict of adapt options")
    from ..adapt.config import AdaptConfig

    own = {"tolerance", "finetune_steps", "ignore", "budget"}
    taken = sorted(set(options) & own)
    if taken:
        raise ConfigError(f"compress: prune_options sets {', '.join(taken)}, which compress sets itself "
                          "(tolerance=, finetune_steps=, ignore= of compress)")
    unknown = sorted(set(options) - set(AdaptConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"compress: prune_options has {', '.join(map(repr, unknown))}, not options of adaprune.adapt "
                          "(the fields of adaprune.AdaptConfig: importance, step, max_iterations ...)")
    if options and "prune" not in methods:
        warnings.warn("compress: prune_options is given but methods has no 'prune': it is not used", stacklevel=3)
    return dict(options)


def _check_budget(budget: Budget, original: int) -> int:
    check_instance(budget, Budget, "budget", "an adaprune.Budget", "e.g. budget=adaprune.Budget(disk_bytes=0.05)")
    other = sorted(set(budget.bounds) - {"disk_bytes"})
    if other or "disk_bytes" not in budget.bounds:
        raise ConfigError(
            f"compress bounds the artifact's size: give Budget(disk_bytes=...) (a fraction of the float32 file, or "
            f"bytes); it got {', '.join(other) or 'no disk_bytes'}; for MACs, params or latency use adaprune.adapt"
        )
    return int(budget.limits({"disk_bytes": float(original)})["disk_bytes"])


class _Run:
    """The controller's state: the plain working model with its encodings baked, the spec, the plan."""

    def __init__(self, original: nn.Module, x: Any, task: Any, limit: int, tolerance: float, cfg: dict[str, Any],
                 names: list[str], ignore: list[str]) -> None:
        self.original, self.x, self.task, self.limit, self.tolerance = original, x, task, limit, tolerance
        self.cfg, self.names, self.ignore = cfg, names, ignore
        self.levels: list[str] = ladder(cfg["methods"], cfg["bits"])
        self.per_channel = cfg["scope"] == "channel"
        self.sign = 1.0 if getattr(task, "higher_is_better", True) else -1.0
        self.work = copy.deepcopy(original)
        self.spec = {n: FLOAT for n in names}
        self.plan = Plan()
        self.frozen: set[str] = set()
        self.cache: dict[str, tuple[str, float, float]] = {}  # layer -> (the level probed, its metric harm, its rank harm)
        self.rounds = 0
        self.pruning = "prune" in cfg["methods"]
        self.restarts = 0
        self.dear_at: int | None = None  # the parameter count where a prune step last spent the tolerance dearly
        self.snapshot: dict[str, Any] | None = None  # the state the prune phase ended in (levels start from it)
        self.prune_step: float = cfg["prune_step"]
        self.history: list[CompressStep] = []
        self.callback: Callable[[CompressStep], None] | None = None
        self.evaluations = 0
        self.steps = 0
        self.smooth: bool | None = None  # whether moves are ranked by the task's loss (decided on the first evaluation)
        self.last_bad = 0.0
        self.base = self.evaluate(self.work)
        self.metric = self.base
        self.bad = self.base_bad = self.last_bad
        self.prune_target: float | None = None  # the parameters the prune phase keeps (planned on the first step)
        self.disk = self.disk_start = self.measure_disk(self.work, self.spec)

    # -- measuring ---------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> float:
        """The task's metric on ``model``; what ranks moves (:meth:`badness`) is left in ``last_bad``."""
        from ..adapt.bookkeeping import as_number

        self.evaluations += 1
        values = _values(self.task, model)
        metric = as_number(self.task.metric, values[self.task.metric])
        if self.smooth is None:
            self.smooth = (self.task.metric != "loss" and self.task.loss_tracks_metric
                           and _finite(values.get("loss")) is not None)
        self.last_bad = self.badness(values, metric)
        return metric

    def badness(self, values: dict[str, Any], metric: float) -> float:
        """What ranks the moves, lower is better: the loss the task reports beside its metric, where it
        reports one (``ClassificationTask`` does: it moves with every example's confidence, where
        accuracy on a few hundred examples moves in whole examples and ties most small moves), else the
        metric itself turned so that lower is better. A NaN is the worst."""
        if self.smooth:
            loss = _finite(values.get("loss"))
            return math.inf if loss is None else loss
        return -self.sign * metric if math.isfinite(metric) else math.inf

    def lost(self, metric: float) -> float:
        """How far ``metric`` is below the original's (in the metric's direction)."""
        return self.sign * (self.base - metric)

    def within(self, metric: float) -> bool:
        return self.lost(metric) <= self.tolerance + 1e-9 * max(1.0, abs(self.base))

    def measure_disk(self, plain: nn.Module, spec: dict[str, str], plan: Plan | None = None) -> int:
        """The artifact's size: ``spec`` put on ``plain`` in place, measured, taken off again."""
        sharing = realize(plain, spec, self.per_channel, self.cfg["seed"])
        try:
            return disk_bytes(plain, self.plan if plan is None else plan)
        finally:
            sharing.undo()

    def estimate(self, spec: dict[str, str], model: nn.Module | None = None) -> int:
        model = model or self.work
        shapes = weight_shapes(model, self.names)
        return sum(level_bytes(spec[n], shapes[n], self.per_channel) for n in self.names)

    # -- candidates --------------------------------------------------------------------------------
    def probes(self) -> list[tuple[float, str, str, float, float]]:
        """(harm per kB, layer, next level, harm, bytes saved) for every layer that can move, best first.

        A layer's probe (its next rung on the current model, no recovery) is measured again when the
        layer moved, after a prune step, and for every layer each ``refresh`` rounds; in between, the
        harm measured last stands (the judge after recovery catches an estimate gone stale)."""
        scale = self.disk / max(self.estimate(self.spec) + self.fixed_bytes(), 1)
        self.rounds += 1
        if self.rounds % self.cfg["refresh"] == 0:
            self.cache.clear()
        out = []
        for n in self.names:
            level = self.spec[n]
            at = self.levels.index(level)
            if n in self.frozen or at + 1 >= len(self.levels):
                continue
            nxt = self.levels[at + 1]
            shape = weight_shapes(self.work, [n])[n]
            saved = (level_bytes(level, shape, self.per_channel) - level_bytes(nxt, shape, self.per_channel)) * scale
            if saved <= 0:
                self.frozen.add(n)
                continue
            cached = self.cache.get(n)
            if cached is not None and cached[0] == nxt:
                harm, worse = cached[1], cached[2]
            else:  # on the working model in place (no copy per probe)
                harm = max(self.harm_of({n: nxt}), 0.0)
                worse = self.last_bad - self.bad
                self.cache[n] = (nxt, harm, worse)
            out.append((self.rank(worse, saved), n, nxt, harm, saved))
        out.sort(key=lambda c: (c[0], -c[4]))
        return out

    def rank(self, worse: float, saved: float) -> float:
        """A move's rank: how much worse it makes the model (:meth:`badness`) per kB it saves, lower
        first. Ranked by the metric, a loss under a quarter of the tolerance counts as that quarter
        (indistinguishable from noise); ranked by the loss, any rise counts. Among harmless moves the
        one that saves the most comes first."""
        floor = 1e-3 * max(abs(self.base_bad), 1e-6) if self.smooth else 0.25 * self.tolerance
        return max(worse, floor) / (max(saved, 1.0) / 1000.0)

    def cheap_size(self) -> float:
        """The artifact's size (estimated) at what the levels give cheaply: every layer as far down the
        ladder as it can go alone losing at most a quarter of the tolerance (probed from the top rung
        down, no recovery), then all of them one rung back up at a time until together they lose at
        most half of it."""
        spec = dict(self.spec)
        for n in self.names:
            for nxt in self.levels[self.levels.index(spec[n]) + 1:]:
                if not self.harm_of({n: nxt}) <= 0.25 * self.tolerance:
                    break
                spec[n] = nxt
        while spec != self.spec and not self.harm_of(spec) <= 0.5 * self.tolerance:
            spec = {n: (lv if lv == self.spec[n] else self.levels[self.levels.index(lv) - 1]) for n, lv in spec.items()}
        fixed = self.fixed_bytes()
        scale = self.disk / max(self.estimate(self.spec) + fixed, 1)
        return (self.estimate(spec) + fixed) * scale

    def harm_of(self, spec: dict[str, str]) -> float:
        """The metric lost when ``spec``'s levels go on the working model (in place, then off); what
        ranks moves is left in ``last_bad``."""
        sharing = realize(self.work, spec, self.per_channel, self.cfg["seed"])
        try:
            return self.sign * (self.metric - self.evaluate(self.work))
        finally:
            sharing.undo()

    def plan_pruning(self) -> None:
        """How many parameters the prune phase keeps: pruning comes first (Deep Compression's order:
        a float model prunes and recovers best, and the levels go on the pruned weights), and cuts what
        the levels cannot give cheaply: ``limit / cheap_size`` of the parameters (none when the
        levels alone would do)."""
        params = _params(self.work)
        share = self.limit / max(self.cheap_size(), 1.0)
        self.prune_target = params * share if share < 1.0 else float(params)

    def fixed_bytes(self) -> int:
        """Bytes the encodings do not touch (biases, norms, ignored layers), as float32."""
        enc = {f"{n}.weight" for n in self.names}
        return sum(t.numel() * t.element_size() for k, t in self.work.state_dict().items() if k not in enc)

    # -- steps -------------------------------------------------------------------------------------
    def recover(self, model: nn.Module) -> int:
        steps = self.cfg["finetune_steps"] if self.task.fine_tunes else 0
        if steps:
            self.task.finetune(model, steps)
        return steps

    def record(self, method: str, layers: dict[str, list[str]], accepted: bool, metric: float, steps: int,
               evals: int, t0: float, rank: float | None, note: str = "") -> None:
        self.steps += steps
        step = CompressStep(
            len(self.history) + 1, method, layers, accepted, metric, self.disk, _params(self.work), steps,
            evals, time.perf_counter() - t0, rank, note,
        )
        self.history.append(step)
        if self.callback is not None:
            self.callback(step)

    def try_levels(self, moves: list[tuple[float, str, str, float, float]]) -> bool:
        """Move ``moves``' layers one rung down together, recover, judge; True when kept."""
        t0, evals0 = time.perf_counter(), self.evaluations
        spec = dict(self.spec)
        for _, n, nxt, _, _ in moves:
            spec[n] = nxt
        trial = copy.deepcopy(self.work)
        sharing = realize(trial, spec, self.per_channel, self.cfg["seed"])
        steps = self.recover(trial)
        sharing.materialize()  # the recovered codebooks and int8 values, baked into plain weights
        metric = self.evaluate(trial)
        bad = self.last_bad
        kinds = sorted({"share" if nxt.startswith("share") else "quantize" for _, _, nxt, _, _ in moves})
        layers = {n: [self.spec[n], nxt] for _, n, nxt, _, _ in moves}
        rank = max(m[0] for m in moves)
        if self.within(metric):
            self.work, self.spec, self.metric, self.bad = trial, spec, metric, bad
            for _, n, _, _, _ in moves:
                self.cache.pop(n, None)
            self.disk = self.measure_disk(self.work, self.spec)
            self.record("+".join(kinds), layers, True, metric, steps, self.evaluations - evals0, t0, rank)
            return True
        self.record("+".join(kinds), layers, False, metric, steps, self.evaluations - evals0, t0, rank,
                    f"lost {self.lost(metric):.4g} > tolerance {self.tolerance:g}")
        return False

    def try_prune(self, step: float | None = None, phase: bool = False) -> bool:
        """One prune step: adapt cuts ``step`` of the parameters within the unspent tolerance (its
        noise-aware judge keeps what it spends well inside it); the encodings go back on, recover, and
        the step is judged. In the prune ``phase``, one within tolerance that loses more than its share
        of the tolerance (the share of the whole compression, in log bytes, that it makes) plus three
        quarters of it for noise is rolled back too and ends the phase (on a randomly initialised
        ResNet-18 one step spent the whole tolerance on 1.6% of the parameters). A step that fails is
        retried at half the size, down to ``min_prune_step``; then pruning ends."""
        from ..adapt import adapt

        t0, evals0 = time.perf_counter(), self.evaluations
        slack = self.tolerance - self.lost(self.metric)
        step = self.prune_step if step is None else step
        trial = copy.deepcopy(self.work)
        params0 = _params(self.work)
        try:
            result = adapt(
                trial, self.x, self.task, Budget(params=1.0 - step), max(slack, 1e-9),
                ignore=self.ignore, finetune_steps=self.cfg["finetune_steps"], **self.cfg["prune_options"],
            )
        finally:
            self.task.set_teacher(self.original)  # adapt made the model it was given the teacher
        self.evaluations += result.evaluations
        steps = result.optimizer_steps
        metric = self.metric
        rank: float | None = None
        note = f"adapt (step {step:.3g}): params {params0:,} -> {_params(trial):,}"
        kept = not result.plan.is_empty
        if kept:
            if any(level != FLOAT for level in self.spec.values()):
                sharing = realize(trial, self.spec, self.per_channel, self.cfg["seed"])
                steps += self.recover(trial)
                sharing.materialize()
            metric = self.evaluate(trial)
            bad = self.last_bad
            kept = self.within(metric)
            if not kept:
                note += f"; lost {self.lost(metric):.4g} > tolerance {self.tolerance:g}"
            else:
                plan = self.plan.then(result.plan, self.original)
                after = self.measure_disk(trial, self.spec, plan)
                rank = self.rank(bad - self.bad, self.disk - after)
                dear = self.dear(metric, after) if phase else ""
                if dear:
                    self.prune_target = float(params0)  # the prune phase ends here
                    self.dear_at = params0
                    self.record("prune", {}, False, metric, steps, self.evaluations - evals0, t0, rank,
                                f"{note}; {dear}: rolled back")
                    return False
        else:
            note = f"adapt (step {step:.3g}) cut nothing within {slack:.4g}: {result.message}"
        if kept:
            self.work, self.plan, self.metric, self.disk, self.bad = trial, plan, metric, after, bad
            self.cache.clear()
        else:
            self.prune_step = min(self.prune_step, step / 2)
            if self.prune_step < self.cfg["min_prune_step"]:
                self.pruning = False
                note += "; pruning ends"
        self.record("prune", {}, kept, metric, steps, self.evaluations - evals0, t0, rank if kept else None, note)
        return kept

    def dear(self, metric: float, after: int) -> str:
        """Why a prune-phase step that left the model at ``metric`` and ``after`` bytes spent more than
        its share of the tolerance ('' when it did not)."""
        spent = self.sign * (self.metric - metric)
        whole = math.log(max(self.disk_start, 1) / max(self.limit, 1))
        share = math.log(max(self.disk, 1) / max(after, 1)) / whole if whole > 0 else 1.0
        allowed = self.tolerance * (min(share, 1.0) + 0.75)
        if spent <= allowed:
            return ""
        return (f"lost {spent:.4g} for {share:.0%} of the compression (log bytes), over its share of the tolerance "
                f"plus three quarters for noise ({allowed:.4g})")

    def state(self) -> dict[str, Any]:
        """What a restart goes back to."""
        return {"work": copy.deepcopy(self.work), "plan": self.plan, "spec": dict(self.spec), "metric": self.metric,
                "bad": self.bad, "disk": self.disk, "steps": len(self.history)}

    def restart(self) -> bool:
        """The levels stalled over the limit: back to the model the prune phase ended with (every level
        move since undone), to prune on down to ``limit / the size the levels reached`` of its parameters
        (90% of it), and go down the ladder again; at most ``restarts`` times. False when it cannot,
        or when the prune phase ended on a step rolled back as too dear from that same model."""
        snap = self.snapshot
        if not self.pruning or snap is None or self.restarts >= self.cfg["restarts"] or self.disk <= self.limit:
            return False
        params = _params(snap["work"])
        if self.dear_at == params:  # the phase ended on a step too dear from this very model: it would again
            return False
        target = 0.9 * params * self.limit / self.disk
        if 1.0 - target / max(params, 1) < self.cfg["min_prune_step"]:
            return False
        self.restarts += 1
        why = (f"undone by restart {self.restarts}: the levels stalled at {self.disk:,} bytes over the limit "
               f"{self.limit:,}; pruning on to {int(target):,} parameters")
        for i in range(snap["steps"], len(self.history)):
            step = self.history[i]
            if step.accepted:
                self.history[i] = dataclasses.replace(step, accepted=False, note=f"{step.note}; {why}".lstrip("; "))
        self.work, self.plan, self.spec = copy.deepcopy(snap["work"]), snap["plan"], dict(snap["spec"])
        self.metric, self.bad, self.disk = snap["metric"], snap["bad"], snap["disk"]
        self.cache.clear()
        self.frozen.clear()
        self.prune_target = target
        self.prune_step = self.cfg["prune_step"]
        self.snapshot = None
        return True

    def final_recovery(self, steps: int) -> None:
        """``steps`` more optimizer steps on the final encoded model (codebooks trainable), kept when
        the result stays within tolerance: the step-by-step recoveries were short."""
        if steps <= 0 or not self.task.fine_tunes:
            return
        t0, evals0 = time.perf_counter(), self.evaluations
        trial = copy.deepcopy(self.work)
        sharing = realize(trial, self.spec, self.per_channel, self.cfg["seed"])
        self.task.finetune(trial, steps)
        sharing.materialize()
        metric = self.evaluate(trial)
        kept = self.within(metric)
        if kept:
            self.work, self.metric, self.bad = trial, metric, self.last_bad
            self.disk = self.measure_disk(self.work, self.spec)
        self.record("recover", {}, kept, metric, steps, self.evaluations - evals0, t0, None,
                    "" if kept else f"lost {self.lost(metric):.4g} > tolerance {self.tolerance:g}: the model before it kept")

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> str:
        pending: list[tuple[float, str, str, float, float]] | None = None
        while self.disk > self.limit:
            if len(self.history) >= self.cfg["max_steps"]:
                return f"stopped after max_steps={self.cfg['max_steps']} steps"
            if self.pruning:  # the prune phase: down to the planned parameters
                if self.prune_target is None:
                    self.plan_pruning()
                cut = 1.0 - float(self.prune_target or 0.0) / max(_params(self.work), 1)
                if cut >= self.cfg["min_prune_step"]:
                    self.try_prune(min(self.prune_step, cut), phase=True)
                    continue
            if self.pruning and self.snapshot is None:
                self.snapshot = self.state()
            cands = pending if pending else self.probes()
            pending = None
            if not cands:
                if self.restart():
                    continue
                if self.pruning:  # the last resort: prune the encoded model (its levels re-fitted after)
                    self.try_prune()  # one that failed is retried at half the step
                    continue
                return "no layer can go lower and pruning is spent: the tolerance binds"
            slack = self.tolerance - self.lost(self.metric)
            moves: list[tuple[float, str, str, float, float]] = []
            harm = 0.0
            for c in cands[: self.cfg["moves"]]:
                if moves and harm + c[3] > slack / 2:
                    break
                moves.append(c)
                harm += c[3]
            if self.try_levels(moves):
                continue
            if len(moves) == 1:
                self.frozen.add(moves[0][1])
            else:
                pending = [c for c in cands if c not in moves[len(moves) // 2:]]  # the better half, retried
                pending = pending[: max(1, len(moves) // 2)] if pending else None
        return "budget met"


def compress(
    model: nn.Module,
    example_inputs: Any,
    task: Any,
    budget: Budget,
    tolerance: float = 0.01,
    *,
    methods: Iterable[str] = METHODS,
    bits: Iterable[int] = (6, 5, 4, 3, 2, 1),
    scope: str = "layer",
    ignore: Any = None,
    keep_float: Any = None,
    finetune_steps: int = 50,
    final_steps: int | None = None,
    prune_step: float = 0.25,
    moves: int | None = None,
    max_steps: int = 80,
    seed: int = 0,
    prune_options: dict[str, Any] | None = None,
    callback: Callable[[CompressStep], None] | None = None,
) -> CompressResult:
    """Compress ``model`` by pruning, weight sharing and int8, adaptively, until its compressed
    artifact fits ``budget`` (``Budget(disk_bytes=...)``: a fraction of the float32 file, or bytes)
    with the task's metric within ``tolerance`` of the original's.

    Args:
        model: the model; not changed (the result holds a compressed copy).
        example_inputs: inputs the model runs on (for pruning).
        task: a :class:`~adaprune.Task` (``evaluate``; ``finetune`` for recovery).
        budget: ``Budget(disk_bytes=...)``.
        tolerance: the largest acceptable drop of the task's metric below the original's.
        methods: any of ``"prune"``, ``"share"``, ``"quantize"``.
        bits: the shared widths the ladder goes through (each 1..8), largest first.
        scope: ``"layer"`` (a codebook per layer) or ``"channel"`` (per output channel).
        ignore: modules (or names) whose output width pruning keeps (classifiers); they are still encoded.
        keep_float: modules (or names) whose weights stay float32.
        finetune_steps: optimizer steps of each step's recovery (and of adapt's).
        final_steps: optimizer steps of a last recovery of the final model, kept when it stays within
            tolerance (default ``10 * finetune_steps``).
        prune_step: the fraction of the parameters one prune step cuts.
        moves: the most layers one step moves (default: a quarter of them, at least one).
        max_steps: the most steps, kept or rolled back.
        seed: the k-means seed.
        prune_options: more options for :func:`adaprune.adapt` (``importance``, ``step`` ...).
        callback: called with every :class:`CompressStep` as it is recorded.

    Returns:
        A :class:`CompressResult`; ``adaprune.save(result, dir, compress=True)`` writes its artifact.
    """
    check_module(model)
    check_inputs(example_inputs)
    task = as_task(task)
    tolerance = as_float(tolerance, "tolerance", low=0.0, where="compress")
    methods = tuple(dict.fromkeys(methods if not isinstance(methods, str) else (methods,)))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"compress: methods={shown(methods)}; choose any of {', '.join(METHODS)}")
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = (bits,)
    if not isinstance(bits, Iterable) or isinstance(bits, (str, bytes)):
        raise ConfigError(f"compress: bits={shown(bits)}; give the shared widths to try, e.g. bits=(6, 4, 3) or bits=4")
    bits_t = tuple(as_int(b, "bits", low=1, high=8, where="compress") for b in bits)
    if "share" in methods and not bits_t:
        raise ConfigError("compress: bits is empty; give the shared widths to try, e.g. bits=(6, 4, 3)")
    if scope not in ("layer", "channel"):
        raise ConfigError(f"compress: scope={shown(scope)}; choose 'layer' or 'channel'")
    if callback is not None:
        check_callable(callback, "callback", "a function of one CompressStep")
    prune_options = _check_prune_options(prune_options, methods)
    for mod in model.modules():
        if parametrize.is_parametrized(mod):
            raise ConfigError("compress: the model carries parametrizations (shared, int8 or masked weights); "
                              "bake or undo them first")
    from ..share import _targets

    keep = ignore_names(model, keep_float)
    names, skipped = _targets(model, keep)
    if not names and methods != ("prune",):
        raise ConfigError("compress: the model has no Linear / Conv / Embedding weight to share or quantize")
    cfg: dict[str, Any] = {
        "methods": methods, "bits": bits_t, "scope": scope, "seed": as_int(seed, "seed", low=0),
        "finetune_steps": as_int(finetune_steps, "finetune_steps", low=0),
        "final_steps": (10 * int(finetune_steps) if final_steps is None
                        else as_int(final_steps, "final_steps", low=0)),
        "prune_step": as_float(prune_step, "prune_step", low=0.0, high=1.0, low_open=True, high_open=True),
        "min_prune_step": 0.05,
        "moves": as_int(moves, "moves", low=1) if moves is not None else max(1, math.ceil(len(names) / 4)),
        "max_steps": as_int(max_steps, "max_steps", low=1),
        "refresh": 4,
        "restarts": 2,
        "prune_options": prune_options,
    }
    t0 = time.perf_counter()
    original = copy.deepcopy(model).eval()
    limit = _check_budget(budget, float_bytes(original))
    if hasattr(task, "set_teacher"):
        task.set_teacher(original)
    run = _Run(original, example_inputs, task, limit, tolerance, cfg, names, ignore_names(model, ignore))
    run.callback = callback
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        message = run.run()
        run.final_recovery(cfg["final_steps"])
    final = copy.deepcopy(run.work)
    realize(final, run.spec, run.per_channel, cfg["seed"])
    final.eval()
    after = _metric(task, final)
    run.evaluations += 1
    if not run.within(after):  # re-encoding the judged weights moved an int8 scale by an ulp: say so
        message += (f"; the returned model measures {after:.6g}, {run.lost(after):.4g} below the original "
                    f"(tolerance {tolerance:g}), after re-encoding the judged weights")
    return CompressResult(
        model=final, plan=run.plan, spec={n: lv for n, lv in run.spec.items()}, history=list(run.history),
        budget_met=run.disk <= limit, message=message, metric=task.metric,
        before={task.metric: run.base}, after={task.metric: after},
        disk_bytes_before=float_bytes(original), disk_bytes_after=disk_bytes(final, run.plan),
        params_before=_params(original), params_after=_params(run.work), limit=limit, tolerance=tolerance,
        methods=methods, optimizer_steps=run.steps, evaluations=run.evaluations,
        seconds=time.perf_counter() - t0, skipped=skipped,
    )


__all__ = ["METHODS", "CompressResult", "CompressStep", "compress"]
