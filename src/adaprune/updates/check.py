"""Drift check: is a deployed pruned model still within tolerance of its updated dense parent on new data?

:func:`check` evaluates both models with the task (every criterion of ``task.criteria()``: one for a plain
task, one per task of a :class:`~adaprune.MultiTask`, each with its own tolerance) and judges the pruned
model's drop as :func:`adaprune.adapt` judges a step: with per-example values for both, the upper end of
the paired ``confidence`` interval of the drop (:func:`adaprune.adapt.noise.paired_interval`), else the
point drop, must be within the criterion's tolerance.

Then it says which of the plan's cuts hurt most on this data: the plan (the channels of the dense
architecture the pruned model lacks) is mapped onto the dense model (:func:`~adaprune.updates.map_plan`;
what does not map is listed, never dropped silently), and each cut group is masked *alone* on the dense
model (:func:`adaprune.mask`, undone afterwards: the dense model is left bit-identical) and measured. A
group's harm is its worst metric drop over the criteria in units of that criterion's tolerance, so 1.0 is
"this cut alone uses up the whole tolerance". The groups most worth giving back come first; re-prune
with ``adaprune.adapt(dense, ..., warm_start=plan)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._check import as_float, as_int, check_inputs, check_module, check_plan, check_tolerance_scale
from ..adapt.bookkeeping import as_number
from ..adapt.noise import Interval, check_examples, paired_interval
from ..adapt.previous import plan_of
from ..errors import ArgumentTypeError, ConfigError, NonFiniteError, shown
from ..graph import Graph, trace
from ..mapping import map_plan
from ..plan import Plan, plan_from_choice
from ..surgery.mask import mask
from ..task import Criterion, Task, as_task


@dataclass(frozen=True)
class CriterionDrift:
    """One criterion: the dense and pruned metric, the drop (in the metric's direction: positive when the
    pruned model is worse; NaN when its metric is not finite), its paired interval when both models gave
    per-example values, the number judged against ``tolerance`` (the interval's upper end, else the drop)."""

    name: str  # "" for a plain task, the task's name in a MultiTask
    metric: str
    higher_is_better: bool
    tolerance: float
    dense: float
    pruned: float
    drop: float
    interval: Interval | None
    judged: float
    within: bool

    @property
    def label(self) -> str:
        return self.name or self.metric

    def describe(self, confidence: float) -> str:
        what = f"task {self.name!r} {self.metric}" if self.name else self.metric
        if not math.isfinite(self.drop):
            return f"{what} of the pruned model is {self.pruned} (dense {self.dense:.4f}): not within tolerance"
        drop = (f"{self.interval.describe()} at {confidence:.0%} confidence" if self.interval is not None
                else f"{self.drop:.4f}")
        return f"{what} drop {drop} ({self.dense:.4f} -> {self.pruned:.4f}), tolerance {self.tolerance:g}"


@dataclass(frozen=True)
class GroupHarm:
    """One cut group measured alone on the dense model: ``removed`` of its ``size`` channels masked, the
    metric drop per criterion (by label) and ``harm``, the worst drop in units of that criterion's
    tolerance (``inf`` when a metric was not finite)."""

    group: str
    removed: int
    size: int
    drops: dict[str, float]
    harm: float

    def describe(self) -> str:
        drops = ", ".join(f"{k} drop {v:.4f}" for k, v in self.drops.items())
        return f"{self.group} ({self.removed} of {self.size} channels: {drops}; {self.harm:.2f}x tolerance)"


@dataclass
class DriftReport:
    """What :func:`check` found: per criterion, whether the pruned model is within tolerance of the dense
    one (``within``: all are), the harm of each cut group alone (most harmful first), the groups not
    measured (``max_groups``), what of the plan did not map onto the dense model (``unmapped``) and
    other findings (``notes``: tensors cut beyond the plan's, a pruned model that does not fit the plan)."""

    criteria: list[CriterionDrift]
    within: bool
    harms: list[GroupHarm]
    not_measured: list[str]
    unmapped: list[str]
    notes: list[str]
    removed: dict[str, int]  # group of the dense model -> channels the mapped plan removes
    confidence: float
    dense_metrics: dict[str, float] = field(default_factory=dict)
    pruned_metrics: dict[str, float] = field(default_factory=dict)

    def summary(self, top: int = 3) -> str:
        """The verdict in words: within tolerance or not, the drops, the groups that hurt most, what did
        not map, and what to do."""
        lines = [f"within tolerance: {'yes' if self.within else 'no'}"]
        lines += [f"  {c.describe(self.confidence)}{'' if c.within else ' (exceeded)'}" for c in self.criteria]
        if self.harms:
            lines.append("groups that hurt most (each cut masked alone on the dense model, no recovery: this ranks the cuts, it is "
                         "not the deployed model's drop): "
                         + "; ".join(h.describe() for h in self.harms[:top]))
        elif not self.removed:
            lines.append("the plan removes nothing that maps onto the dense model")
        if self.not_measured:
            lines.append(f"not measured (max_groups): {len(self.not_measured)} groups ({_names(self.not_measured)})")
        if self.unmapped:
            lines.append(f"not mapped onto the dense model: {len(self.unmapped)} parts of the plan ("
                         + "; ".join(self.unmapped[:3]) + (" ..." if len(self.unmapped) > 3 else "") + ")")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("re-prune with adaprune.adapt(dense, ..., warm_start=plan)" if not self.within
                     else "no re-pruning needed for these criteria")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (a number that is not finite is ``null``)."""
        return {
            "within": self.within,
            "confidence": self.confidence,
            "criteria": [
                {"name": c.name, "metric": c.metric, "higher_is_better": c.higher_is_better, "tolerance": c.tolerance,
                 "dense": _num(c.dense), "pruned": _num(c.pruned), "drop": _num(c.drop), "judged": _num(c.judged),
                 "within": c.within,
                 "interval": None if c.interval is None else {"low": c.interval.low, "high": c.interval.high,
                                                              "se": c.interval.se, "n": c.interval.n}}
                for c in self.criteria],
            "harms": [{"group": h.group, "removed": h.removed, "size": h.size,
                       "drops": {k: _num(v) for k, v in h.drops.items()}, "harm": _num(h.harm)} for h in self.harms],
            "not_measured": list(self.not_measured),
            "unmapped": list(self.unmapped),
            "notes": list(self.notes),
            "removed": dict(self.removed),
            "dense_metrics": {k: _num(v) for k, v in self.dense_metrics.items()},
            "pruned_metrics": {k: _num(v) for k, v in self.pruned_metrics.items()},
        }

    def markdown(self) -> str:
        """The report as Markdown: a table of the criteria, one of the groups, the lists."""
        out = [f"## Drift check: within tolerance: {'yes' if self.within else 'no'}", "",
               f"| criterion | dense | pruned | drop | interval ({self.confidence:.0%}) | tolerance | within |",
               "|---|---|---|---|---|---|---|"]
        for c in self.criteria:
            interval = "" if c.interval is None else f"[{c.interval.low:.4f}, {c.interval.high:.4f}]"
            out.append(f"| {c.label} | {c.dense:.4f} | {c.pruned:.4f} | {c.drop:.4f} | {interval} | {c.tolerance:g} "
                       f"| {'yes' if c.within else 'no'} |")
        if self.harms:
            labels = [c.label for c in self.criteria]
            out += ["", "### Groups that hurt most (each cut masked alone on the dense model, no recovery: a ranking of the cuts, not the deployed model's drop)", "",
                    "| group | removed | " + " | ".join(f"{k} drop" for k in labels) + " | harm (x tolerance) |",
                    "|---|---|" + "---|" * len(labels) + "---|"]
            for h in self.harms:
                drops = " | ".join(f"{h.drops.get(k, math.nan):.4f}" for k in labels)
                out.append(f"| {h.group} | {h.removed} of {h.size} | {drops} | {h.harm:.2f} |")
        for title, items in (("Not measured (max_groups)", self.not_measured), ("Not mapped", self.unmapped),
                             ("Notes", self.notes)):
            if items:
                out += ["", f"### {title}", ""] + [f"- {i}" for i in items]
        out += ["", "Re-prune with `adaprune.adapt(dense, ..., warm_start=plan)`." if not self.within
                else "No re-pruning needed for these criteria."]
        return "\n".join(out) + "\n"


def check(pruned: Any, dense: nn.Module, task: Any, tolerance: float = 0.01, *, plan: Any = None,
          example_inputs: Any = None, ignore: Iterable[Any] | None = None, confidence: float = 0.9,
          max_groups: int | None = None) -> DriftReport:
    """Whether ``pruned`` is still within ``tolerance`` of its (updated) dense parent ``dense`` on the
    task's data, and which of its cuts hurt most there (the module doc).

    Args:
        pruned: the deployed pruned model with ``plan=``, or an ``AdaptResult`` / ``PruneResult``.
        dense: the (updated) unpruned model; left bit-identical.
        task: a :class:`~adaprune.Task` (or task protocol object) on the new data; its ``set_teacher`` is
            called with ``dense`` first.
        tolerance: the largest acceptable drop, in [0, 1) as in :func:`adaprune.adapt` (criteria with their
            own tolerance, the tasks of a MultiTask, use theirs).
        plan: which channels of the dense architecture ``pruned`` lacks: a Plan or anything
            :func:`~adaprune.updates.plan_of` reads (a result, a run directory, a saved model directory,
            a plan JSON file). Default: the result's plan.
        example_inputs: inputs ``dense`` runs on, to trace its groups (default: the inputs of the task's
            first calibration batch).
        ignore: modules (or names) of ``dense`` whose output width is kept, as for :func:`adaprune.trace`.
        confidence: the two-sided confidence of the drop's interval, in [0, 1) (0: the point drop).
        max_groups: measure at most this many cut groups (those with most channels removed first).
    """
    dense = check_module(dense, "dense")  # first: swapped arguments are named as such
    model, plan = _pruned_and_plan(pruned, plan)
    if model is dense:
        raise ConfigError("check: pruned and dense are the same model; pass the deployed pruned model and its "
                          "(updated) dense parent")
    task = as_task(task)
    tolerance = as_float(tolerance, "tolerance", low=0.0, where="check",
                         hint="the largest acceptable drop of the metric, in its units, e.g. 0.01")
    confidence = as_float(confidence, "confidence", low=0.0, high=1.0, high_open=True, where="check",
                          hint="the two-sided confidence of the drop's interval, e.g. 0.9 (0: the point drop)")
    if max_groups is not None:
        max_groups = as_int(max_groups, "max_groups", low=0, where="check", hint="None measures every cut group")
    criteria = [c if c.tolerance is not None else Criterion(c.name, c.metric, c.higher_is_better, tolerance)
                for c in task.criteria()]
    task.set_teacher(dense)
    inputs = check_inputs(example_inputs) if example_inputs is not None else _inputs_of(task)
    graph = trace(dense, inputs, ignore=ignore)
    mapped = map_plan(plan, dense, graph=graph)

    dense_metrics, dense_values = _measure(task, dense, criteria)
    for c in criteria:
        if c.metric in dense_metrics:
            check_tolerance_scale(float(c.tolerance or 0.0), dense_metrics[c.metric], c.metric, "check: ")
    bad = {c.metric: dense_metrics[c.metric] for c in criteria if not math.isfinite(dense_metrics[c.metric])}
    if bad:
        raise NonFiniteError(f"check: the dense model's metrics are not finite ({shown(bad)}); the pruned model is "
                             "measured against them: check the dense model's weights and the task's data and loss")
    pruned_metrics, pruned_values = _measure(task, model, criteria)
    rows = [_judge(c, dense_metrics, pruned_metrics, dense_values, pruned_values, confidence) for c in criteria]

    sizes = {g.name: g.size for g in graph.groups}
    order = sorted(mapped.removed, key=lambda g: (-len(mapped.removed[g]), g))
    chosen = order if max_groups is None else order[:max_groups]
    harms = [_harm(task, dense, graph, g, mapped.removed[g], sizes[g], criteria, dense_metrics) for g in chosen]
    harms.sort(key=lambda h: (-_key(h.harm), -h.removed, h.group))
    return DriftReport(
        criteria=rows, within=all(r.within for r in rows), harms=harms, not_measured=order[len(chosen):],
        unmapped=list(mapped.dropped), notes=list(mapped.extended) + _fit_notes(plan, model),
        removed={g: len(c) for g, c in mapped.removed.items()}, confidence=confidence,
        dense_metrics=dense_metrics, pruned_metrics=pruned_metrics)


def _pruned_and_plan(pruned: Any, plan: Any) -> tuple[nn.Module, Plan]:
    """The pruned model and its plan: ``plan=`` when given, else the result's."""
    model: Any = pruned
    found: Any = None
    if not isinstance(pruned, nn.Module):
        model, found = getattr(pruned, "model", None), getattr(pruned, "plan", None)
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(
                f"check: pruned is {shown(pruned, 60)} ({type(pruned).__name__}); expected the pruned nn.Module "
                "(with plan=) or the AdaptResult / PruneResult that made it")
    if plan is not None:
        return model, plan_of(plan, what="check: plan")
    if found is None:
        raise ConfigError(
            "check: the pruned model came without a plan; pass plan= (the Plan it was pruned with, its "
            "AdaptResult, run directory, saved model directory or plan JSON file): the plan says which channels "
            "of the dense architecture the pruned model lacks")
    return model, check_plan(found, "pruned.plan")


def _inputs_of(task: Task) -> Any:
    """The inputs of the task's first calibration batch (what ``dense`` is traced on)."""
    batches = task.calibration()
    for batch in batches if batches is not None else ():
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return check_inputs(batch[0], "the inputs of the task's first calibration batch")
        break
    raise ConfigError("check: example_inputs=None and the task has no calibration batches to take inputs from; "
                      "pass example_inputs= (inputs the dense model runs on, e.g. one batch)")


def _checked(out: Any, criteria: list[Criterion]) -> dict[str, float]:
    """``task.evaluate``'s dict as numbers, holding every criterion's metric."""
    if not isinstance(out, Mapping):
        raise ConfigError(f"check: task.evaluate returned {shown(out)} ({type(out).__name__}); it must return a "
                          "dict of metric name -> number")
    metrics = {str(k): as_number(str(k), v) for k, v in out.items()}
    for c in criteria:
        if c.metric not in metrics:
            raise ConfigError(f"check: task.evaluate returned {shown(sorted(metrics), 60)}, without the metric "
                              f"{c.metric!r}" + (f" (of task {c.name!r})" if c.name else ""))
    return metrics


def _measure(task: Task, model: nn.Module, criteria: list[Criterion]
             ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The metrics and, per criterion with a finite metric, its per-example values (checked)."""
    out, found = task.evaluate_criteria(model)
    metrics = _checked(out, criteria)
    values = {}
    for c in criteria:
        given = found.get(c.name)
        if given is not None and math.isfinite(metrics[c.metric]):
            checked = check_examples(given, metrics[c.metric], c.metric, None)
            if checked is not None:
                values[c.name] = checked
    return metrics, values


def _judge(c: Criterion, dense: dict[str, float], pruned: dict[str, float], dense_values: dict[str, torch.Tensor],
           pruned_values: dict[str, torch.Tensor], confidence: float) -> CriterionDrift:
    sign = 1.0 if c.higher_is_better else -1.0
    tol = float(c.tolerance or 0.0)
    d, p = dense[c.metric], pruned[c.metric]
    if not math.isfinite(p):
        return CriterionDrift(c.name, c.metric, c.higher_is_better, tol, d, p, math.nan, None, math.nan, False)
    drop = sign * (d - p)
    a, b = dense_values.get(c.name), pruned_values.get(c.name)
    interval = None
    if a is not None and b is not None:
        if a.numel() != b.numel():
            raise ConfigError(f"check: task.evaluate_examples gave {a.numel()} per-example values for the dense model "
                              f"and {b.numel()} for the pruned one; both must score the same examples, in the same order")
        interval = paired_interval(a, b, sign, confidence)
    judged = interval.high if interval is not None else drop
    return CriterionDrift(c.name, c.metric, c.higher_is_better, tol, d, p, drop, interval, judged,
                          judged <= tol + 1e-12)


def _harm(task: Task, dense: nn.Module, graph: Graph, group: str, channels: tuple[int, ...], size: int,
          criteria: list[Criterion], base: dict[str, float]) -> GroupHarm:
    """``channels`` of ``group`` masked alone on ``dense`` and measured; the masks are taken off after."""
    handle = mask(dense, plan_from_choice(graph, {group: channels}))
    try:
        metrics = _checked(task.evaluate(dense), criteria)
    finally:
        handle.undo()
    drops: dict[str, float] = {}
    worst = -math.inf
    for c in criteria:
        lost = (1.0 if c.higher_is_better else -1.0) * (base[c.metric] - metrics[c.metric])
        drops[c.name or c.metric] = lost
        worst = max(worst, lost / max(float(c.tolerance or 0.0), 1e-6) if math.isfinite(lost) else math.inf)
    return GroupHarm(group, len(channels), size, drops, worst)


def _fit_notes(plan: Plan, model: nn.Module) -> list[str]:
    """A line when the pruned model's tensors are not the sizes the plan leaves (the plan is not its plan)."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    cut, off = 0, []
    for t, dims in sorted(plan.removals.items()):
        for d, idx in sorted(dims.items()):
            made = plan.size_of(t, d)
            if not idx or made is None:
                continue
            cut += 1
            if t not in shapes or d >= len(shapes[t]):
                off.append(f"{t!r} is missing")
            elif shapes[t][d] != made - len(idx):
                off.append(f"{t!r} dim {d} has {shapes[t][d]}, the plan leaves {made - len(idx)}")
    if not off:
        return []
    return [f"the pruned model does not fit the plan in {len(off)} of the {cut} tensor dims it cuts ("
            + "; ".join(off[:3]) + (" ..." if len(off) > 3 else "") + "): is plan= the pruned model's plan?"]


def _key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


__all__ = ["CriterionDrift", "DriftReport", "GroupHarm", "check"]
