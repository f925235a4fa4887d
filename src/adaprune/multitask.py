"""``ap.MultiTask``: one model judged by several tasks, each with its own tolerance.

A deployed model often serves several tasks (one backbone, a head per task); pruning guided by one
of them silently breaks the others. A :class:`MultiTask` is a :class:`~adaprune.Task` made of named
tasks (any objects following the task protocol; each metric in its own direction):

- **evaluate** returns every task's metrics, prefixed ``"<name>/"``; **criteria** gives one per task
  (its primary metric, its own tolerance), so :func:`adaprune.adapt` accepts a step only when every
  task stays within its tolerance and names the task(s) that caused a rollback. Per-example values
  (:meth:`Task.evaluate_examples`) are kept per task, so each task's drop gets its own interval.
- **Sensitivity**: a probe's harm is the largest over the tasks of its metric drop divided by that
  task's tolerance: a group is as sensitive as the task that needs it most.
- **Importance** (:func:`task_scores`): a data-driven criterion (Taylor, activation, Wanda ...) is
  computed per task on that task's calibration batches and loss, each task's scores divided by their
  mean over every channel of the model (so no task dominates by scale), then combined: the weighted
  sum (``combine="sum"``) or the per-channel maximum (``"max"``: keep a channel if any task needs it).
- **Training**: :meth:`training_batches` yields one batch of every task at a time and :meth:`loss` is
  the weighted sum of the tasks' losses on them; :meth:`finetune` takes Adam steps on it.
  :meth:`calibration` interleaves the tasks' batches (BatchNorm statistics see every task's inputs).
"""

from __future__ import annotations

import functools
import itertools
import json
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._check import as_float, as_int, check_module
from .errors import ArgumentTypeError, ConfigError, shown
from .graph import Group
from .importance.registry import Context, default_loss, get_importance
from .scale.distributed import shard
from .task import Criterion, Task, as_task, optimizer_step

COMBINE = ("sum", "max")


