"""Tasks: what a model is for, as the adaptive controller sees it.

A task evaluates a model (``evaluate(model) -> {metric: value}``, with a named primary metric and
its direction), may fine-tune it (``finetune(model, steps)``) and may hand out calibration batches.
:class:`Task` is the base class: ``evaluate`` is required, the other hooks have documented no-op
defaults. An object that does not subclass it but has the same methods (the task protocol) is
accepted too: :func:`as_task` checks either kind once and wraps a protocol object in a
:class:`TaskAdapter`, so the controller calls every hook directly.
:class:`ClassificationTask` is a ready supervised classification task with a short fine-tune loop,
BatchNorm recalibration and optional knowledge distillation from the unpruned model (Hinton et al.,
2015, "Distilling the Knowledge in a Neural Network").
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._check import (
    a_type,
    as_bool,
    as_float,
    as_int,
    check_batches,
    check_instance,
    check_module,
    clip,
    describe,
)
from .calls import call_model
from .errors import ArgumentTypeError, ConfigError, NonFiniteError, shown
from .importance import default_loss
from .scale.distributed import average_gradients, shard, sync_buffers, synced_batch_norm


class Task(ABC):
    """What the adaptive controller needs from the user's task: subclass it, set :attr:`metric` and
    :attr:`higher_is_better`, implement :meth:`evaluate` and override the hooks the task supports.

    Every hook has a default that does nothing, so a task with only ``evaluate`` is a complete one:

    - :meth:`finetune` trains nothing; a task that does not override it is asked for 0 optimizer
      steps per recovery and the run counts 0 (:attr:`fine_tunes` is False);
    - :meth:`calibration` returns None: no calibration batches (no reconstruction, no BatchNorm
      recalibration; data-driven importance criteria such as ``"taylor"`` refuse to run);
    - :meth:`set_teacher` ignores the unpruned model;
    - :meth:`loss` is cross-entropy on the model's logits
      (:func:`adaprune.importance.default_loss`).

    An object with the same attributes that does not subclass Task is accepted wherever a Task is
    (:func:`as_task` wraps it; its missing hooks are these defaults).
    """

    metric: str  # the primary metric: a key of evaluate()'s dict
    higher_is_better: bool  # the metric's direction
    loss_tracks_metric: bool = True
    """Whether a ``"loss"`` that :meth:`evaluate` reports beside the metric moves with it. adapt's probes
    and blame, and compress's ranking, measure harm by that loss where it does (smooth: small
    differences between layers show), else by the metric. False for a loss that does not see what the
    metric judges (a detector's training loss, computed on proposals that include the ground-truth boxes,
    does not see the proposals inference keeps)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on held-out data: a dict of numbers that includes ``self.metric``."""

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """:meth:`evaluate` plus the primary metric's value on every validation example: a 1-D float
        tensor, in the same example order on every call, whose mean is ``self.metric`` (0/1 correctness
        for accuracy, a reciprocal rank for MRR, a per-example loss ...); None when the task has none.

        The controller judges a step by the paired difference of these values against the original
        model's (a confidence interval on the metric's drop, :mod:`adaprune.adapt.noise`), so a task
        that returns them gets noise-aware acceptance. Default: ``(self.evaluate(model), None)``.
        """
        return self.evaluate(model), None

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        """:meth:`evaluate` on a fixed part of the validation data: about ``fraction`` (in (0, 1)) of its
        examples, the same ones on every call with that fraction. adapt measures its probes on it when
        ``probe_data < 1`` (each against the current model on the same part, so only differences on
        that part are compared). Default: the whole evaluation at ``fraction >= 1``; below, a
        :class:`~adaprune.errors.ConfigError` (a task that does not override it cannot evaluate a part)."""
        if fraction >= 1.0:
            return self.evaluate(model)
        raise ConfigError(
            f"{type(self).__name__} cannot evaluate part of its validation data (probe_data={fraction:g}): "
            "implement evaluate_part(model, fraction) on the task, or leave probe_data at 1"
        )

    @property
    def evaluates_parts(self) -> bool:
        """Whether :meth:`evaluate_part` can evaluate a part: True when a subclass overrides it."""
        return _overrides(self, "evaluate_part")

    def finetune(self, model: nn.Module, steps: int) -> None:
        """Take ``steps`` optimizer steps on ``model`` in place. Default: nothing (and no steps asked for)."""

    @property
    def fine_tunes(self) -> bool:
        """Whether :meth:`finetune` trains: True when a subclass (or the instance) overrides it. The
        controller asks a task that does not fine-tune for 0 steps per recovery, and counts 0."""
        return _overrides(self, "finetune")

    def calibration(self) -> Iterable[tuple[Any, Any]] | None:
        """``(inputs, targets)`` batches for importance, reconstruction and BatchNorm recalibration.
        Default: None, meaning the task has none."""
        return None

    def set_teacher(self, model: nn.Module) -> None:
        """Called once with the unpruned model before the first step (to distil from). Default: nothing."""

    def training_batches(self) -> Iterator[tuple[Any, Any]] | None:
        """``(inputs, targets)`` training batches for :meth:`loss`, cycling without end, for training
        loops adaprune runs itself (the joint recovery of a ladder's rungs). Default: None (the task
        has none)."""
        return None

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        """The training loss of ``model`` on one batch. Default: cross-entropy on the model's logits
        (:func:`adaprune.importance.default_loss`)."""
        return default_loss(call_model(model, x), y)

    def criteria(self) -> list[Criterion]:
        """What a step is judged on. Default: the primary metric, within adapt's tolerance (a
        :class:`~adaprune.MultiTask` gives one per task, each with its own)."""
        return [Criterion("", self.metric, bool(self.higher_is_better))]

    def evaluate_criteria(self, model: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The metrics and, per criterion name, the per-example values of its metric (the criteria
        without any left out). Default: :meth:`evaluate_examples` as criterion ``""``."""
        metrics, values = self.evaluate_examples(model)
        return metrics, ({} if values is None else {"": values})


