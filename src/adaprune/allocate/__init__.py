"""Allocators: how many (and which) channels each group loses.

An allocator is registered by name (``ALLOCATORS.register``) and called as
``allocator(groups, scores, ratio=..., min_channels=..., round_to=...) -> {group name: [channels]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from .._registry import Registry
from ..graph import Group


class Allocator(Protocol):
    def __call__(
        self,
        groups: Sequence[Group],
        scores: Mapping[str, torch.Tensor],
        *,
        ratio: float,
        min_channels: int = 1,
        round_to: int = 1,
    ) -> dict[str, list[int]]: ...


ALLOCATORS: Registry[type] = Registry("allocator")


def get_allocator(name: str | Allocator) -> Allocator:
    if callable(name) and not isinstance(name, str):
        return name
    return ALLOCATORS.get(name)()


def kept_count(size: int, ratio: float, min_channels: int, round_to: int) -> int:
    """Channels kept when removing ``ratio`` of ``size``, rounded up to a multiple of ``round_to``."""
    keep = size - int(ratio * size + 1e-9)
    if round_to > 1:
        keep = -(-keep // round_to) * round_to
    return min(size, max(keep, min_channels, 1))


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties broken by index, so results are deterministic)."""
    if n <= 0:
        return []
    order = torch.argsort(scores.double(), stable=True)
    return sorted(order[:n].tolist())


from . import uniform  # noqa: F401

__all__ = ["ALLOCATORS", "Allocator", "get_allocator", "kept_count", "lowest"]
