"""``ap.specialize``: from one base model, the smallest model per task, and what they share.

One :func:`adaprune.adapt` run per task, each on its own copy of the base with its own tolerance and
the same budget, so every task gets a model pruned for it alone. Then the **overlap** of their plans
(all on the base model's channels, so they compare directly):

- per group, the channels each task keeps and the Jaccard overlap of those sets (over all tasks, and
  per pair of tasks): where the tasks need the same channels, and where they part;
- storage: every specialised model stored on its own (the sum of their parameters) against the union of
  the weight *positions* they keep (a position kept by several tasks counted once; by inclusion-exclusion
  over the tasks, per parameter tensor). That is what storing the shared weights once would save at best:
  each run fine-tunes (and may refit) its own copy, so the models' values at a shared position differ
  unless the runs take ``finetune_steps=0`` without a refit.

With ``run_dir``, each task's run is a resumable run directory ``run_dir/<task>/`` and the overlap
report is written beside them (``overlap.json``, ``overlap.md``, ``overlap.html``), and the run's report
(``report.html``, ``report.md``): per task its metric before and after, tolerance, costs and whether the
budget was met, then the overlap.
"""

from __future__ import annotations

import copy
import html
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import fs
from ._check import as_float, check_inputs, check_module
from .adapt import AdaptResult, adapt
from .cost.budget import Budget
from .errors import ArgumentTypeError, ConfigError, RunDirError, shown
from .graph import ignore_items, ignore_names, trace
from .plan import Plan

OVERLAP_JSON, OVERLAP_MD, OVERLAP_HTML = "overlap.json", "overlap.md", "overlap.html"
SUMMARY = "specialize.json"  # what `adaprune specialize` adds: per task its metrics and costs
REPORT_MD, REPORT_HTML = "report.md", "report.html"  # per task, then the overlap
OWN_FILES = (OVERLAP_JSON, OVERLAP_MD, OVERLAP_HTML, SUMMARY, REPORT_MD, REPORT_HTML)
"""The files specialize (and its command) write beside the per-task run directories."""


@dataclass
class GroupOverlap:
    """One group's channels kept per task, and their overlap (1.0: the tasks keep the same channels)."""

    group: str
    size: int
    kept: dict[str, int]
    jaccard: float  # |kept by every task| / |kept by any task|
    pairwise: dict[str, float] = field(default_factory=dict)  # "a & b" -> Jaccard of the two tasks


@dataclass
class Overlap:
    """What the specialised models share (the module doc)."""

    tasks: list[str]
    groups: list[GroupOverlap]
    params_original: int
    params_per_task: dict[str, int]
    params_separate: int  # every specialised model stored on its own
    params_shared: int  # the union of the kept weight positions (each counted once)

    @property
    def saving(self) -> float:
        """The fraction of ``params_separate`` that storing shared weights once saves."""
        return 1.0 - self.params_shared / self.params_separate if self.params_separate else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saving": self.saving}

    def markdown(self, per_task: Table | None = None) -> str:
        """The overlap as Markdown; ``per_task`` (a table: :func:`task_table`) goes first."""
        from .report.render import _md_table

        tasks = [t.replace("|", "\\|") for t in self.tasks]  # a task name in a table cell
        lines = ["# Specialised models: what they share", "",
                 *([ "## Per task", "", _md_table(per_task), "", "## Overlap", ""] if per_task else []),
                 f"Tasks: {', '.join(self.tasks)}. Parameters: original {self.params_original:,}; per task "
                 + ", ".join(f"{t} {n:,}" for t, n in self.params_per_task.items()) + ".", "",
                 (f"Stored separately: {self.params_separate:,} parameters. The union of the weight positions they "
                  f"keep: {self.params_shared:,} ({self.saving:.1%} less; at best, since each model was fine-tuned "
                  "on its own and their values at a shared position differ)."), "",
                 "| group | channels | " + " | ".join(f"kept by {t}" for t in tasks) + " | Jaccard (all tasks) |",
                 "|---|---|" + "---|" * len(self.tasks) + "---|"]
        for g in self.groups:
            lines.append(f"| {g.group} | {g.size} | " + " | ".join(str(g.kept[t]) for t in self.tasks)
                         + f" | {g.jaccard:.2f} |")
        return "\n".join(lines) + "\n"

    def html(self, per_task: Table | None = None) -> str:
        """The report as a standalone HTML page (every name escaped); ``per_task`` (a table:
        :func:`task_table`) goes first."""
        from .report.render import _html_table

        e = html.escape
        head = "".join(f"<th>kept by {e(t)}</th>" for t in self.tasks)
        rows = "".join(
            f"<tr><td>{e(g.group)}</td><td>{g.size}</td>" + "".join(f"<td>{g.kept[t]}</td>" for t in self.tasks)
            + f"<td>{g.jaccard:.2f}</td></tr>" for g in self.groups)
        params = ", ".join(f"{e(t)} {n:,}" for t, n in self.params_per_task.items())
        return ("<!doctype html><html><head><meta charset='utf-8'><title>adaprune: specialised models</title>"
                "<style>body{font-family:sans-serif;margin:2rem}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:.2rem .6rem;text-align:right}</style></head><body>"
                "<h1>Specialised models: what they share</h1>"
                + (f"<h2>Per task</h2>{_html_table(per_task)}<h2>Overlap</h2>" if per_task else "")
                + f"<p>Tasks: {e(', '.join(self.tasks))}. Parameters: "
                f"original {self.params_original:,}; per task {params}.</p>"
                f"<p>Stored separately: {self.params_separate:,} parameters. The union of the weight positions "
                f"they keep: {self.params_shared:,} ({self.saving:.1%} less; at best, since each model was "
                "fine-tuned on its own and their values at a shared position differ).</p>"
                f"<table><tr><th>group</th><th>channels</th>{head}<th>Jaccard (all tasks)</th></tr>{rows}</table>"
                "</body></html>\n")


