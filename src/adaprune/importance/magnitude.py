"""Magnitude criteria aggregated over a group, and a random control.

``l1`` / ``l2``: the sum of |w| (resp. w^2, then square-rooted) over every parameter slice a channel
owns in the group (its conv filter, its BatchNorm scale and shift, the next layer's input columns),
as in group-level magnitude pruning (Li et al., 2017, "Pruning Filters for Efficient ConvNets";
Fang et al., 2023, "DepGraph"). Buffers such as running statistics are not weights and are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import Group
from . import IMPORTANCE


def group_sums(model: nn.Module, group: Group, power: float) -> torch.Tensor:
    """sum over the group's parameter slots of sum |w|^power per channel."""
    params = dict(model.named_parameters(remove_duplicate=False))
    total = torch.zeros(group.size + 1, dtype=torch.float64)
    for slot, owner in zip(group.slots, group.channel_of):
        if not slot.is_param or slot.tensor not in params:
            continue
        w = params[slot.tensor].detach()
        per_pos = w.abs().pow(power).movedim(slot.dim, 0).reshape(w.shape[slot.dim], -1).sum(1)
        idx = torch.where(owner >= 0, owner, group.size)
        total.index_add_(0, idx, per_pos.double().cpu())
    return total[:-1]


@IMPORTANCE.register("l1")
class L1:
    """Sum of absolute weights of each channel over its group."""

    def __call__(self, model: nn.Module, group: Group) -> torch.Tensor:
        return group_sums(model, group, 1.0)


@IMPORTANCE.register("l2")
class L2:
    """Euclidean norm of each channel's weights over its group."""

    def __call__(self, model: nn.Module, group: Group) -> torch.Tensor:
        return group_sums(model, group, 2.0).sqrt()


@IMPORTANCE.register("random")
class Random:
    """Uniform random scores: the control every criterion should beat (seeded, reproducible)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, model: nn.Module, group: Group) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + sum(map(ord, group.name)))
        return torch.rand(group.size, generator=gen, dtype=torch.float64)
