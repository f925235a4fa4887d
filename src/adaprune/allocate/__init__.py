"""Allocators: how many (and which) channels each group loses.

An allocator is a class registered by name in :data:`ALLOCATORS`; an instance is called as
``allocator(groups, scores, limits, ratio=...) -> {group name: [channels to remove]}``.
``ratio`` is the one knob a budget search turns (by :func:`~adaprune.allocate.search.bisect`): for
``uniform`` it is the fraction removed from every group, for ``global`` and ``lamp`` the fraction of
all prunable channels removed. ``limits`` carries the per-group constraints every allocator
respects: ``max_ratio`` (cap on the fraction a group may lose), ``min_channels`` and ``round_to``
(kept widths are multiples of it, unless the group is kept whole).

The adaptive controller's allocation is a pure function beside them,
:func:`~adaprune.allocate.adaptive.allocate_adaptive`: per-cluster ratios weighted by cost saved
per metric lost, scaled by the same bisection to a target cost.
"""

from __future__ import annotations

from . import global_rank, uniform  # noqa: F401  (registers the allocators)
from .adaptive import AdaptiveAllocation, ClusterProbe, allocate_adaptive
from .registry import ALLOCATORS, Allocator, Limits, get_allocator, lowest
from .search import bisect, search_budget

__all__ = [
    "ALLOCATORS", "AdaptiveAllocation", "Allocator", "ClusterProbe", "Limits", "allocate_adaptive", "bisect",
    "get_allocator", "lowest", "search_budget",
]