Table = tuple[list[str], list[list[str]]]


def task_table(results: Mapping[str, AdaptResult], tasks: Mapping[str, Any], tolerances: Mapping[str, float]) -> Table:
    """Per task: its metric before and after (validation, as adapt measured it), the drop in the metric's
    own direction against the tolerance, the MACs and parameters kept, whether the budget was met."""
    from .task import as_task

    head = ["task", "metric", "before", "after", "drop", "tolerance", "MACs kept", "params kept", "budget met"]
    rows = []
    for name, r in results.items():
        task = as_task(tasks[name])
        b, a = r.before[task.metric], r.after[task.metric]
        drop = (b - a) if task.higher_is_better else (a - b)
        kept = [f"{r.costs_after[k] / r.costs_before[k]:.1%}" if r.costs_before.get(k) else "-" for k in ("macs", "params")]
        rows.append([name, task.metric, f"{b:.4f}", f"{a:.4f}", f"{drop:.4f}", f"{tolerances[name]}", *kept,
                     "yes" if r.budget_met else "no"])
    return head, rows


@dataclass
class Specialized:
    """What :func:`specialize` made: per task its pruned model and adapt result, and their overlap."""

    models: dict[str, nn.Module]
    results: dict[str, AdaptResult]
    overlap: Overlap


def overlap(model: nn.Module, example_inputs: Any, plans: Mapping[str, Plan], ignore: Any = None) -> Overlap:
    """The overlap of ``plans`` (each task's plan on ``model``, the unpruned base): the module doc."""
    names = list(plans)
    graph = trace(model, example_inputs, ignore=ignore)
    groups = []
    for g in graph.groups:
        found = {t: _kept_channels(g, plans[t]) for t in names}
        sets: dict[str, set[int]] = {t: k for t, k in found.items() if k is not None}
        if len(sets) != len(names):
            continue
        groups.append(GroupOverlap(g.name, g.size, {t: len(s) for t, s in sets.items()}, _jaccard(list(sets.values())),
                                   {f"{a} & {b}": _jaccard([sets[a], sets[b]]) for a, b in itertools.combinations(names, 2)}))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    per_task = {t: sum(math.prod(len(k) for k in _kept_dims(shape, plans[t].removals.get(n, {})))
                       for n, shape in shapes.items()) for t in names}
    shared = 0
    for n, shape in shapes.items():
        kept = {t: _kept_dims(shape, plans[t].removals.get(n, {})) for t in names}
        for r in range(1, len(names) + 1):
            sign = 1 if r % 2 else -1
            for subset in itertools.combinations(names, r):
                shared += sign * math.prod(len(set.intersection(*(kept[t][d] for t in subset))) for d in range(len(shape)))
    return Overlap(names, groups, sum(math.prod(s) for s in shapes.values()), per_task, sum(per_task.values()), shared)


def _kept_dims(shape: tuple[int, ...], removed: Mapping[int, Iterable[int]]) -> list[set[int]]:
    return [set(range(size)) - set(removed.get(d, ())) for d, size in enumerate(shape)]