@dataclass(frozen=True)
class Criterion:
    """One thing a step of :func:`adaprune.adapt` is judged on: the metric ``metric`` (a key of the
    task's metrics) may drop at most ``tolerance`` (absolute, in its own direction; None: adapt's
    ``tolerance``). ``name`` is "" for a single task, the task's name in a :class:`~adaprune.MultiTask`."""

    name: str
    metric: str
    higher_is_better: bool
    tolerance: float | None = None


def _overrides(task: Task, name: str) -> bool:
    """Whether ``task``'s method ``name`` is something other than :class:`Task`'s default."""
    method = getattr(task, name)
    return getattr(method, "__func__", method) is not getattr(Task, name)


_MISSING: Any = object()
_REQUIRED = ("evaluate", "metric", "higher_is_better")
_HOOKS = ("finetune", "calibration", "set_teacher", "evaluate_examples", "training_batches", "evaluate_part")  # optional; when present they must be callable


class TaskAdapter(Task):
    """A protocol task (an object with ``evaluate``, ``metric``, ``higher_is_better`` and any of the
    hooks, not a :class:`Task` subclass) as a Task. Made by :func:`as_task`, which resolves the
    object's attributes once: present hooks are called on the object (its state stays its own),
    missing ones are Task's defaults. ``wrapped`` is the object."""

    def __init__(self, wrapped: Any, found: dict[str, Any]) -> None:
        self.wrapped = wrapped
        self.metric = found["metric"]
        self.higher_is_better = found["higher_is_better"]
        self.loss_tracks_metric: bool = found.get("loss_tracks_metric", True)
        if "lr" in found:  # the object's learning rate (a MultiTask's or a ladder's default)
            self.lr: float = found["lr"]
        self._evaluate: Callable[[nn.Module], Any] = found["evaluate"]
        self._hooks: dict[str, Callable[..., Any]] = {
            k: found[k] for k in (*_HOOKS, "loss") if found.get(k, _MISSING) is not _MISSING
        }

    def __repr__(self) -> str:
        return f"TaskAdapter({type(self.wrapped).__name__})"

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = self._evaluate(model)
        return out

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        if "evaluate_examples" in self._hooks:
            metrics, values = self._hooks["evaluate_examples"](model)
            return metrics, values
        return self.evaluate(model), None

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        if "evaluate_part" in self._hooks:
            out: dict[str, float] = self._hooks["evaluate_part"](model, fraction)
            return out
        return super().evaluate_part(model, fraction)

    @property
    def evaluates_parts(self) -> bool:
        return "evaluate_part" in self._hooks

    @property
    def fine_tunes(self) -> bool:
        return "finetune" in self._hooks

    def finetune(self, model: nn.Module, steps: int) -> None:
        if "finetune" in self._hooks:
            self._hooks["finetune"](model, steps)

    def calibration(self) -> Iterable[tuple[Any, Any]] | None:
        if "calibration" in self._hooks:
            batches: Iterable[tuple[Any, Any]] | None = self._hooks["calibration"]()
            return batches
        return None

    def set_teacher(self, model: nn.Module) -> None:
        if "set_teacher" in self._hooks:
            self._hooks["set_teacher"](model)

    def training_batches(self) -> Iterator[tuple[Any, Any]] | None:
        if "training_batches" in self._hooks:
            batches: Iterator[tuple[Any, Any]] | None = self._hooks["training_batches"]()
            return batches
        return None

    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        if "loss" in self._hooks:
            value: torch.Tensor = self._hooks["loss"](model, x, y)
            return value
        return super().loss(model, x, y)


