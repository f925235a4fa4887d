"""Criteria computed from the weights alone.

- ``l1`` / ``l2``: |w| summed (resp. the Euclidean norm) over every parameter slice a channel owns in
  its group: its filter, its norm scale and shift, the next layers' input columns (group-level
  magnitude: Li et al., 2017, "Pruning Filters for Efficient ConvNets"; Fang et al., 2023, "DepGraph").
- ``lamp``: the LAMP score (Lee et al., 2021, "Layer-adaptive sparsity for the magnitude-based
  pruning") over the channels' squared group norms: n_i / sum of n_j over channels j at least as
  large, which makes scores comparable across groups.
- ``fpgm``: filter pruning via geometric median (He et al., 2019): a channel close to all others is
  redundant. The score is the sum of distances from the channel's weights to the other channels'
  weights, times the channel's own norm, so an all-zero channel (which carries nothing) scores 0.
- ``bn_scale``: |gamma| of the normalisation layers in the group (network slimming: Liu et al.,
  2017); groups without a norm scale fall back to ``l1``.
- ``random``: the control every criterion should beat (seeded).
- ``position``: earlier channels score higher (``size - index``): on a model whose channels were ordered by
  importance (:func:`adaprune.ladder.order_channels`), pruning by position removes a suffix of every
  group, which is what keeps a ladder's rungs nested.

Buffers (running statistics) are not weights and never contribute.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import Group
from .registry import IMPORTANCE, ParamIndex, Params, PerGroup


def slot_rows(
    model: nn.Module, group: Group, params: Params | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each parameter slot: (weights with the slot dim first and the rest flattened, channel map)."""
    params = params if params is not None else dict(model.named_parameters(remove_duplicate=False))
    out = []
    for slot, owner in zip(group.slots, group.channel_of):
        if not slot.is_param or slot.tensor not in params:
            continue
        w = params[slot.tensor].detach()
        out.append((w.movedim(slot.dim, 0).reshape(w.shape[slot.dim], -1).double().cpu(), owner))
    return out


def per_channel(group: Group, values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum per-position values (one tensor per slot) into one value per channel."""
    total = torch.zeros(group.size + 1, dtype=torch.float64)
    for v, owner in values:
        total.index_add_(0, torch.where(owner >= 0, owner, group.size), v)
    return total[:-1]


def group_sums(model: nn.Module, group: Group, power: float, params: Params | None = None) -> torch.Tensor:
    """Per channel: the sum of |w|^power over the group's parameter slices."""
    index = params if isinstance(params, ParamIndex) else ParamIndex(model)
    values = [
        (index.sums(slot.tensor, power, slot.dim), owner)
        for slot, owner in zip(group.slots, group.channel_of)
        if slot.is_param and slot.tensor in index
    ]
    return per_channel(group, values)


@IMPORTANCE.register("l1")
class L1(PerGroup):
    """Sum of absolute weights of each channel over its group."""

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        return group_sums(model, group, 1.0, params)


@IMPORTANCE.register("l2")
class L2(PerGroup):
    """Euclidean norm of each channel's weights over its group."""

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        return group_sums(model, group, 2.0, params).sqrt()


def lamp_normalize(squared: torch.Tensor) -> torch.Tensor:
    """LAMP: each value divided by the sum of the values not smaller than it."""
    order = torch.argsort(squared, stable=True)
    sorted_vals = squared[order]
    tail = sorted_vals.flip(0).cumsum(0).flip(0)
    out = torch.zeros_like(squared)
    out[order] = torch.where(tail > 0, sorted_vals / tail.clamp_min(1e-300), torch.zeros_like(tail))
    return out


@IMPORTANCE.register("lamp")
class Lamp(PerGroup):
    """LAMP-normalised squared group norms."""

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        return lamp_normalize(group_sums(model, group, 2.0, params))


@IMPORTANCE.register("fpgm")
class FPGM(PerGroup):
    """Distance to the other channels (geometric-median redundancy), scaled by the channel's norm."""

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        feats = []
        for w, owner in slot_rows(model, group, params):
            mat = torch.zeros(group.size, w.shape[1], dtype=torch.float64)
            keep = owner >= 0
            mat.index_add_(0, owner[keep], w[keep])
            feats.append(mat)
        if not feats:
            return torch.zeros(group.size, dtype=torch.float64)
        f = torch.cat(feats, dim=1)
        dist = torch.cdist(f, f).sum(1)
        return dist * f.norm(dim=1)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@IMPORTANCE.register("bn_scale")
class BNScale(PerGroup):
    """|gamma| of the group's normalisation layers (network slimming); ``l1`` where there is none."""

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        params = params if params is not None else dict(model.named_parameters(remove_duplicate=False))
        values = []
        for slot, owner in zip(group.slots, group.channel_of):
            if not slot.tensor.endswith(".weight") or slot.tensor not in params:
                continue
            try:
                mod = model.get_submodule(slot.module)
            except AttributeError:
                continue
            if isinstance(mod, _NORMS):
                values.append((params[slot.tensor].detach().abs().double().cpu(), owner))
        if not values:
            return group_sums(model, group, 1.0, params)
        return per_channel(group, values)


@IMPORTANCE.register("random")
class Random(PerGroup):
    """Uniform random scores, reproducible per group name and seed."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + sum(map(ord, group.name)))
        return torch.rand(group.size, generator=gen, dtype=torch.float64)


@IMPORTANCE.register("position")
class Position(PerGroup):
    """``size - index``: the first channel of each group scores highest (``size``), the last lowest (1)."""

    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        return torch.arange(group.size, 0, -1, dtype=torch.float64)
