"""Semantic segmentation as a task: Dice and mean IoU (torchmetrics), per image, on a validation set.

:class:`SegmentationTask` follows :class:`~adaprune.ClassificationTask` (Adam fine-tuning on the
training batches, BatchNorm-safe steps, distillation from the unpruned model) with per-pixel logits:

- the model's output is ``(N, C, *spatial)`` logits (2-D or 3-D); a dict is read at ``"out"``
  (torchvision's FCN, DeepLabV3, LRASPP), an object at ``.logits`` (Hugging Face); ``C == 1`` is binary
  (foreground where the logit is above 0);
- targets are class indices ``(N, *spatial)``, or ``(N, 1, *spatial)`` as MONAI's transforms give them;
- the metrics are torchmetrics' ``dice_score`` (macro over classes) and ``mean_iou``, computed per
  image and averaged over images, so the per-image values are what :func:`adaprune.adapt`'s
  noise-aware judge pairs (an image where a class is absent from both prediction and target does not
  count that class; an image with no class to count scores 1);
- ``evaluate`` also reports ``"loss"``, the mean training loss on the validation batches, the smooth
  signal the controllers rank moves by;
- ``inferer``: how the model is run at evaluation, e.g. MONAI's ``SlidingWindowInferer`` for volumes
  larger than the network's patch (called as ``inferer(inputs, model)``, MONAI's convention).

torchmetrics is needed for ``evaluate`` (``pip install adaprune[medical]`` or ``[detection]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._check import a_type, as_bool, check_callable, check_choice, check_module, clip
from ..calls import call_model
from ..errors import ConfigError
from ..task import ClassificationTask, _pair, check_targets

METRICS = ("dice", "miou")


def seg_logits(output: Any) -> torch.Tensor:
    """A segmentation model's output as ``(N, C, *spatial)`` logits."""
    out = output
    if isinstance(out, dict):
        if "out" not in out:
            raise ConfigError(f"the model returned a dict with keys {sorted(map(str, out))}; a segmentation "
                              "model's dict output needs its logits at 'out' (as torchvision's models give them)")
        out = out["out"]
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() < 3:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else a_type(out)
        raise ConfigError(f"the model's output is {got}; a segmentation model must return (N, C, H, W) or "
                          "(N, C, D, H, W) logits")
    return out


def _labels(logits: torch.Tensor, y: Any, where: str) -> torch.Tensor:
    """``y`` as ``(N, *spatial)`` integer class indices fitting ``logits``, else a ConfigError (a channel
    of 1 after N, as MONAI gives masks, is dropped; whole-number float masks become integers)."""
    if isinstance(y, torch.Tensor) and y.dim() == logits.dim() and y.shape[1] == 1:
        y = y[:, 0]
    if isinstance(y, torch.Tensor) and y.dtype.is_floating_point and bool((y == y.round()).all()):
        y = y.long()
    view = logits.movedim(1, -1)  # classes last, as check_targets reads them
    if view.shape[-1] == 1:  # binary: classes 0 and 1
        view = view.expand(*view.shape[:-1], 2)
    return check_targets(view, y, where).long()