def as_task(task: Any) -> Task:
    """``task`` checked and seen as a :class:`Task`: a Task itself, or a protocol object wrapped in a
    :class:`TaskAdapter` (each of its attributes is looked up once, here).

    A task needs ``evaluate`` (callable), ``metric`` (a str) and ``higher_is_better`` (a bool); the
    hooks ``finetune``, ``calibration`` and ``set_teacher`` are optional but, when present, must be
    callable. Anything else raises :class:`~adaprune.errors.ArgumentTypeError` naming the attribute.
    """
    found = {name: getattr(task, name, _MISSING) for name in (*_REQUIRED, *_HOOKS)}
    for attr in _REQUIRED:
        if found[attr] is _MISSING:
            raise ArgumentTypeError(
                f"task ({a_type(task)}) has no {attr!r}: a task needs evaluate(model) -> dict, a primary "
                "`metric` name and `higher_is_better`; adaprune.ClassificationTask is a ready one"
            )
    for attr in ("evaluate", *_HOOKS):
        if found[attr] is not _MISSING and not callable(found[attr]):
            raise ArgumentTypeError(f"task.{attr} is {a_type(found[attr])}; expected a method (see adaprune.Task)")
    check_instance(found["metric"], str, "task.metric", "the name of the metric in evaluate()'s dict")
    as_bool(found["higher_is_better"], "task.higher_is_better")
    if isinstance(task, Task):
        return task
    loss = getattr(task, "loss", _MISSING)  # optional and never required to be a method (may be a number)
    if callable(loss):
        found["loss"] = loss
    tracks = getattr(task, "loss_tracks_metric", True)  # optional; only a bool says anything
    found["loss_tracks_metric"] = tracks if isinstance(tracks, bool) else True
    rate = getattr(task, "lr", None)  # optional: the learning rate its fine-tuning uses, read by callers that train
    if isinstance(rate, numbers.Real) and not isinstance(rate, bool):  # (NumPy scalars too)
        found["lr"] = float(rate)
    return TaskAdapter(task, found)


def logits_of(output: Any) -> torch.Tensor:
    out = getattr(output, "logits", output)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model's output is a {type(output).__name__}; expected logits (a tensor)")
    return out


