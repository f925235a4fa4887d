"""Budgets: bounds on costs, relative to the original model or absolute."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError
from . import Cost

_FIELDS = ("macs", "params", "bytes")


@dataclass(frozen=True)
class Budget:
    """Upper bounds on the pruned model's costs; every bound given must hold.

    A value in (0, 1] is a fraction of the original model's cost (``Budget(macs=0.5)``: at most half
    the original MACs); a value above 1 is an absolute count (``Budget(params=2_000_000)``).
    """

    macs: float | None = None
    params: float | None = None
    bytes: float | None = None

    def __post_init__(self) -> None:
        given = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            given += 1
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(
                    f"Budget({f.name}={v!r}): a budget must be a positive number, a fraction in (0, 1] "
                    "of the original cost or an absolute count above 1"
                )
        if not given:
            raise ConfigError("Budget() sets no bound: give at least one of macs=, params=, bytes=")

    def limits(self, original: Cost) -> dict[str, float]:
        """Absolute bound per costed field."""
        out = {}
        for name in _FIELDS:
            v = getattr(self, name)
            if v is not None:
                out[name] = v * getattr(original, name) if v <= 1 else float(v)
        return out

    def met(self, cost: Cost, original: Cost) -> bool:
        return all(getattr(cost, k) <= v for k, v in self.limits(original).items())

    def describe(self, cost: Cost, original: Cost) -> str:
        """'macs 61% of original (bound 50%)' for every bounded field."""
        parts = []
        for k, v in self.limits(original).items():
            base = getattr(original, k) or 1
            parts.append(f"{k} {getattr(cost, k) / base:.1%} of original (bound {v / base:.1%})")
        return ", ".join(parts)