def _kept_channels(group: Any, plan: Plan) -> set[int] | None:
    """The channels of ``group`` that ``plan`` keeps (a channel goes when any position it owns goes),
    read from a slot whose positions all belong to channels; None when the group has none."""
    for slot, owner in zip(group.slots, group.channel_of):
        if bool((owner >= 0).all()):
            removed = plan.removals.get(slot.tensor, {}).get(slot.dim, ())
            gone = {int(owner[p]) for p in removed if p < owner.numel()}
            return set(range(group.size)) - gone
    return None


def _jaccard(sets: list[set[int]]) -> float:
    union = set.union(*sets)
    return len(set.intersection(*sets)) / len(union) if union else 1.0


def specialize(
    model: nn.Module,
    example_inputs: Any,
    tasks: Mapping[str, Any],
    budget: Budget,
    tolerance: float | Mapping[str, float] = 0.01,
    *,
    ignore: Any = None,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    force: bool = False,
    **options: Any,
) -> Specialized:
    """One model per task from ``model`` (left unchanged), each adapted to ``budget`` within its task's
    tolerance, and their overlap (the module doc).

    Args:
        tasks: ``{name: task}`` (names are plain: they name the run directories).
        tolerance: one tolerance for every task, or ``{name: tolerance}`` for each.
        run_dir: a directory holding each task's run (``<name>/``) and the overlap report.
        resume, force: passed to every task's :func:`adaprune.adapt` run.
        options: further :func:`adaprune.adapt` options (``finetune_steps``, ``max_iterations`` ...).

    Raises:
        ConfigError: no tasks, a task without a tolerance (named), a bad name.
        RunDirError: ``run_dir`` holds files that are not this command's.
    """
    check_module(model)
    check_inputs(example_inputs)
    if resume and force:
        raise ConfigError("specialize: resume=True and force=True contradict each other: continue the runs, or start over")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ArgumentTypeError(f"specialize: tasks must be a non-empty dict of name -> task, got {shown(tasks)}")
    for name in tasks:
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith(".") \
                or name in OWN_FILES:
            raise ConfigError(f"specialize: task name {shown(name)} must be a plain file name (it names a run directory)")
    if isinstance(tolerance, Mapping):
        missing = [n for n in tasks if n not in tolerance]
        if missing:
            raise ConfigError(f"specialize: task {missing[0]!r} has no tolerance; give tolerance={{{missing[0]!r}: ...}}")
        unknown = sorted(map(str, set(tolerance) - set(tasks)))
        if unknown:
            raise ConfigError(f"specialize: tolerance names {unknown[0]!r}, which is not one of the tasks {sorted(tasks)}")
        tolerances = {n: as_float(tolerance[n], f"tolerance[{n!r}]", low=0.0) for n in tasks}
    else:
        tolerances = {n: as_float(tolerance, "tolerance", low=0.0) for n in tasks}
    names = ignore_names(model, ignore_items(ignore))
    root = Path(run_dir) if run_dir is not None else None
    if root is not None and root.is_dir() and not force:
        foreign = sorted(p.name for p in root.iterdir() if p.name not in {*tasks, *OWN_FILES})
        if foreign:
            raise RunDirError(f"specialize: {root} holds {', '.join(foreign[:4])}, which specialize did not write; "
                              "choose another run_dir, or pass force=True")
    models, results = {}, {}
    for name, task in tasks.items():
        work = copy.deepcopy(model)
        results[name] = adapt(work, example_inputs, task, budget, tolerances[name], ignore=names,
                              run_dir=None if root is None else root / name, resume=resume, force=force, **options)
        models[name] = work
    found = overlap(model, example_inputs, {n: r.plan for n, r in results.items()}, ignore=names)
    if root is not None:
        per_task = task_table(results, tasks, tolerances)
        fs.write_atomic(root / OVERLAP_JSON, json.dumps(found.to_dict(), indent=1).encode("utf-8"), what="the overlap report")
        fs.write_atomic(root / OVERLAP_MD, found.markdown().encode("utf-8"), what="the overlap report")
        fs.write_atomic(root / OVERLAP_HTML, found.html().encode("utf-8"), what="the overlap report")
        fs.write_atomic(root / REPORT_MD, found.markdown(per_task).encode("utf-8"), what="the report")
        fs.write_atomic(root / REPORT_HTML, found.html(per_task).encode("utf-8"), what="the report")
    return Specialized(models, results, found)


__all__ = ["GroupOverlap", "Overlap", "Specialized", "overlap", "specialize", "task_table"]