def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[Any, Any]], max_batches: int = 8) -> bool:
    """Re-estimate BatchNorm running statistics on ``batches`` (cumulative average); True if any BN."""
    norms: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        if m.track_running_stats:
            m.reset_running_stats()  # type: ignore[operator]
            m.momentum = None  # type: ignore[assignment]
    model.eval()
    for m in norms:
        m.train()
    try:
        with torch.no_grad():
            for x, _ in itertools.islice(batches, max_batches):
                call_model(model, x)
    finally:
        for m, f in flags.items():
            m.training = f
        for m, mom in momenta.items():
            m.momentum = mom
    return True


def _pair(batch: Any, loader: str, index: int) -> tuple[Any, Any]:
    """``batch`` as ``(inputs, targets)``, else a ConfigError naming the loader and the batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(f"{loader} batch {index} is {describe(batch)}; each batch must be an (inputs, targets) pair")


def _run(model: nn.Module, x: Any, where: str) -> torch.Tensor:
    """The model's logits on a batch's inputs; a model that cannot run them names the batch (``where``)."""
    try:
        return logits_of(call_model(model, x))
    except (ConfigError, Warning, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise ConfigError(
            f"the model failed on {where} ({type(exc).__name__}: {clip(str(exc))}); "
            "check that the batch's inputs are what model(...) accepts"
        ) from exc


def check_targets(logits: torch.Tensor, y: Any, where: str) -> torch.Tensor:
    """``y`` when it holds one class index in ``[0, classes)`` per row of ``logits``, else a ConfigError."""
    classes = logits.shape[-1] if logits.dim() else 0
    fits = (
        isinstance(y, torch.Tensor) and not y.dtype.is_floating_point and not y.dtype.is_complex
        and y.dtype != torch.bool and tuple(y.shape) == tuple(logits.shape[:-1])
    )
    if fits and y.numel():
        fits = 0 <= int(y.min()) and int(y.max()) < classes
    if not fits:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else f"({a_type(y)})"
        raise ConfigError(
            f"{where}: targets {got} do not fit logits {tuple(logits.shape)}; targets must be integer class "
            f"indices in [0, {classes}), one per row of logits, shape {tuple(logits.shape[:-1])}"
        )
    return y


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor], where: str,
                   lr: float) -> None:
    """One optimizer step on ``loss()``. A NaN or infinite loss raises :class:`NonFiniteError` naming
    ``where``; if the step fails, the buffers its forward pass changed (BatchNorm statistics) are put back."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        opt.zero_grad(set_to_none=True)
        with synced_batch_norm(model):  # (under torchrun: BatchNorm sees the whole batch, not this process's slice)
            value = loss()
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteError(
                f"{where}: the loss is {shown(value.detach().tolist())}; "
                f"use a lower lr (now {lr:g}) or check the batch for NaN/inf"
            )
        value.backward()
        # under torchrun: every process's gradient of its slice of the batch, averaged (data-parallel)
        average_gradients(p for group in opt.param_groups for p in group["params"])
    except BaseException:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers and b.shape == buffers[n].shape:
                    b.copy_(buffers[n])
        raise
    opt.step()
    sync_buffers(model)  # (under torchrun: rank 0's BatchNorm statistics, as DistributedDataParallel keeps them)


