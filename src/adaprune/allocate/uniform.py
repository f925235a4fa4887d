"""``uniform``: the same fraction of channels removed from every group (the static baseline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..graph import Group
from . import ALLOCATORS, kept_count, lowest


@ALLOCATORS.register("uniform")
class Uniform:
    """Remove ``ratio`` of each group's channels, lowest importance first."""

    def __call__(
        self,
        groups: Sequence[Group],
        scores: Mapping[str, torch.Tensor],
        *,
        ratio: float,
        min_channels: int = 1,
        round_to: int = 1,
    ) -> dict[str, list[int]]:
        out = {}
        for g in groups:
            keep = kept_count(g.size, ratio, min_channels, round_to)
            out[g.name] = lowest(scores[g.name], g.size - keep)
        return out