class MultiTask(Task):
    """Several named tasks as one (the module doc).

    Args:
        tasks: ``{name: task}``; names are plain (no ``/``), tasks follow the task protocol.
        tolerance: ``{name: largest acceptable drop of that task's primary metric}`` for every task.
        weights: ``{name: weight}`` of each task's loss and importance (default 1 each).
        combine: how per-task importance is combined: ``"sum"`` (weighted) or ``"max"``.
        losses: ``{name: loss(output, targets)}`` for data-driven importance on a task's calibration
            batches (default: the task's ``loss_fn`` when it has one, else cross-entropy on logits).
        lr: the learning rate of :meth:`finetune` (default: the smallest of the tasks' ``lr``, else 1e-3).
        heads: ``{name: [module names]}``: the modules only that task uses (its head). A group whose
            tensors all lie in one task's head is scored by that task's importance alone (an activation
            criterion would otherwise count the other tasks' inputs flowing through it); its probes are
            judged by that task alone anyway, since masking it leaves the other tasks' outputs unchanged.

    Raises:
        ConfigError: a task without a tolerance, a tolerance or weight for no task, a bad value (named).
    """

    def __init__(self, tasks: Mapping[str, Any], tolerance: Mapping[str, float], weights: Mapping[str, float] | None = None,
                 *, combine: str = "sum", losses: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
                 lr: float | None = None, heads: Mapping[str, list[str] | str] | None = None) -> None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ArgumentTypeError(f"MultiTask: tasks must be a non-empty dict of name -> task, got {shown(tasks)}")
        self.tasks: dict[str, Task] = {}
        self._given = dict(tasks)  # as given (a protocol object's own attributes, e.g. its loss_fn)
        for name, task in tasks.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ConfigError(f"MultiTask: task name {shown(name)} must be a non-empty str without '/'")
            try:
                self.tasks[name] = as_task(task)
            except (ArgumentTypeError, ConfigError) as exc:
                raise type(exc)(f"MultiTask: tasks[{name!r}]: {exc}") from None
        self.tolerance = _per_task(self.tasks, tolerance, "tolerance", None,
                                   "the largest acceptable drop of its metric, e.g. 0.01")
        self.weights = _per_task(self.tasks, weights or {}, "weights", 1.0, "its loss and importance weight")
        if any(w <= 0 for w in self.weights.values()):
            raise ConfigError(f"MultiTask: weights must be > 0, got {self.weights}")
        if combine not in COMBINE:
            raise ConfigError(f"MultiTask: combine={shown(combine)}; expected one of {', '.join(COMBINE)}")
        self.combine = combine
        self.losses = dict(losses or {})
        unknown = sorted(set(self.losses) - set(self.tasks))
        if unknown:
            raise ConfigError(f"MultiTask: losses names {unknown[0]!r}, which is not one of the tasks {sorted(self.tasks)}")
        for name, fn in self.losses.items():
            if not callable(fn):
                raise ConfigError(f"MultiTask: losses[{name!r}] is {shown(fn)}; expected a function loss(output, targets) "
                                  "-> scalar tensor, e.g. torch.nn.functional.mse_loss on the task's output")
        found = [getattr(t, "lr", None) for t in self.tasks.values()]
        rates = [float(r) for r in found if isinstance(r, numbers.Real) and not isinstance(r, bool)]
        self.lr = as_float(lr if lr is not None else min(rates, default=1e-3), "lr", low=0.0, low_open=True,
                           where="MultiTask")
        self.heads: dict[str, list[str]] = {}
        for name, modules in (heads or {}).items():
            if name not in self.tasks:
                raise ConfigError(f"MultiTask: heads names {shown(name)}, which is not one of the tasks {sorted(self.tasks)}")
            listed = [modules] if isinstance(modules, str) else list(modules)
            if not listed or not all(isinstance(m, str) and m for m in listed):
                raise ConfigError(f"MultiTask: heads[{name!r}] must be module names, e.g. ['heads.{name}']")
            self.heads[name] = listed
        _check_heads_disjoint(self.heads)
        first = next(iter(self.tasks))
        self.metric = f"{first}/{self.tasks[first].metric}"  # shown where one metric is needed; every task is judged
        self.higher_is_better = bool(self.tasks[first].higher_is_better)

    @property
    def members(self) -> dict[str, Any]:
        """The tasks as they were given (``{name: task}``)."""
        return dict(self._given)

    def __repr__(self) -> str:
        return f"MultiTask({', '.join(f'{n}: {t.metric} ±{self.tolerance[n]}' for n, t in self.tasks.items())})"

    # -- measuring ------------------------------------------------------------------------------
    def criteria(self) -> list[Criterion]:
        return [Criterion(n, f"{n}/{t.metric}", bool(t.higher_is_better), self.tolerance[n]) for n, t in self.tasks.items()]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_criteria(model)[0]

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """Every task's metrics; no single list of per-example values (they are per task:
        :meth:`evaluate_criteria`)."""
        return self.evaluate(model), None

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        """Every task's metrics on its own part of its validation data (its ``evaluate_part``), prefixed."""
        metrics: dict[str, float] = {}
        for name, task in self.tasks.items():
            if fraction < 1.0 and not task.evaluates_parts:
                raise ConfigError(
                    f"MultiTask: task {name!r} ({type(task).__name__}) cannot evaluate part of its validation data "
                    f"(probe_data={fraction:g}): implement evaluate_part(model, fraction) on it, or leave probe_data at 1"
                )
            out = task.evaluate_part(model, fraction)
            if not isinstance(out, Mapping):
                raise ConfigError(f"MultiTask: task {name!r}'s evaluate_part returned {shown(out)}; it must return a dict")
            metrics.update({f"{name}/{k}": v for k, v in out.items()})
        return metrics

    @property
    def evaluates_parts(self) -> bool:
        return all(t.evaluates_parts for t in self.tasks.values())

    def evaluate_criteria(self, model: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        metrics: dict[str, float] = {}
        values: dict[str, torch.Tensor] = {}
        for name, task in self.tasks.items():
            out, v = task.evaluate_examples(model)
            if not isinstance(out, Mapping):
                raise ConfigError(f"MultiTask: task {name!r}'s evaluate returned {shown(out)}; it must return a dict")
            metrics.update({f"{name}/{k}": v_ for k, v_ in out.items()})
            if v is not None:
                values[name] = v
        return metrics, values

    # -- training -------------------------------------------------------------------------------
    def set_teacher(self, model: nn.Module) -> None:
        for task in self.tasks.values():
            task.set_teacher(model)

    def calibration(self) -> list[tuple[Any, Any]] | None:
        """Every task's calibration batches, interleaved (None when no task has any)."""
        found = [list(b) for b in (t.calibration() for t in self.tasks.values()) if b is not None]
        if not found:
            return None
        return [b for group in itertools.zip_longest(*found) for b in group if b is not None]

    def training_batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """One batch of every task at a time: ``({name: inputs}, {name: targets})``, cycling."""
        streams = {}
        for name, task in self.tasks.items():
            batches = task.training_batches()
            if batches is None:
                raise ConfigError(
                    f"MultiTask: task {name!r} has no training batches (task.training_batches()), so the tasks' "
                    "losses cannot be combined; give it training batches (ClassificationTask and EmbeddingTask "
                    "have them), or fine-tune 0 steps"
                )
            streams[name] = batches
        while True:
            pairs = {name: next(s) for name, s in streams.items()}
            yield {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        """The weighted sum of every task's loss on its own batch (``x``, ``y``: per task, as
        :meth:`training_batches` yields them)."""
        if not isinstance(x, Mapping) or set(x) != set(self.tasks):
            raise ConfigError(f"MultiTask.loss: inputs must be a dict with one batch per task {sorted(self.tasks)}")
        total = sum(self.weights[n] * t.loss(model, x[n], y[n]) for n, t in self.tasks.items())
        assert isinstance(total, torch.Tensor)
        return total

    @property
    def fine_tunes(self) -> bool:
        """Whether :meth:`finetune` trains: every task has training batches, or one of the tasks fine-tunes on
        its own (then fine-tuning names the task without batches, rather than the recovery silently taking 0
        steps). With neither, adapt asks for 0 steps, as for a task that does not fine-tune."""
        return (all(t.training_batches() is not None for t in self.tasks.values())
                or any(t.fine_tunes for t in self.tasks.values()))

    def finetune(self, model: nn.Module, steps: int) -> None:
        """``steps`` Adam steps on :meth:`loss`, one batch of every task per step, in train mode."""
        check_module(model)
        steps = as_int(steps, "steps", low=0)
        if steps == 0:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr)
        flags = {m: m.training for m in model.modules()}
        model.train()
        try:
            for step, batch in enumerate(itertools.islice(self.training_batches(), steps)):
                x, y = shard(batch)
                optimizer_step(model, opt, functools.partial(self.loss, model, x, y), f"MultiTask finetune step {step}",
                               self.lr)
        finally:
            for m, f in flags.items():
                m.training = f
            for p in params:
                p.grad = None

    def task_loss(self, name: str) -> Callable[[Any, Any], torch.Tensor]:
        """``loss(output, targets)`` of task ``name`` for data-driven importance."""
        found = self.losses.get(name) or getattr(self._given[name], "loss_fn", None)
        return found if callable(found) else default_loss


def _per_task(tasks: Mapping[str, Any], given: Mapping[str, float], field: str, default: float | None,
              hint: str) -> dict[str, float]:
    if not isinstance(given, Mapping):
        raise ArgumentTypeError(f"MultiTask: {field} must be a dict of task name -> number, got {shown(given)}")
    unknown = sorted(map(str, set(given) - set(tasks)))
    if unknown:
        raise ConfigError(f"MultiTask: {field} names {unknown[0]!r}, which is not one of the tasks {sorted(tasks)}")
    out = {}
    for name in tasks:
        if name not in given:
            if default is None:
                raise ConfigError(f"MultiTask: task {name!r} has no {field}; give {field}={{{name!r}: ...}} ({hint})")
            out[name] = default
        else:
            out[name] = as_float(given[name], f"{field}[{name!r}]", low=0.0, where="MultiTask")
    return out


def task_settings(task: Any) -> dict[str, Any]:
    """What a resumed run must share with the run it continues, for several tasks: their names, metrics,
    directions, tolerances, weights, combination and heads (``{}`` for one task)."""
    if not isinstance(task, MultiTask):
        return {}
    return {"tasks": json.dumps({"criteria": [[c.name, c.metric, c.higher_is_better, c.tolerance] for c in task.criteria()],
                                 "weights": task.weights, "combine": task.combine, "heads": task.heads}, sort_keys=True)}


def calibration_of(task: Task) -> Any:
    """The task's calibration batches, drawn once (a loader that shuffles gives other batches on every
    call): for a :class:`MultiTask`, ``{name: batches or None}`` per task; else ``task.calibration()``
    as a list (or None)."""
    if isinstance(task, MultiTask):
        return {n: (None if (b := t.calibration()) is None else list(b)) for n, t in task.tasks.items()}
    found = task.calibration()
    return None if found is None else list(found)


def task_scores(task: Task, importance: Any, model: nn.Module, groups: list[Group],
                loss: Callable[[Any, Any], torch.Tensor], batches: Any = None) -> dict[str, torch.Tensor]:
    """Per-channel importance of ``groups`` for ``task``: the criterion on ``batches`` (from
    :func:`calibration_of`; drawn here when None) with ``loss``, or for a :class:`MultiTask` per task,
    normalised and combined (module doc)."""
    criterion = get_importance(importance)
    if batches is None:
        batches = calibration_of(task)
    if not isinstance(task, MultiTask):
        return criterion(model, groups, Context(batches, loss))
    owner = head_owners(task, model, groups)
    per_task: dict[str, dict[str, torch.Tensor]] = {}
    for name in task.tasks:
        mine = batches.get(name)
        if mine is not None:
            per_task[name] = criterion(model, groups, Context(mine, task.task_loss(name)))
    if not per_task:  # no task has batches: a weight-only criterion, once (a data-driven one says what it needs)
        return criterion(model, groups, Context(None, loss))
    combined: dict[str, torch.Tensor] = {}
    for name, scores in per_task.items():
        flat = [s.detach().double().reshape(-1) for s in scores.values()]
        scale = float(torch.cat(flat).abs().mean()) if flat else 0.0
        for g, s in scores.items():
            if owner.get(g, name) != name and owner[g] in per_task:  # another task's head: that task judges it
                continue
            t = s.detach().double() * (task.weights[name] / scale if scale > 0 else 0.0)
            prev = combined.get(g)
            combined[g] = t if prev is None else (prev + t if task.combine == "sum" else torch.maximum(prev, t))
    return {g: s.to(torch.float32) for g, s in combined.items()}


def _check_heads_disjoint(heads: Mapping[str, list[str]]) -> None:
    """A head is what one task alone uses: the same module (or one inside another) in two tasks' heads is a
    ConfigError naming both, rather than the module silently going to whichever task comes first."""
    owned = [(m, name) for name, listed in heads.items() for m in listed]
    for i, (m, a) in enumerate(owned):
        for n, b in owned[i + 1:]:
            if a != b and (m == n or m.startswith(n + ".") or n.startswith(m + ".")):
                raise ConfigError(
                    f"MultiTask: module {m!r} is in the head of task {a!r} and {n!r} in that of task {b!r}; a head "
                    "is what one task alone uses, so list each module under one task (leave shared modules out of "
                    "heads: they are scored by every task)")


def head_owners(task: MultiTask, model: nn.Module, groups: list[Group]) -> dict[str, str]:
    """``{group: task}`` for the groups whose tensors all lie in one task's head modules.

    Raises:
        ConfigError: a head module the model does not have (named).
    """
    if not task.heads:
        return {}
    modules = dict(model.named_modules())
    for name, listed in task.heads.items():
        for m in listed:
            if m not in modules:
                raise ConfigError(f"MultiTask: heads[{name!r}] names {m!r}, which is not a module of the model")
    out = {}
    for g in groups:
        for name, listed in task.heads.items():
            if g.slots and all(any(s.tensor.startswith(m + ".") for m in listed) for s in g.slots):
                out[g.name] = name
                break
    return out


__all__ = ["COMBINE", "MultiTask", "calibration_of", "head_owners", "task_scores", "task_settings"]
