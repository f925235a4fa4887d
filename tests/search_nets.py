"""The small CNN and the picklable evaluations the search tests share (TPE and NetAdapt alike)."""

from __future__ import annotations

import torch
from torch import nn

import adaprune as ap

X = torch.randn(4, 3, 12, 12)


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5))


def alive(model: nn.Module, i: int) -> int:
    return int((model[i].weight.detach().flatten(1).abs().sum(1) > 0).sum())


class FirstLayerMatters:
    """Every channel of the first conv lost costs 1; of the others, 0.01 (a picklable evaluation)."""

    def __call__(self, model: nn.Module) -> float:
        return -(16 - alive(model, 0)) - 0.01 * ((16 - alive(model, 2)) + (16 - alive(model, 4)))


def kept(model: nn.Module, plan: ap.Plan) -> dict[str, int]:
    return {g.name: g.size - len(g.removed) for g in plan.groups}


def macs(model: nn.Module, plan: ap.Plan) -> float:
    m = cnn()
    ap.remove(m, plan)
    return ap.count(m, X).macs / ap.count(cnn(), X).macs
