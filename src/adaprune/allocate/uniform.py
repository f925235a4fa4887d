"""``uniform``: the same fraction of channels removed from every group (the static baseline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..graph import Group
from .registry import ALLOCATORS, Limits, lowest


@ALLOCATORS.register("uniform")
class Uniform:
    """Remove ``ratio`` of each group's channels, lowest importance first."""

    def __call__(
        self,
        groups: Sequence[Group],
        scores: Mapping[str, torch.Tensor],
        limits: Limits,
        *,
        ratio: float,
    ) -> dict[str, list[int]]:
        out = {}
        for g in groups:
            keep = limits.kept(g.size, int(ratio * g.size + 1e-9))
            out[g.name] = lowest(scores[g.name], g.size - keep)
        return out
