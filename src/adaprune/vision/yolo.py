"""Ultralytics YOLO models as a task: their own data pipeline, loss and validator.

:class:`YOLOTask` lets a YOLO user call :func:`adaprune.adapt` on their model and their ``data.yaml``
without writing a loader, a loss or a metric. Everything task-specific is Ultralytics' own, taken from
the trainer Ultralytics uses for the model's task (detect, segment, pose, obb, classify):

- batches come from that trainer's dataloaders (its augmentation for training, letterboxed images for
  validation), and are preprocessed by it;
- fine-tuning minimises the model's own loss (``model.loss(batch)``, the sum of its parts per image)
  with Adam, on every parameter but the fixed DFL projection, as Ultralytics' trainer does;
- ``evaluate`` runs Ultralytics' validator (its NMS, its matching, its mAP) on a copy of the model (the
  validator fuses Conv and BatchNorm in place), and adds ``loss``, the model's loss on the validation
  batches in eval mode, as the smooth signal controllers rank moves by.

Metric names: ``map`` (mAP@[.5:.95] of the boxes, the primary metric for detect and obb), ``map_50``,
``precision``, ``recall``; ``mask_map``/``mask_map_50`` (segment; ``mask_map`` is primary), ``pose_map``/
``pose_map_50`` (pose; ``pose_map`` primary); ``top1`` (primary) and ``top5`` (classify); ``fitness``
(Ultralytics' weighted mAP) and ``loss``. mAP is a whole-set statistic: there are no per-image values.

A pruned YOLO model is trained further by Ultralytics' trainer through :func:`ultralytics_trainer`
(``YOLO.train`` would rebuild the model from its yaml at full width), validated by its validator and
exported by ``YOLO(...).export``; see docs/applications.md. Needs ``pip install adaprune[detection]``.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._check import a_type, as_float, as_int, check_choice, check_module, clip
from ..errors import ConfigError
from ..meta import plain_copy
from ..task import Task, optimizer_step

_SUFFIX = {"B": "", "M": "mask_", "P": "pose_"}
PRIMARY = {"detect": "map", "obb": "map", "segment": "mask_map", "pose": "pose_map", "classify": "top1"}


def _ultralytics() -> Any:
    try:
        import ultralytics
    except ImportError as exc:
        raise ConfigError("YOLOTask needs Ultralytics: pip install ultralytics (or adaprune[detection])") from exc
    return ultralytics


def network(model: Any) -> nn.Module:
    """The ``nn.Module`` inside an Ultralytics ``YOLO`` object (its ``.model``), or ``model`` itself
    when it is already an Ultralytics network; anything else is a ConfigError."""
    from ultralytics.engine.model import Model
    from ultralytics.nn.tasks import BaseModel

    net = model.model if isinstance(model, Model) else model
    if not isinstance(net, BaseModel):
        raise ConfigError(f"model is {a_type(model)}; expected an Ultralytics YOLO object or its .model "
                          "(e.g. YOLO('yolov8n.yaml').model or YOLO('best.pt'))")
    return net


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Ultralytics' logger at WARNING (its progress bars follow it) for the duration."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(30)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def metric_name(key: str) -> str | None:
    """Ultralytics' stats key (``metrics/mAP50-95(B)``) as this task's metric name (``map``)."""
    if key == "fitness":
        return "fitness"
    if key.startswith("metrics/accuracy_top"):
        return "top" + key.rsplit("top", 1)[1]
    if not key.startswith("metrics/") or not key.endswith(")"):
        return None
    stat, kind = key[len("metrics/"):-1].split("(")
    base = {"mAP50-95": "map", "mAP50": "map_50", "precision": "precision", "recall": "recall"}.get(stat)
    return None if base is None or kind not in _SUFFIX else _SUFFIX[kind] + base


def ultralytics_trainer(model: Any, data: str | Path, **overrides: Any) -> Any:
    """Ultralytics' own trainer for ``model``'s task, on ``data``, training ``model`` as it is.

    ``YOLO(...).train`` rebuilds the network from its yaml before training (a pruned model would come
    back at full width); this hands the pruned network to the trainer instead. ``overrides`` are
    Ultralytics' training arguments (``epochs``, ``imgsz``, ``batch``, ``project`` ...). Call
    ``.train()`` on the result; the trained network is ``trainer.model`` (the EMA of it is saved to
    ``trainer.best`` / ``trainer.last``)."""
    _ultralytics()
    from ultralytics.models import yolo
    from ultralytics.nn.tasks import guess_model_task

    net = network(model)
    kind = guess_model_task(net)
    trainer_cls = {"detect": yolo.detect.DetectionTrainer, "segment": yolo.segment.SegmentationTrainer,
                   "pose": yolo.pose.PoseTrainer, "obb": yolo.obb.OBBTrainer,
                   "classify": yolo.classify.ClassificationTrainer}[kind]
    args = {"model": str(getattr(net, "yaml", {}).get("yaml_file", "yolo.yaml")), "data": str(data), "task": kind}
    args.update(overrides)
    trainer: Any = trainer_cls(overrides=args)
    trainer.model = net  # setup_model() keeps a model it is given
    return trainer


class YOLOTask(Task):
    """An Ultralytics YOLO model on its ``data.yaml``: Ultralytics' dataloaders, loss and validator.

    Args:
        model: the YOLO object (``YOLO('best.pt')``) or its network (``.model``) that will be pruned;
            read for its task (detect, segment, pose, obb, classify) and its classes, which must be
            those of ``data``.
        data: the dataset as Ultralytics takes it (a ``data.yaml`` path; a folder for classify).
        imgsz, batch: image size and batch size of both loaders (validation batches are twice as big).
        lr, weight_decay: Adam's, for fine-tuning.
        metric: the primary metric (see the module's list); default by task (``map`` for detect).
        calibration_batches: how many training batches :meth:`calibration` hands out.
        project: where Ultralytics may write (its trainer saves its arguments); default a temporary folder.
        **overrides: further Ultralytics arguments (e.g. ``mosaic=0.0``, ``fraction=0.5``, ``workers=0``).
    """

    higher_is_better = True

    def __init__(self, model: Any, data: str | Path, *, imgsz: int = 640, batch: int = 16, lr: float = 1e-4,
                 weight_decay: float = 0.0, metric: str | None = None, calibration_batches: int = 4,
                 project: str | Path | None = None, **overrides: Any) -> None:
        _ultralytics()
        from ultralytics.nn.tasks import guess_model_task

        net: Any = network(model)
        self.kind = guess_model_task(net)
        self.imgsz = as_int(imgsz, "imgsz", low=32, hint="the image size, e.g. 640")
        self.batch = as_int(batch, "batch", low=1)
        self.lr = as_float(lr, "lr", low=0.0, low_open=True, hint="the fine-tune learning rate, e.g. 1e-4")
        self.weight_decay = as_float(weight_decay, "weight_decay", low=0.0)
        self.calibration_batches = as_int(calibration_batches, "calibration_batches", low=1)
        choices = sorted(set(PRIMARY.values()) | {"map_50", "mask_map_50", "pose_map_50", "precision", "recall",
                                                   "top5", "fitness"})
        self.metric = check_choice(metric or PRIMARY[self.kind], "metric", choices, where="YOLOTask")
        if not isinstance(data, (str, Path)):
            raise ConfigError(f"YOLOTask: data is {a_type(data)}; expected the path of a data.yaml "
                              "(or a classification dataset folder)")
        self.project = str(project) if project is not None else tempfile.mkdtemp(prefix="adaprune-yolo-")
        settings = {"imgsz": self.imgsz, "batch": self.batch, "workers": 0, "plots": False, "verbose": False,
                    "device": "cpu", "project": self.project, "name": "task", "exist_ok": True, "val": False}
        settings.update(overrides)
        try:
            with quiet():
                self.trainer = ultralytics_trainer(net, data, **settings)
        except (ConfigError, Warning):
            raise
        except Exception as exc:
            raise ConfigError(f"YOLOTask: Ultralytics could not set up data={str(data)!r} for a {self.kind} model "
                              f"({type(exc).__name__}: {clip(str(exc))})") from exc
        nc = int(self.trainer.data["nc"])
        head = net.model[-1]
        head_nc = int(getattr(head, "nc", getattr(getattr(head, "linear", None), "out_features", nc)))
        if head_nc != nc:
            raise ConfigError(f"YOLOTask: the model predicts {head_nc} classes and {data} has {nc}; build the model "
                              f"for this data (e.g. DetectionModel('yolov8n.yaml', nc={nc})) or train it on it first")
        self._loaders: dict[str, Any] = {}

    # ----------------------------------------------------------------------------- data
    def _loader(self, mode: str) -> Any:
        if mode not in self._loaders:
            split = self.trainer.data["train" if mode == "train" else "val"]
            size = self.batch if mode == "train" else 2 * self.batch
            with quiet():
                self._loaders[mode] = self.trainer.get_dataloader(split, size, rank=-1, mode=mode)
        return self._loaders[mode]

    def _prepared(self, net: nn.Module) -> None:
        """The attributes Ultralytics' trainer sets on a model before its loss runs (classes, names,
        hyperparameters); a model that already has a namespace of hyperparameters keeps its own."""
        net.nc = self.trainer.data["nc"]  # type: ignore[assignment]
        net.names = self.trainer.data["names"]  # type: ignore[assignment]
        if not hasattr(getattr(net, "args", None), "box"):
            net.args = self.trainer.args  # type: ignore[assignment]

    def _batches(self, mode: str) -> Iterator[dict[str, Any]]:
        loader = self._loader(mode)
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield self.trainer.preprocess_batch(batch)
            if empty:
                raise ConfigError(f"YOLOTask: the {mode} split of the data has no images")

    def calibration(self) -> list[tuple[Any, Any]]:
        """``(images, batch)`` pairs: the first ``calibration_batches`` training batches."""
        return [(b["img"], b) for b in itertools.islice(self._batches("train"), self.calibration_batches)]

    def training_batches(self) -> Iterator[tuple[Any, Any]]:
        return ((b["img"], b) for b in self._batches("train"))

    # ----------------------------------------------------------------------------- loss
    def loss(self, model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        """The model's own loss on one batch (``y`` the Ultralytics batch dict, ``x`` its images), per image."""
        return self._loss(model, x, y, "the batch given to loss()")

    def _loss(self, model: nn.Module, x: Any, y: Any, where: str, preds: Any = None) -> torch.Tensor:
        if not isinstance(y, dict) or "img" not in y:
            raise ConfigError(f"{where}: targets are {a_type(y)}; expected an Ultralytics batch dict (from "
                              "YOLOTask.training_batches())")
        self._prepared(model)
        batch = dict(y, img=x)
        own: Any = model.loss
        try:
            value, _items = own(batch, preds) if preds is not None else own(batch)
        except (ConfigError, Warning):
            raise
        except Exception as exc:
            raise ConfigError(f"the YOLO loss failed on {where} ({type(exc).__name__}: {clip(str(exc))})") from exc
        return value.sum() / x.shape[0]

    def set_teacher(self, model: nn.Module) -> None:
        """Nothing: YOLO models are fine-tuned on their own loss."""
        check_module(model)

    def finetune(self, model: nn.Module, steps: int) -> None:
        """``steps`` Adam steps on Ultralytics' training batches (its augmentation), in train mode."""
        check_module(model)
        steps = as_int(steps, "steps", low=0, hint="the number of optimizer steps")
        if steps == 0:
            return
        # As Ultralytics' trainer does: everything trains but the fixed DFL projection (a model loaded
        # from a checkpoint comes with gradients off); the flags are put back afterwards.
        grads = {p: p.requires_grad for p in model.parameters()}
        params = [p for n, p in model.named_parameters() if ".dfl" not in n and p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        flags = {m: m.training for m in model.modules()}
        model.train()
        try:
            for step, batch in enumerate(itertools.islice(self._batches("train"), steps)):
                where = f"finetune step {step}"

                def step_loss(b: dict[str, Any] = batch, w: str = where) -> torch.Tensor:
                    return self._loss(model, b["img"], b, w)

                optimizer_step(model, opt, step_loss, where, self.lr)
        finally:
            for m, f in flags.items():
                m.training = f
            for p in params:
                p.grad = None
            for p, g in grads.items():
                p.requires_grad_(g)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Ultralytics' validator on a copy of ``model``, and the model's loss on the validation batches."""
        check_module(model)
        self._prepared(model)
        flags = {m: m.training for m in model.modules()}
        loss, batches = 0.0, 0
        try:
            model.eval()
            with torch.no_grad():
                for batch in itertools.islice(self._batches("val"), len(self._loader("val"))):
                    where = f"validation batch {batches}"
                    loss += float(self._loss(model, batch["img"], batch, where, preds=model(batch["img"])))
                    batches += 1
            self.trainer.test_loader = self._loader("val")
            validator = self.trainer.get_validator()
            with quiet():
                stats = validator(model=plain_copy(model))
        except (ConfigError, Warning):
            raise
        except Exception as exc:
            raise ConfigError(f"Ultralytics' validator failed ({type(exc).__name__}: {clip(str(exc))})") from exc
        finally:
            for m, f in flags.items():
                m.training = f
        out = {name: float(v) for k, v in stats.items() if (name := metric_name(k)) is not None}
        out["loss"] = loss / max(batches, 1)
        if self.metric not in out:
            raise ConfigError(f"YOLOTask: metric={self.metric!r} is not among what the {self.kind} validator "
                              f"reports ({', '.join(sorted(out))})")
        return out
