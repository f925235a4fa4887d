"""sklearn's handwritten digits (8x8, 10 classes, 1,797 images; ships with scikit-learn) and a small CNN.

Used by the demo and the tests as a real task that needs no download: a fixed split into
train / validation / test, a CNN whose width is a parameter, and a short training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


class DigitsCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU), a max-pool, global average pooling and a linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def loader(self, split: str, batch_size: int = 64, shuffle: bool = False) -> torch.utils.data.DataLoader:
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        ds = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def load_digits_data(seed: int = 0) -> DigitsData:
    """Digits scaled to [0, 1], shape (N, 1, 8, 8); a fixed 60/20/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigError("the digits example needs scikit-learn: pip install 'adaprune[examples]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return DigitsData(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def train(model: nn.Module, data: DigitsData, epochs: int = 15, lr: float = 3e-3, seed: int = 0) -> float:
    """Train with Adam; return validation accuracy."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for xb, yb in data.loader("train", shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(data.x_val).argmax(1) == data.y_val).float().mean())
