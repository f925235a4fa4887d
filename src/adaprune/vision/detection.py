"""Object detection as a task: COCO mAP (torchmetrics' MeanAveragePrecision on pycocotools) on a
validation set, fine-tuning with the detector's own loss.

:class:`DetectionTask` speaks torchvision's detection API, which most PyTorch detectors follow:

- batches are ``(images, targets)``: ``images`` a list of ``(3, H, W)`` tensors (or one batched
  tensor), ``targets`` a list of dicts with ``"boxes"`` (``(K, 4)`` float, ``xyxy`` pixels) and
  ``"labels"`` (``(K,)`` int64);
- in train mode ``model(images, targets)`` returns a dict of losses (summed for fine-tuning); a model
  that computes its loss another way passes ``loss=`` (``loss(model, images, targets) -> scalar``);
- in eval mode ``model(images)`` returns one dict per image with ``"boxes"``, ``"scores"`` and
  ``"labels"`` (``predict=`` converts another output to that).

``evaluate`` reports ``map`` (mAP@[.5:.95], the primary metric by default), ``map_50``, ``map_75``
and ``mar_100``, and ``loss``: the detector's loss on the validation batches, computed in train mode
with gradients off, the random sampling of proposals seeded and the buffers put back, as the smooth
signal the controllers rank moves by. mAP is a whole-set statistic, so there are no per-image values
(:func:`adaprune.adapt` judges it without the noise-aware interval).

Needs torchmetrics and pycocotools (``pip install adaprune[detection]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._check import a_type, check_callable, check_choice, check_module, clip
from ..errors import ConfigError
from ..task import ClassificationTask, _pair

METRICS = ("map", "map_50", "map_75", "mar_100")


def _images(x: Any, where: str) -> list[torch.Tensor]:
    if isinstance(x, tuple) and len(x) == 1 and isinstance(x[0], (list, torch.Tensor)):
        x = x[0]  # (images,): the positional arguments of model(images), as calibration() hands them out
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return list(x)
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, torch.Tensor) and i.dim() == 3 for i in x):
        return list(x)
    raise ConfigError(f"{where}: images are {a_type(x)}; expected a list of (C, H, W) tensors or an (N, C, H, W) tensor")


def _targets(y: Any, n: int, where: str) -> list[dict[str, torch.Tensor]]:
    ok = isinstance(y, (list, tuple)) and len(y) == n
    if ok:
        for t in y:
            boxes, labels = (t.get("boxes"), t.get("labels")) if isinstance(t, dict) else (None, None)
            ok = (isinstance(boxes, torch.Tensor) and isinstance(labels, torch.Tensor) and boxes.dim() == 2
                  and boxes.shape[-1] == 4 and labels.shape == boxes.shape[:1] and not labels.dtype.is_floating_point)
            if not ok:
                break
    if not ok:
        raise ConfigError(f"{where}: targets are {a_type(y)}; expected a list of {n} dicts with 'boxes' ((K, 4) "
                          "xyxy floats) and 'labels' ((K,) integers), one per image")
    return list(y)


def _restore(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers and b.shape == buffers[n].shape:
                b.copy_(buffers[n])


class DetectionTask(ClassificationTask):
    """Object detection: COCO mAP on ``val_loader``, fine-tuning with the detector's own loss.

    Args:
        train_loader, val_loader: iterables of ``(images, targets)`` batches (torchvision's format).
        metric: the primary metric, one of ``"map"`` (default), ``"map_50"``, ``"map_75"``, ``"mar_100"``.
        loss: ``loss(model, images, targets) -> scalar`` for a model that does not return a dict of
            losses in train mode; default: the sum of that dict.
        predict: ``predict(model, images) -> list of {"boxes", "scores", "labels"}``; default
            ``model(images)`` in eval mode.
        lr, weight_decay, calibration_batches: as for :class:`~adaprune.ClassificationTask`
            (Adam; no distillation for detectors).
    """

    metric = "map"
    higher_is_better = True
    # the validation loss is the detector's training loss: its box head sees proposals that include the
    # ground-truth boxes, so it misses what inference loses when the RPN's proposals get worse (a cut that
    # lowered the loss lost 0.13 mAP, benchmarks/vision.py); adapt measures harm by mAP instead
    loss_tracks_metric = False

    def __init__(
        self,
        train_loader: Iterable[tuple[Any, Any]],
        val_loader: Iterable[tuple[Any, Any]],
        *,
        metric: str = "map",
        loss: Callable[[nn.Module, Any, Any], torch.Tensor] | None = None,
        predict: Callable[[nn.Module, Any], Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        calibration_batches: int = 4,
    ) -> None:
        super().__init__(train_loader, val_loader, lr=lr, weight_decay=weight_decay,
                         calibration_batches=calibration_batches)
        self.metric = check_choice(metric, "metric", METRICS, where="DetectionTask")
        if loss is not None:
            check_callable(loss, "loss", "a function (model, images, targets) -> scalar tensor, or None")
        if predict is not None:
            check_callable(predict, "predict", "a function (model, images) -> one dict per image, or None")
        self.loss_fn = loss
        self.predict_fn = predict

    def calibration(self) -> list[tuple[Any, Any]]:
        """The first ``calibration_batches`` training batches, each as ``((images,), targets)``: the
        images are the one positional argument of ``model(images)`` (a bare list would be spread into
        several arguments where adaprune calls the model, e.g. to recalibrate BatchNorm)."""
        return [((list(_images(x, f"train_loader batch {i}")),), y) for i, (x, y) in enumerate(super().calibration())]

    def set_teacher(self, model: nn.Module) -> None:
        """Nothing: detectors are fine-tuned on their own loss."""
        check_module(model)

    def _loss(self, model: nn.Module, x: Any, y: Any, where: str) -> torch.Tensor:
        images = _images(x, where)
        targets = _targets(y, len(images), where)
        if self.loss_fn is not None:
            value = self.loss_fn(model, images, targets)
        else:
            flags = {m: m.training for m in model.modules()}
            model.train()  # torchvision's detectors compute their losses in train mode only
            try:
                value = model(images, targets)
            except (ConfigError, Warning):
                raise
            except Exception as exc:
                raise ConfigError(f"the detector failed on {where} ({type(exc).__name__}: {clip(str(exc))}); in "
                                  "train mode model(images, targets) must return a dict of losses, else pass "
                                  "loss=") from exc
            finally:
                for m, f in flags.items():
                    m.training = f
            if not isinstance(value, dict) or not value:
                raise ConfigError(f"{where}: in train mode the detector returned {a_type(value)}, not a dict of "
                                  "losses; pass DetectionTask(loss=...) for a detector that computes its loss another way")
            value = sum(value.values())  # type: ignore[assignment]
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConfigError(f"{where}: the detection loss is {a_type(value)}; expected a scalar tensor")
        return value.reshape(())

    def _predict(self, model: nn.Module, images: list[torch.Tensor], where: str) -> list[dict[str, torch.Tensor]]:
        try:
            out = self.predict_fn(model, images) if self.predict_fn is not None else model(images)
        except (ConfigError, Warning):
            raise
        except Exception as exc:
            raise ConfigError(f"the detector failed on {where} ({type(exc).__name__}: {clip(str(exc))})") from exc
        keys = ("boxes", "scores", "labels")
        if not (isinstance(out, (list, tuple)) and len(out) == len(images)
                and all(isinstance(o, dict) and all(k in o for k in keys) for o in out)):
            raise ConfigError(f"{where}: the detector returned {a_type(out)}; expected one dict with 'boxes', "
                              "'scores' and 'labels' per image (pass predict= to convert another output)")
        return [{k: o[k].detach() for k in keys} for o in out]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """mAP@[.5:.95], mAP@.5, mAP@.75, mAR@100 and the mean loss on ``val_loader``; no per-image values."""
        from torchmetrics.detection import MeanAveragePrecision

        check_module(model)
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        flags = {m: m.training for m in model.modules()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        loss, batches = 0.0, 0
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.val_loader):
                    x, y = _pair(batch, "val_loader", i)
                    where = f"val_loader batch {i}"
                    images = _images(x, where)
                    targets = _targets(y, len(images), where)
                    model.eval()
                    metric.update(self._predict(model, images, where), [
                        {"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets])
                    try:
                        with torch.random.fork_rng():
                            torch.manual_seed(i)
                            loss += float(self._loss(model, images, targets, where))
                    finally:
                        _restore(model, buffers)  # train mode moved BatchNorm statistics: put them back
                    batches += 1
        finally:
            for m, f in flags.items():
                m.training = f
        if not batches:
            raise ConfigError("val_loader yielded no examples")
        result = metric.compute()
        out = {k: float(result[k]) for k in METRICS}
        out["loss"] = loss / batches
        return out, None
