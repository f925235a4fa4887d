"""A two-head network on sklearn digits for the multi-task tests: a shared trunk, a classification head
(accuracy, higher is better) and a regression head for a target derived from the image (how much more
ink its top half holds than its bottom half; mean squared error, lower is better)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adaprune.examples.digits import load_digits_data


class TwoHead(nn.Module):
    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.cls = nn.Linear(width, 10)
        self.reg = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"logits": self.cls(h), "value": self.reg(h).squeeze(-1)}


def ink(x: torch.Tensor) -> torch.Tensor:
    """The regression target: top half's mean intensity minus the bottom half's, standardised."""
    t = x[:, 0, :4].mean(dim=(1, 2)) - x[:, 0, 4:].mean(dim=(1, 2))
    return (t - 0.0) / 0.1


class HeadTask:
    """One head's task (the task protocol, not a subclass): ``kind`` "cls" (accuracy) or "reg" (MSE)."""

    def __init__(self, kind: str, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
        self.kind, self.x, self.y, self.xv, self.yv = kind, x, y, xv, yv
        self.metric = "accuracy" if kind == "cls" else "mse"
        self.higher_is_better = kind == "cls"
        self.calls = 0

    def loss_fn(self, output: Any, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return nn.functional.cross_entropy(output["logits"], y)
        return nn.functional.mse_loss(output["value"], y)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(model(x), y)

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        self.calls += 1
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.xv)
        model.train(was)
        if self.kind == "cls":
            per = (out["logits"].argmax(1) == self.yv).double()
        else:
            per = (out["value"] - self.yv).double() ** 2
        return {self.metric: float(per.mean())}, per

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def calibration(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x[i:i + 128], self.y[i:i + 128]) for i in range(0, 512, 128)]

    def training_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for i in range(0, len(self.x) - 63, 64):
                yield self.x[i:i + 64], self.y[i:i + 64]

    def finetune(self, model: nn.Module, steps: int) -> None:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _, (x, y) in zip(range(steps), self.training_batches()):
            opt.zero_grad()
            self.loss(model, x, y).backward()
            opt.step()


def trained(seed: int = 0, epochs: int = 40) -> tuple[TwoHead, dict[str, Any]]:
    """The two-head model trained on both heads, and the data: train, validation and test splits."""
    torch.manual_seed(seed)
    d = load_digits_data(seed)
    data = {"x": d.x_train, "y": d.y_train, "t": ink(d.x_train), "xv": d.x_val, "yv": d.y_val, "tv": ink(d.x_val),
            "xt": d.x_test, "yt": d.y_test, "tt": ink(d.x_test)}
    model = TwoHead()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(data["x"]), 64):
            x = data["x"][i:i + 64]
            out = model(x)
            loss = nn.functional.cross_entropy(out["logits"], data["y"][i:i + 64]) + \
                nn.functional.mse_loss(out["value"], data["t"][i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, data


def tasks(data: dict[str, Any], split: str = "v") -> dict[str, HeadTask]:
    """The two heads' tasks, evaluated on the validation split (``"v"``) or the test split (``"t"``)."""
    xs, ys, ts = data[f"x{split}"], data[f"y{split}"], data[f"t{split}"]
    return {"digit": HeadTask("cls", data["x"], data["y"], xs, ys), "ink": HeadTask("reg", data["x"], data["t"], xs, ts)}
