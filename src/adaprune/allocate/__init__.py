"""Allocators: how many (and which) channels each group loses.

An allocator is a class registered by name in :data:`ALLOCATORS`; an instance is called as
``allocator(groups, scores, limits, ratio=...) -> {group name: [channels to remove]}``.
``ratio`` is the one knob a budget search turns: for ``uniform`` it is the fraction removed from
every group, for ``global`` and ``lamp`` the fraction of all prunable channels removed. ``limits``
carries the per-group constraints every allocator respects: ``max_ratio`` (cap on the fraction a
group may lose), ``min_channels`` and ``round_to`` (kept widths are multiples of it, unless the
group is kept whole).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .._check import as_float, as_int
from .._registry import Registry
from ..errors import ArgumentTypeError
from ..graph import Group


@dataclass(frozen=True)
class Limits:
    """Per-group constraints on what an allocator may remove."""

    max_ratio: float = 1.0
    min_channels: int = 1
    round_to: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_ratio", as_float(  # frozen: store the checked, converted value
            self.max_ratio, "max_ratio", low=0.0, high=1.0, low_open=True,
            hint="the largest fraction of its channels a group may lose (1 = no cap)"))
        object.__setattr__(self, "min_channels", as_int(
            self.min_channels, "min_channels", low=1, hint="the channels every group keeps at least"))
        object.__setattr__(self, "round_to", as_int(
            self.round_to, "round_to", low=1, hint="kept widths are multiples of it (1 = no rounding)"))

    def min_kept(self, size: int) -> int:
        """The fewest channels a group of ``size`` may keep."""
        floor = size - int(self.max_ratio * size + 1e-9)
        return min(size, max(floor, self.min_channels, 1))

    def kept(self, size: int, wanted_removed: int) -> int:
        """Channels kept when ``wanted_removed`` are asked for: capped, then rounded up to round_to."""
        keep = max(size - wanted_removed, self.min_kept(size))
        if self.round_to > 1 and keep < size:
            keep = -(-keep // self.round_to) * self.round_to
        return min(keep, size)


class Allocator(Protocol):
    def __call__(
        self,
        groups: Sequence[Group],
        scores: Mapping[str, torch.Tensor],
        limits: Limits,
        *,
        ratio: float,
    ) -> dict[str, list[int]]: ...


ALLOCATORS: Registry[type] = Registry("allocator")


def get_allocator(name: str | Allocator) -> Allocator:
    if callable(name) and not isinstance(name, str):
        return name
    if not isinstance(name, str):
        raise ArgumentTypeError(f"allocation must be a name or a callable, got {type(name).__name__}")
    return ALLOCATORS.get(name)()  # type: ignore[no-any-return]


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties broken by index, so results are deterministic)."""
    if n <= 0:
        return []
    order = torch.argsort(scores.double(), stable=True)
    return sorted(order[:n].tolist())


from . import global_rank, uniform  # noqa: F401

__all__ = ["ALLOCATORS", "Allocator", "Limits", "get_allocator", "lowest"]
