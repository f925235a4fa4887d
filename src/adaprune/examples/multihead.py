"""Two tasks on one trunk, from sklearn's digits: a real multi-task setting that needs no download.

The trunk (two linear layers) feeds a classification head (the digit; accuracy, higher is better)
and a regression head for a target derived from the image: how much more ink its top half holds
than its bottom half, standardised (mean squared error, lower is better). The two tasks need
different features, so pruning guided by one of them can ruin the other. Used by the multi-task
tests and ``benchmarks/multitask.py``.

A convolutional variant (:class:`ConvTwoHead`, :func:`trained_conv`, :func:`conv_tasks`) gives the two tasks
layers they need differently: two 8x8 convolutions feed both a segmentation head, which marks the pixels where
the clean digit has ink (> 0.5) from the image with Gaussian noise added (per-pixel error, lower is better), and,
after 2x2 max-pooling, two wider convolutions feeding the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .digits import load_digits_data


class TwoHead(nn.Module):
    """A shared MLP trunk, a classifier head (``"logits"``) and a regression head (``"value"``)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.cls = nn.Linear(width, 10)
        self.reg = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"logits": self.cls(h), "value": self.reg(h).squeeze(-1)}


class ConvTwoHead(nn.Module):
    """Two 3x3 convolutions of ``width`` channels at 8x8 (``stem``), shared; a segmentation head on them
    (``"mask"``: one logit per pixel) and, after 2x2 max-pooling, two 3x3 convolutions of ``4 * width``
    channels (``deep``) feeding a classifier (``"logits"``)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU())
        self.deep = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 4 * width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU())
        self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))
        self.seg = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.stem(x)
        return {"logits": self.cls(self.deep(h)), "mask": self.seg(h).squeeze(1)}


def ink(x: torch.Tensor) -> torch.Tensor:
    """The regression target: the top half's mean intensity minus the bottom half's, over 0.1."""
    return (x[:, 0, :4].mean(dim=(1, 2)) - x[:, 0, 4:].mean(dim=(1, 2))) / 0.1


class HeadTask:
    """One head's task (the task protocol): ``kind`` ``"cls"`` (accuracy of ``"logits"``), ``"reg"``
    (mean squared error of ``"value"``) or ``"seg"`` (the fraction of pixels ``"mask"``'s logits get wrong,
    trained with per-pixel binary cross-entropy), evaluated on ``(xv, yv)``, trained on ``(x, y)``."""

    def __init__(self, kind: str, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                 lr: float = 1e-3) -> None:
        if kind not in ("cls", "reg", "seg"):
            raise ValueError(f"kind must be 'cls', 'reg' or 'seg', got {kind!r}")
        self.kind, self.x, self.y, self.xv, self.yv, self.lr = kind, x, y, xv, yv, lr
        self.metric = {"cls": "accuracy", "reg": "mse", "seg": "pixel_error"}[kind]
        self.higher_is_better = kind == "cls"

    def loss_fn(self, output: Any, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return nn.functional.cross_entropy(output["logits"], y)
        if self.kind == "seg":
            return nn.functional.binary_cross_entropy_with_logits(output["mask"], y)
        return nn.functional.mse_loss(output["value"], y)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(model(x), y)

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.xv)
        model.train(was)
        if self.kind == "cls":
            per = (out["logits"].argmax(1) == self.yv).double()
        elif self.kind == "seg":
            per = ((out["mask"] > 0).to(self.yv.dtype) != self.yv).double().flatten(1).mean(1)
        else:
            per = (out["value"] - self.yv).double() ** 2
        return {self.metric: float(per.mean())}, per

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def calibration(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x[i:i + 128], self.y[i:i + 128]) for i in range(0, 512, 128)]

    def training_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of 64, in a fresh order every pass (drawn from torch's generator, which adapt seeds at every
        step), as a shuffling loader gives them: a step's recovery does not replay the last one's batches. With
        fewer than 64 examples, every batch is all of them."""
        while True:
            order = torch.randperm(len(self.x))
            for i in range(0, max(len(order) - 63, 1), 64):
                yield self.x[order[i:i + 64]], self.y[order[i:i + 64]]

    def finetune(self, model: nn.Module, steps: int) -> None:
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        flags = {m: m.training for m in model.modules()}
        model.train()
        try:
            for _, (x, y) in zip(range(steps), self.training_batches()):
                opt.zero_grad()
                self.loss(model, x, y).backward()
                opt.step()
        finally:
            for m, f in flags.items():
                m.training = f


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits' train / validation / test splits (``x``, ``xv``, ``xt``) with both targets: the digit
    (``y``, ``yv``, ``yt``) and the ink difference (``t``, ``tv``, ``tt``)."""
    d = load_digits_data(seed)
    return {"x": d.x_train, "y": d.y_train, "t": ink(d.x_train), "xv": d.x_val, "yv": d.y_val, "tv": ink(d.x_val),
            "xt": d.x_test, "yt": d.y_test, "tt": ink(d.x_test)}


def trained(seed: int = 0, width: int = 48, epochs: int = 40,
            anneal: bool = False) -> tuple[TwoHead, dict[str, torch.Tensor]]:
    """A :class:`TwoHead` trained on both heads (the sum of the two losses; Adam at lr 3e-3), and its data.

    ``anneal``: decay the learning rate to 0 over the epochs (cosine), so that the model is trained to
    convergence rather than left at a constant rate's last step (whose regression error varies by 2x from one
    step to the next)."""
    torch.manual_seed(seed)
    data = load_data(seed)
    model = TwoHead(width)
    _fit(model, data, epochs, lambda out, t: nn.functional.mse_loss(out["value"], t), anneal)
    return model.eval(), data


def _fit(model: nn.Module, data: dict[str, torch.Tensor], epochs: int,
         second: Callable[[Any, torch.Tensor], torch.Tensor], anneal: bool = False) -> None:
    """Train both heads in batches of 64 (the digit's cross-entropy plus ``second(output, targets)`` on ``t``;
    Adam at lr 3e-3, cosine-decayed to 0 with ``anneal``)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    per_epoch = -(-len(data["x"]) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch) if anneal else None
    for _ in range(epochs):
        for i in range(0, len(data["x"]), 64):
            out = model(data["x"][i:i + 64])
            loss = nn.functional.cross_entropy(out["logits"], data["y"][i:i + 64]) + second(out, data["t"][i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()


def load_dense_data(seed: int = 0, noise: float = 0.1) -> dict[str, torch.Tensor]:
    """Digits' splits for :class:`ConvTwoHead`: the images with Gaussian noise of standard deviation ``noise``
    (``x``, ``xv``, ``xt``; drawn from a generator seeded with ``seed``), the digit (``y``, ``yv``, ``yt``) and
    the clean image's ink mask, its pixels above 0.5 (``t``, ``tv``, ``tt``)."""
    d = load_digits_data(seed)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for split, x, y in (("", d.x_train, d.y_train), ("v", d.x_val, d.y_val), ("t", d.x_test, d.y_test)):
        out[f"x{split}"] = x + noise * torch.randn(x.shape, generator=g)
        out[f"y{split}"], out[f"t{split}"] = y, (x[:, 0] > 0.5).float()
    return out


def trained_conv(seed: int = 0, width: int = 16, epochs: int = 40) -> tuple[ConvTwoHead, dict[str, torch.Tensor]]:
    """A :class:`ConvTwoHead` trained on both heads (cross-entropy plus the mask's binary cross-entropy; Adam at
    lr 3e-3), and its data (:func:`load_dense_data`)."""
    torch.manual_seed(seed)
    data = load_dense_data(seed)
    model = ConvTwoHead(width)
    _fit(model, data, epochs, lambda out, t: nn.functional.binary_cross_entropy_with_logits(out["mask"], t))
    return model.eval(), data


def conv_tasks(data: dict[str, torch.Tensor], split: str = "v") -> dict[str, HeadTask]:
    """:class:`ConvTwoHead`'s tasks: ``"digit"`` (accuracy) and ``"ink"`` (the ink mask's per-pixel error),
    evaluated on the validation split (``"v"``) or the test split (``"t"``)."""
    xs, ys, ts = data[f"x{split}"], data[f"y{split}"], data[f"t{split}"]
    return {"digit": HeadTask("cls", data["x"], data["y"], xs, ys), "ink": HeadTask("seg", data["x"], data["t"], xs, ts)}


def tasks(data: dict[str, torch.Tensor], split: str = "v") -> dict[str, HeadTask]:
    """The two heads' tasks, evaluated on the validation split (``"v"``) or the test split (``"t"``)."""
    xs, ys, ts = data[f"x{split}"], data[f"y{split}"], data[f"t{split}"]
    return {"digit": HeadTask("cls", data["x"], data["y"], xs, ys), "ink": HeadTask("reg", data["x"], data["t"], xs, ts)}


def loaders(seed: int = 0, batch_size: int = 64) -> tuple[Any, Any]:
    """Train and validation loaders whose targets hold both tasks' (``{"digit": ..., "ink": ...}``): the
    command line's ``data: {kind: callable, factory: adaprune.examples.multihead:loaders}``."""
    from torch.utils.data import DataLoader, Dataset

    data = load_data(seed)

    class Both(Dataset):  # type: ignore[type-arg]
        def __init__(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
            self.x, self.y, self.t = x, y, t

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return self.x[i], {"digit": self.y[i], "ink": self.t[i]}

    return (DataLoader(Both(data["x"], data["y"], data["t"]), batch_size=batch_size),
            DataLoader(Both(data["xv"], data["yv"], data["tv"]), batch_size=batch_size))


def head_task(train: Any, val: Any, head: str = "digit", lr: float = 1e-3) -> HeadTask:
    """One head's :class:`HeadTask` from loaders like :func:`loaders`' (``head``: ``"digit"`` or ``"ink"``):
    the command line's ``tasks: {digit: {factory: adaprune.examples.multihead:head_task, ...}}``."""
    if head not in ("digit", "ink"):
        raise ValueError(f"head must be 'digit' or 'ink', got {head!r}")

    def stack(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*((x, y[head]) for x, y in loader))
        return torch.cat(xs), torch.cat(ys)

    x, y = stack(train)
    xv, yv = stack(val)
    return HeadTask("cls" if head == "digit" else "reg", x, y, xv, yv, lr=lr)


__all__ = ["ConvTwoHead", "HeadTask", "TwoHead", "conv_tasks", "head_task", "ink", "load_data", "load_dense_data",
           "loaders", "tasks", "trained", "trained_conv"]