def adamw_steps(model: nn.Module, steps: int, lr: float, weight_decay: float,
                step: Callable[[torch.optim.Optimizer, int], None]) -> None:
    """``steps`` AdamW steps on ``model``'s trainable parameters in train mode, ``step(opt, i)`` taking the
    i-th (through :func:`optimizer_step`); the modules' train/eval flags are restored and the gradients
    dropped afterwards, also when a step fails."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    flags = {m: m.training for m in model.modules()}
    model.train()
    try:
        for i in range(steps):
            step(opt, i)
    finally:
        for m, f in flags.items():
            m.training = f
        for p in params:
            p.grad = None


_EMPTY_TRAIN = (
    "train_loader yielded no batches: fine-tuning and calibration read (inputs, targets) batches from it; "
    "pass a non-empty list or DataLoader"
)


class ClassificationTask(Task):
    """Supervised classification: accuracy on ``val_loader``, fine-tuning on ``train_loader``.

    Args:
        train_loader: iterable of ``(inputs, targets)`` batches used to fine-tune and calibrate
            (read many times: a list or a DataLoader, not a generator).
        val_loader: iterable of ``(inputs, targets)`` batches the metric is measured on; targets
            are class indices.
        lr: learning rate of the fine-tune optimizer (Adam), > 0.
        weight_decay: Adam's weight decay, >= 0.
        distill: blend the loss with distillation from the unpruned model (set by the controller
            through :meth:`set_teacher`).
        temperature, alpha: distillation temperature (> 0) and weight of the distillation term (in [0, 1]).
        calibration_batches: how many training batches :meth:`calibration` hands out (>= 1).

    Every argument is checked on construction (NumPy scalars are converted to Python numbers).
    """

    metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        train_loader: Iterable[tuple[Any, Any]],
        val_loader: Iterable[tuple[Any, Any]],
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        distill: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.5,
        calibration_batches: int = 4,
    ) -> None:
        self.train_loader = check_batches(train_loader, "train_loader", reusable=True)
        self.val_loader = check_batches(val_loader, "val_loader", reusable=True)
        self.lr = as_float(lr, "lr", low=0.0, low_open=True, hint="the fine-tune learning rate, e.g. 3e-4")
        self.weight_decay = as_float(weight_decay, "weight_decay", low=0.0, hint="Adam's weight decay, e.g. 0")
        self.distill = as_bool(distill, "distill")
        self.temperature = as_float(temperature, "temperature", low=0.0, low_open=True,
                                    hint="the distillation temperature, e.g. 4")
        self.alpha = as_float(alpha, "alpha", low=0.0, high=1.0, hint="the weight of the distillation loss")
        self.calibration_batches = as_int(calibration_batches, "calibration_batches", low=1)
        self.teacher: nn.Module | None = None
        self._parts: dict[float, list[Any]] = {}  # fraction -> the validation batches evaluate_part measures

    def set_teacher(self, model: nn.Module) -> None:
        """Keep a frozen copy of ``model`` (the unpruned one) to distil from, if ``distill``."""
        check_module(model)
        if self.distill:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def calibration(self) -> list[tuple[Any, Any]]:
        """The first ``calibration_batches`` training batches (an empty ``train_loader`` raises)."""
        batches = [
            _pair(b, "train_loader", i)
            for i, b in enumerate(itertools.islice(iter(self.train_loader), self.calibration_batches))
        ]
        if not batches:
            raise ConfigError(_EMPTY_TRAIN)
        return batches

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """Accuracy and mean cross-entropy on ``val_loader``, and every example's correctness (0 or 1).
        A subclass that overrides :meth:`evaluate` alone gets its own metrics and no per-example values."""
        if type(self).evaluate is not ClassificationTask.evaluate:
            return self.evaluate(model), None
        return self._measure(model, self.val_loader)

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        """Accuracy and mean cross-entropy on the first ``ceil(fraction * batches)`` batches of
        ``val_loader``, kept from the first call with this fraction (a shuffling loader's draw is
        kept too, so every call measures the same examples)."""
        if fraction >= 1.0:
            return self.evaluate(model)
        if not self.evaluates_parts:
            raise ConfigError(
                f"{type(self).__name__} overrides evaluate, so ClassificationTask cannot evaluate part of its "
                f"validation data (probe_data={fraction:g}): implement evaluate_part too, or leave probe_data at 1"
            )
        if fraction not in self._parts:
            total = len(self.val_loader) if hasattr(self.val_loader, "__len__") else sum(1 for _ in self.val_loader)
            self._parts[fraction] = list(itertools.islice(iter(self.val_loader), max(1, math.ceil(fraction * total))))
        return self._measure(model, self._parts[fraction])[0]

    @property
    def evaluates_parts(self) -> bool:
        return (type(self).evaluate is ClassificationTask.evaluate
                or type(self).evaluate_part is not ClassificationTask.evaluate_part)

    def _measure(self, model: nn.Module, batches: Iterable[Any]) -> tuple[dict[str, float], torch.Tensor]:
        check_module(model)
        flags = {m: m.training for m in model.modules()}
        model.eval()
        hits: list[torch.Tensor] = []
        loss = 0.0
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    x, y = _pair(batch, "val_loader", i)
                    logits = _run(model, x, f"val_loader batch {i}")
                    check_targets(logits, y, f"val_loader batch {i}")
                    loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                    hits.append((logits.argmax(-1) == y).reshape(-1).double())
        finally:
            for m, f in flags.items():
                m.training = f
        correct = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.float64)
        if correct.numel() == 0:
            raise ConfigError("val_loader yielded no examples")
        total = correct.numel()
        return {"accuracy": int(correct.sum()) / total, "loss": loss / total}, correct

    def _batches(self) -> Iterator[tuple[int, tuple[Any, Any]]]:
        """(index within the pass, (inputs, targets)) over the training batches, cycling."""
        while True:
            empty = True
            for i, batch in enumerate(self.train_loader):
                empty = False
                yield i, _pair(batch, "train_loader", i)
            if empty:
                raise ConfigError(_EMPTY_TRAIN)

    def training_batches(self) -> Iterator[tuple[Any, Any]]:
        """The training batches as ``(inputs, targets)``, cycling (an empty ``train_loader`` raises)."""
        return (pair for _, pair in self._batches())

    def loss(self, model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The fine-tune loss on one batch (cross-entropy, blended with distillation when a teacher is set)."""
        return self._loss(model, x, y, "the batch given to loss()")

    def _loss(self, model: nn.Module, x: Any, y: Any, where: str) -> torch.Tensor:
        logits = _run(model, x, where)
        ce = nn.functional.cross_entropy(logits, check_targets(logits, y, where))
        if self.teacher is None:
            return ce
        with torch.no_grad():
            soft = logits_of(call_model(self.teacher, x))
        t = self.temperature
        kd = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, -1), nn.functional.softmax(soft / t, -1), reduction="batchmean"
        )
        return self.alpha * kd * t * t + (1 - self.alpha) * ce

    def finetune(self, model: nn.Module, steps: int) -> None:
        """``steps`` optimizer steps of Adam on the training batches (cycling), in train mode.

        A step that fails changes nothing (the buffers its forward pass updated are put back), so an
        error at step 0 leaves the model as it was; the steps before a failing one stay applied (the
        controller rolls the whole step back). A NaN or infinite loss raises
        :class:`~adaprune.errors.NonFiniteError` naming the step.
        """
        check_module(model)
        steps = as_int(steps, "steps", low=0, hint="the number of optimizer steps")
        if steps == 0:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        flags = {m: m.training for m in model.modules()}
        model.train()
        try:
            for step, (i, (x, y)) in enumerate(itertools.islice(self._batches(), steps)):
                self._step(model, opt, step, x, y, f"train_loader batch {i}")
        finally:
            for m, f in flags.items():
                m.training = f
            for p in params:
                p.grad = None

    def _step(self, model: nn.Module, opt: torch.optim.Optimizer, step: int, x: Any, y: Any, where: str) -> None:
        """One optimizer step (on this process's slice of the batch under torchrun); if it fails, the buffers
        its forward pass changed are restored."""
        x, y = shard((x, y))
        optimizer_step(model, opt, lambda: self._loss(model, x, y, where), f"finetune step {step} ({where})", self.lr)
