"""Tasks: what a model is for, as the adaptive controller sees it.

A task evaluates a model (``evaluate(model) -> {metric: value}``, with a named primary metric and
its direction), may fine-tune it (``finetune(model, steps)``) and may hand out calibration batches.
:class:`ClassificationTask` is a ready supervised classification task with a short fine-tune loop,
BatchNorm recalibration and optional knowledge distillation from the unpruned model (Hinton et al.,
2015, "Distilling the Knowledge in a Neural Network").
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import ConfigError
from .graph import call_model


@runtime_checkable
class Task(Protocol):
    """What the controller needs from the user's task."""

    metric: str
    higher_is_better: bool

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on held-out data; must include ``self.metric``."""
        ...


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


class ClassificationTask:
    """Supervised classification: accuracy on ``val_loader``, fine-tuning on ``train_loader``.

    Args:
        train_loader: iterable of ``(inputs, targets)`` batches used to fine-tune and calibrate.
        val_loader: iterable of ``(inputs, targets)`` batches the metric is measured on.
        lr: learning rate of the fine-tune optimizer (Adam).
        distill: blend the loss with distillation from the unpruned model (set by the controller
            through :meth:`set_teacher`).
        temperature, alpha: distillation temperature and weight of the distillation term.
        calibration_batches: how many training batches :meth:`calibration` hands out.
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
        if lr <= 0:
            raise ConfigError(f"lr={lr} must be positive")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha={alpha} must be in [0, 1] (weight of the distillation loss)")
        if temperature <= 0:
            raise ConfigError(f"temperature={temperature} must be positive")
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.lr = lr
        self.weight_decay = weight_decay
        self.distill = distill
        self.temperature = temperature
        self.alpha = alpha
        self.calibration_batches = calibration_batches
        self.teacher: nn.Module | None = None

    def set_teacher(self, model: nn.Module) -> None:
        """Keep a frozen copy of ``model`` (the unpruned one) to distil from, if ``distill``."""
        if self.distill:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def calibration(self) -> list[tuple[Any, Any]]:
        return list(itertools.islice(iter(self.train_loader), self.calibration_batches))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        flags = {m: m.training for m in model.modules()}
        model.eval()
        correct = total = 0
        loss = 0.0
        try:
            with torch.no_grad():
                for x, y in self.val_loader:
                    logits = logits_of(call_model(model, x))
                    loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(-1) == y).sum())
                    total += int(y.numel())
        finally:
            for m, f in flags.items():
                m.training = f
        if total == 0:
            raise ConfigError("val_loader yielded no examples")
        return {"accuracy": correct / total, "loss": loss / total}

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        while True:
            empty = True
            for batch in self.train_loader:
                empty = False
                yield batch
            if empty:
                raise ConfigError("train_loader yielded no batches")

    def loss(self, model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        logits = logits_of(call_model(model, x))
        ce = nn.functional.cross_entropy(logits, y)
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
        """``steps`` optimizer steps of Adam on the training batches (cycling), in train mode."""
        if steps <= 0:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        flags = {m: m.training for m in model.modules()}
        model.train()
        try:
            for x, y in itertools.islice(self._batches(), steps):
                opt.zero_grad(set_to_none=True)
                self.loss(model, x, y).backward()
                opt.step()
        finally:
            for m, f in flags.items():
                m.training = f
            for p in params:
                p.grad = None
