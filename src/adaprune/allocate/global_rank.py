"""``global`` and ``lamp``: rank all channels of all groups on one scale and cut the lowest.

``global`` divides each group's scores by the group's mean score, so that groups of different
sizes and magnitudes compete fairly (the normaliser Torch-Pruning uses for global pruning);
``lamp`` rescales each group's scores with LAMP (score over the sum of scores not smaller than it;
Lee et al., 2021), which is scale-free by construction. Per-group limits (cap, minimum, round_to)
are applied to the global choice; the channels a cap or rounding spares are not handed to other
groups, so the global fraction is met from below and a budget search closes the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..graph import Group
from ..importance.magnitude import lamp_normalize
from .registry import ALLOCATORS, Limits, lowest


def _rank(
    groups: Sequence[Group], normed: Mapping[str, torch.Tensor], limits: Limits, ratio: float
) -> dict[str, list[int]]:
    total = sum(g.size for g in groups)
    target = int(ratio * total + 1e-9)
    if target <= 0 or not groups:
        return {g.name: [] for g in groups}
    values = torch.cat([normed[g.name].double() for g in groups])
    owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(groups)])
    order = torch.argsort(values, stable=True)
    counts = torch.bincount(owner[order[:target]], minlength=len(groups)).tolist()
    out = {}
    for g, wanted in zip(groups, counts):
        keep = limits.kept(g.size, wanted)
        out[g.name] = lowest(normed[g.name], g.size - keep)
    return out


@ALLOCATORS.register("global")
class Global:
    """Cut the globally lowest channels after dividing each group's scores by its mean."""

    def __call__(
        self,
        groups: Sequence[Group],
        scores: Mapping[str, torch.Tensor],
        limits: Limits,
        *,
        ratio: float,
    ) -> dict[str, list[int]]:
        normed = {}
        for g in groups:
            s = scores[g.name].double()
            mean = s.mean()
            normed[g.name] = s / mean if mean > 0 else s
        return _rank(groups, normed, limits, ratio)


@ALLOCATORS.register("lamp")
class LampAllocator:
    """Cut the globally lowest channels after LAMP-normalising each group's scores."""

    def __call__(
        self,
        groups: Sequence[Group],
        scores: Mapping[str, torch.Tensor],
        limits: Limits,
        *,
        ratio: float,
    ) -> dict[str, list[int]]:
        normed = {g.name: lamp_normalize(scores[g.name].double().clamp_min(0) ** 2) for g in groups}
        return _rank(groups, normed, limits, ratio)
