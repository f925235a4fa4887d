"""The cost registry: every cost a budget can bound is one :class:`CostEntry` in :data:`COSTS`.

:class:`~adaprune.Budget`, the command line's ``budget:`` section, ``adapt`` (its costs, its summary,
its state), the report's tables and plots and :meth:`PruneResult.summary` all read this registry, so
a cost registered here is usable everywhere with no other edit::

    from adaprune.cost.registry import CostEntry, register_cost
    register_cost(CostEntry("flops", "FLOPs", "FLOPs", compute=lambda cost: 2 * cost.macs))
    adaprune.Budget(flops=0.5)

A *static* cost (``compute`` given) is a function of the counted :class:`~adaprune.cost.Cost` (MACs,
params, bytes): the budget search and the adaptive step predict it exactly for every candidate plan
from a weightless copy of the model, so it must follow from those three numbers. A *measured* cost
(``compute=None``) needs the model run on a backend: latency is the one there is, and ``adapt``
measures it (``prune`` refuses it).

See ``docs/extending.md`` ("Adding a cost").
"""

from __future__ import annotations

import keyword
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._registry import Registry
from ..errors import ArgumentTypeError, ConfigError, NonFiniteError, shown

if TYPE_CHECKING:
    from . import Cost

__all__ = [
    "COSTS",
    "CostEntry",
    "CostRegistry",
    "cost_order",
    "register_cost",
    "static_values",
    "unregister_cost",
]


def si_count(value: float) -> str:
    """A count with an SI prefix: ``1.23M``, ``45.60k``, ``512``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def si_bytes(value: float) -> str:
    """Bytes with an SI prefix: ``1.23 MB``, ``512 B``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _microjoules(value: float) -> str:
    return f"{value:,.1f} µJ"


def _milliseconds(value: float) -> str:
    return f"{value:.3f} ms"


