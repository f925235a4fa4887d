"""The allocator registry: the per-group :class:`Limits`, the allocator protocol, :data:`ALLOCATORS`
and the helpers allocators share. The built-in allocators register here from their own modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .._check import a_type, as_float, as_int, clip
from .._registry import Registry
from ..errors import AdapruneError, ArgumentTypeError, ConfigError, shown
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


class _UserAllocator:
    """A caller's allocator: its exceptions and its output are checked (one line naming ``allocation``)."""

    def __init__(self, fn: Allocator) -> None:
        self.__wrapped__ = fn
        self.label = shown(getattr(fn, "__qualname__", type(fn).__qualname__), 60)

    def __call__(
        self, groups: Sequence[Group], scores: Mapping[str, torch.Tensor], limits: Limits, *, ratio: float
    ) -> dict[str, list[int]]:
        try:
            chosen = self.__wrapped__(groups, scores, limits, ratio=ratio)
        except AdapruneError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"allocation: the allocator {self.label} raised {type(exc).__name__}: {clip(str(exc))}; an "
                "allocator is called as allocator(groups, scores, limits, ratio=...) -> {group.name: [channels]}"
            ) from exc
        if not isinstance(chosen, Mapping):
            raise ConfigError(f"allocation: the allocator {self.label} returned {a_type(chosen)}, not a dict")
        sizes = {g.name: g.size for g in groups}
        out: dict[str, list[int]] = {}
        for key, channels in chosen.items():
            if key not in sizes:
                raise ConfigError(f"allocation: the allocator {self.label} chose channels of an unknown group {shown(key)}")
            idx = list(channels) if isinstance(channels, (list, tuple)) else None
            size = sizes[key]
            if idx is None or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size for i in idx) \
                    or len(set(idx)) != len(idx) or len(idx) >= size:
                raise ConfigError(
                    f"allocation: the allocator {self.label} chose {shown(channels)} for group {shown(key)} of "
                    f"{size} channels; expected distinct indices in [0, {size}), fewer than {size}"
                )
            out[key] = sorted(idx)
        return out


def get_allocator(name: str | Allocator) -> Allocator:
    if callable(name) and not isinstance(name, str):
        return name if isinstance(name, _UserAllocator) else _UserAllocator(name)
    if not isinstance(name, str):
        raise ArgumentTypeError(f"allocation must be a name or a callable, got {type(name).__name__}")
    return ALLOCATORS.get(name)()  # type: ignore[no-any-return]


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties broken by index, so results are deterministic)."""
    if n <= 0:
        return []
    order = torch.argsort(scores.double(), stable=True)
    return sorted(order[:n].tolist())
