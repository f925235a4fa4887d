"""Budgets: bounds on costs, relative to the original model or absolute; all given bounds must hold."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .._check import as_float, as_int, check_choice
from ..errors import ConfigError
from . import Cost

STATIC = ("macs", "params", "bytes", "energy")


@dataclass(frozen=True)
class Budget:
    """Upper bounds on the pruned model's costs.

    ``macs``, ``params``, ``bytes``, ``energy`` (estimated µJ, see :mod:`adaprune.cost.energy`) and
    ``latency``: a value in (0, 1] is a fraction of the original model's cost (``Budget(macs=0.5)``
    means at most half the original MACs); a value above 1 is an absolute amount (a count, bytes,
    µJ). ``latency_ms`` is an absolute latency bound. Latency is measured on ``backend`` (``torch``,
    ``onnxruntime`` or ``cuda``) with ``threads`` threads, at the batch size of the example inputs.
    """

    macs: float | None = None
    params: float | None = None
    bytes: float | None = None
    energy: float | None = None
    latency: float | None = None
    latency_ms: float | None = None
    backend: str = "torch"
    threads: int = 1

    def __post_init__(self) -> None:
        bounds = (*STATIC, "latency", "latency_ms")
        for name in bounds:
            v = getattr(self, name)
            if v is not None:  # frozen: store the checked value as a plain int or float
                f = as_float(v, name, low=0.0, low_open=True, where="Budget",
                             hint="a fraction in (0, 1] of the original cost, or an absolute amount above 1")
                object.__setattr__(self, name, int(v) if isinstance(v, numbers.Integral) else f)
        if all(getattr(self, k) is None for k in bounds):
            raise ConfigError("Budget() sets no bound: give at least one of macs=, params=, bytes=, energy=, latency=")
        if self.latency is not None and self.latency_ms is not None:
            raise ConfigError("Budget: give latency= (relative) or latency_ms= (absolute), not both")
        from .latency import BACKENDS

        check_choice(self.backend, "backend", BACKENDS.names(), where="Budget")
        object.__setattr__(self, "threads", as_int(self.threads, "threads", low=1, where="Budget"))

    @property
    def needs_latency(self) -> bool:
        return self.latency is not None or self.latency_ms is not None

    def limits(self, original: dict[str, float]) -> dict[str, float]:
        """Absolute bound per field, given the original model's values."""
        out = {}
        for name in (*STATIC, "latency"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v * original[name] if v <= 1 else float(v)
        if self.latency_ms is not None:
            out["latency"] = float(self.latency_ms)
        return out

    def met(self, values: dict[str, float], original: dict[str, float]) -> bool:
        return all(values[k] <= v * (1 + 1e-12) for k, v in self.limits(original).items() if k in values)

    def describe(self, values: dict[str, float], original: dict[str, float]) -> str:
        """'macs 61.0% of original (bound 50.0%)' for every bounded field that has a value."""
        parts = []
        for k, v in self.limits(original).items():
            if k in values:
                base = original[k] or 1.0
                parts.append(f"{k} {values[k] / base:.1%} of original (bound {v / base:.1%})")
        return ", ".join(parts)


def static_values(cost: Cost) -> dict[str, float]:
    """The budgetable fields of a :class:`Cost` as a dict (energy estimated from MACs and bytes)."""
    return {"macs": cost.macs, "params": cost.params, "bytes": cost.bytes, "energy": cost.energy_uj}