def _predict(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def per_image_scores(logits: torch.Tensor, y: torch.Tensor, include_background: bool) -> dict[str, torch.Tensor]:
    """Dice (macro over classes) and IoU of every image of a batch, by torchmetrics."""
    from torchmetrics.functional.segmentation import dice_score, mean_iou

    classes = max(int(logits.shape[1]), 2)
    pred = _predict(logits)
    dice = dice_score(pred, y, num_classes=classes, include_background=include_background, average="macro",
                      input_format="index")
    iou = mean_iou(pred, y, num_classes=classes, include_background=include_background, input_format="index")
    return {"dice": torch.nan_to_num(dice.double(), nan=1.0), "miou": torch.nan_to_num(iou.double(), nan=1.0)}


class SegmentationTask(ClassificationTask):
    """Semantic segmentation: Dice or mean IoU on ``val_loader``, fine-tuning on ``train_loader``.

    Args:
        train_loader, val_loader: iterables of ``(images, masks)`` batches (a list or a DataLoader);
            masks are class indices.
        metric: ``"dice"`` (default) or ``"miou"``, the primary metric; both are reported.
        include_background: count class 0 in the metrics (default False, the medical convention:
            Dice of the foreground classes).
        loss: the training loss, ``loss(logits, masks) -> scalar``; default cross-entropy (binary
            cross-entropy for a one-channel output). MONAI's ``DiceCELoss(to_onehot_y=True,
            softmax=True)`` fits as it is.
        inferer: how the model runs at evaluation, ``inferer(images, model) -> logits`` (e.g.
            ``monai.inferers.SlidingWindowInferer``); default ``model(images)``.
        lr, weight_decay, distill, temperature, alpha, calibration_batches: as for
            :class:`~adaprune.ClassificationTask` (distillation is per pixel).
    """

    metric = "dice"
    higher_is_better = True

    def __init__(
        self,
        train_loader: Iterable[tuple[Any, Any]],
        val_loader: Iterable[tuple[Any, Any]],
        *,
        metric: str = "dice",
        include_background: bool = False,
        loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        inferer: Callable[[Any, nn.Module], Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        distill: bool = False,
        temperature: float = 4.0,
        alpha: float = 0.5,
        calibration_batches: int = 4,
    ) -> None:
        super().__init__(train_loader, val_loader, lr=lr, weight_decay=weight_decay, distill=distill,
                         temperature=temperature, alpha=alpha, calibration_batches=calibration_batches)
        self.metric = check_choice(metric, "metric", METRICS, where="SegmentationTask")
        self.include_background = as_bool(include_background, "include_background")
        if loss is not None:
            check_callable(loss, "loss", "a function (logits, masks) -> scalar tensor, or None")
        if inferer is not None:
            check_callable(inferer, "inferer", "a function (images, model) -> logits, or None")
        self.loss_fn = loss
        self.inferer = inferer

    def _logits(self, model: nn.Module, x: Any, where: str, infer: bool = False) -> torch.Tensor:
        try:
            out = self.inferer(x, model) if infer and self.inferer is not None else call_model(model, x)
        except (ConfigError, Warning):
            raise
        except Exception as exc:
            raise ConfigError(f"the model failed on {where} ({type(exc).__name__}: {clip(str(exc))}); check that "
                              "the batch's images are what model(...) accepts") from exc
        return seg_logits(out)

    def _train_loss(self, logits: torch.Tensor, y: Any, where: str) -> torch.Tensor:
        if self.loss_fn is not None:
            value = self.loss_fn(logits, y)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ConfigError(f"SegmentationTask: loss(logits, masks) returned {a_type(value)} on {where}; "
                                  "expected a scalar tensor")
            return value.reshape(())
        labels = _labels(logits, y, where)
        if logits.shape[1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
        return nn.functional.cross_entropy(logits, labels)

    def _loss(self, model: nn.Module, x: Any, y: Any, where: str) -> torch.Tensor:
        logits = self._logits(model, x, where)
        loss = self._train_loss(logits, y, where)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            soft = seg_logits(call_model(self.teacher, x))
        t = self.temperature
        if logits.shape[1] == 1:  # binary: the two-class distribution of each pixel
            logits, soft = torch.cat([-logits, logits], 1), torch.cat([-soft, soft], 1)
        kd = nn.functional.kl_div(nn.functional.log_softmax(logits / t, 1), nn.functional.softmax(soft / t, 1),
                                  reduction="none").sum(1).mean()
        return self.alpha * kd * t * t + (1 - self.alpha) * loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """Dice, mean IoU and the mean loss on ``val_loader``, and the primary metric of every image."""
        check_module(model)
        flags = {m: m.training for m in model.modules()}
        model.eval()
        scores: dict[str, list[torch.Tensor]] = {k: [] for k in METRICS}
        loss, images = 0.0, 0
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.val_loader):
                    x, y = _pair(batch, "val_loader", i)
                    where = f"val_loader batch {i}"
                    logits = self._logits(model, x, where, infer=True)
                    labels = _labels(logits, y, where)
                    loss += float(self._train_loss(logits, y, where)) * logits.shape[0]
                    images += logits.shape[0]
                    for k, v in per_image_scores(logits, labels, self.include_background).items():
                        scores[k].append(v.reshape(-1))
        finally:
            for m, f in flags.items():
                m.training = f
        if not images:
            raise ConfigError("val_loader yielded no examples")
        values = {k: torch.cat(v) for k, v in scores.items()}
        out = {k: float(v.mean()) for k, v in values.items()}
        out["loss"] = loss / images
        return out, values[self.metric]
