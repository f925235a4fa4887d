"""Small nets shared by tests: a conv net for the error, argument and transaction tests (conv, BatchNorm, conv,
linear head), and a three-layer MLP whose neurons the controller tests count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.head(x.mean((2, 3)))


X8 = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
"""Inputs of :func:`mlp3`."""


def mlp3() -> nn.Module:
    """8 -> 32 -> 32 -> 3, ReLU between, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def alive(layer: nn.Linear) -> int:
    """Output neurons of ``layer`` that are still there (not removed, not masked to zero)."""
    return int((layer.weight.detach().abs().sum(1) > 0).sum())