@dataclass(frozen=True)
class CostEntry:
    """One cost a budget can bound.

    Attributes:
        name: the key everywhere: ``Budget(name=...)``, ``budget: {name: ...}`` in a run configuration,
            the costs dicts of ``adapt`` (its state, history and report). A Python identifier.
        label: what reports and summaries call it (``"MACs"``, ``"energy (estimate)"``).
        unit: what a value is counted in (``"MACs"``, ``"bytes"``, ``"µJ"``, ``"ms"``); absolute bounds
            are in this unit.
        compute: ``compute(cost) -> number`` for a static cost, from the counted
            :class:`~adaprune.cost.Cost` (finite, >= 0); ``None`` for a measured cost (latency).
        relative: whether a bound in (0, 1] means a fraction of the original model's value (else every
            bound is an absolute amount).
        absolute: the keyword of an absolute-only form of the bound (latency's ``latency_ms``), or None.
        headline: shown in one-line summaries (:meth:`PruneResult.summary`).
        format: ``format(value) -> str`` for report tables (the value with its unit); default
            ``"1,235 unit"`` (4 significant digits).
    """

    name: str
    label: str
    unit: str
    compute: Callable[[Cost], float] | None = None
    relative: bool = True
    absolute: str | None = None
    headline: bool = False
    format: Callable[[float], str] | None = None

    @property
    def static(self) -> bool:
        """Whether the cost follows from a counted :class:`~adaprune.cost.Cost` (else it is measured)."""
        return self.compute is not None

    @property
    def keywords(self) -> tuple[str, ...]:
        """The budget keywords that bound this cost: its name, then its absolute form if any."""
        return (self.name, self.absolute) if self.absolute else (self.name,)

    def show(self, value: float) -> str:
        """``value`` for a table: the entry's ``format``, else 4 significant digits and the unit."""
        if self.format is not None:
            return self.format(value)
        return f"{value:,.4g}" + (f" {self.unit}" if self.unit else "")

    def value(self, cost: Cost) -> int | float:
        """The static cost of ``cost``, checked: a plain finite number >= 0."""
        if self.compute is None:
            raise ConfigError(f"cost {self.name!r} is measured, not computed from a counted Cost")
        v = self.compute(cost)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ArgumentTypeError(f"cost {self.name!r}: compute() returned {shown(v)}; expected a number")
        v = int(v) if isinstance(v, numbers.Integral) else float(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise NonFiniteError(f"cost {self.name!r}: compute() returned {v} for {cost}; it must be finite")
        if v < 0:
            raise ConfigError(f"cost {self.name!r}: compute() returned {v} for {cost}; it must be >= 0")
        return v


RESERVED = {"backend", "threads", "batch_size"}
"""Keys a budget holds besides costs (``Budget``'s backend and threads, the run configuration's
batch_size); :mod:`adaprune.cost.budget` adds ``Budget``'s attribute names."""


class CostRegistry(Registry[CostEntry]):
    """The registered costs, in registration order (the order of reprs, tables and error messages)."""

    def __init__(self) -> None:
        super().__init__("cost")
        self.builtin: tuple[str, ...] = ()
        self.fixed: tuple[str, ...] = ()  # the costs adaprune registers itself: never unregistered
        self.reserved: set[str] = set(RESERVED)

    def add(self, entry: CostEntry) -> CostEntry:
        """Register ``entry`` under its name; a bad or taken name raises ``ValueError``."""
        if not isinstance(entry, CostEntry):
            raise ArgumentTypeError(f"register_cost takes a CostEntry, got {type(entry).__name__}")
        taken = self.keywords()
        for kw in entry.keywords:
            if not isinstance(kw, str) or not kw.isidentifier() or keyword.iskeyword(kw) or kw.startswith("_"):
                raise ValueError(f"cost keyword {shown(kw)} must be a Python identifier not starting with '_'")
            if kw in self.reserved:
                raise ValueError(f"cost keyword {kw!r} is reserved (Budget and the budget section use it)")
            if kw in taken:
                raise ValueError(f"cost keyword {kw!r} is already registered (by cost {taken[kw].name!r})")
        if entry.name == entry.absolute:
            raise ValueError(f"cost {entry.name!r}: absolute= must differ from the name")
        for attr in ("label", "unit"):
            if not isinstance(getattr(entry, attr), str):
                raise ArgumentTypeError(f"cost {entry.name!r}: {attr} must be a str")
        for attr in ("compute", "format"):
            if getattr(entry, attr) is not None and not callable(getattr(entry, attr)):
                raise ArgumentTypeError(f"cost {entry.name!r}: {attr} must be callable or None")
        self.register(entry.name)(entry)
        return entry

    def remove(self, name: str) -> None:
        """Unregister the cost ``name`` (a built-in cost cannot be removed)."""
        if name in self.builtin or name in self.fixed:
            raise ValueError(f"cost {name!r} is built in and cannot be unregistered")
        self.get(name)
        del self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def entries(self) -> list[CostEntry]:
        return list(self._items.values())

    def static(self) -> list[CostEntry]:
        return [e for e in self._items.values() if e.static]

    def measured(self) -> list[CostEntry]:
        return [e for e in self._items.values() if not e.static]

    def keywords(self) -> dict[str, CostEntry]:
        """Every budget keyword (each cost's name, and its absolute form) and the entry it bounds."""
        return {kw: e for e in self._items.values() for kw in e.keywords}

    def for_key(self, key: str) -> CostEntry | None:
        """The entry a cost name or a budget keyword (``latency_ms``) belongs to, or None."""
        return self.keywords().get(key)


COSTS = CostRegistry()
"""Every cost a :class:`~adaprune.Budget` can bound, in registration order."""


def register_cost(entry: CostEntry) -> CostEntry:
    """Register a cost (see :class:`CostEntry`); returns it."""
    return COSTS.add(entry)


def unregister_cost(name: str) -> None:
    """Remove a cost registered with :func:`register_cost`."""
    COSTS.remove(name)


def static_values(cost: Cost) -> dict[str, float]:
    """Every registered static cost of a counted :class:`~adaprune.cost.Cost`, by name."""
    return {e.name: e.value(cost) for e in COSTS.static()}


def cost_order(keys: Iterable[str]) -> list[str]:
    """``keys`` (cost names from a costs dict) in registry order; names not registered (a report
    written where another cost was registered) follow in their own order."""
    given = list(dict.fromkeys(keys))
    known = [n for n in COSTS.names() if n in given]
    return known + [k for k in given if k not in known]


def _energy(cost: Cost) -> float:
    return cost.energy_uj


register_cost(CostEntry("macs", "MACs", "MACs", compute=lambda c: c.macs, headline=True, format=si_count))
register_cost(CostEntry("params", "params", "params", compute=lambda c: c.params, headline=True, format=si_count))
register_cost(CostEntry("bytes", "bytes (weights)", "bytes", compute=lambda c: c.bytes, format=si_bytes))
register_cost(CostEntry("energy", "energy (estimate)", "µJ", compute=_energy, format=_microjoules))
register_cost(CostEntry("latency", "latency", "ms", absolute="latency_ms", format=_milliseconds))
COSTS.builtin = tuple(COSTS.names())  # Budget's positional order and repr (run directories compare the repr)
# the compressed artifact's size: measured by writing it (adaprune.artifact), bounded by adaprune.compress;
# built in too, but after the costs Budget's positional arguments and repr have always listed
register_cost(CostEntry("disk_bytes", "disk bytes (compressed)", "bytes", format=si_bytes))
COSTS.fixed = (*COSTS.builtin, "disk_bytes")
