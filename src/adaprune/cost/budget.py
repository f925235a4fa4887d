"""Budgets: bounds on costs, relative to the original model or absolute; all given bounds must hold.

The costs a budget can bound are those of the cost registry (:mod:`adaprune.cost.registry`): each
registered cost is a keyword of :class:`Budget`, with no edit here.
"""

from __future__ import annotations

import difflib
import numbers
from dataclasses import FrozenInstanceError
from typing import Any

from .._check import as_float, as_int, check_choice
from ..errors import ArgumentTypeError, ConfigError, shown
from .registry import COSTS, static_values

__all__ = ["Budget", "static_values"]

_RELATIVE_HINT = "a fraction in (0, 1] of the original cost, or an absolute amount above 1"


def _rebuild(bounds: dict[str, float], backend: str, threads: int) -> Budget:
    return Budget(**bounds, backend=backend, threads=threads)


class Budget:
    """Upper bounds on the pruned model's costs.

    One keyword per registered cost (:data:`adaprune.cost.registry.COSTS`): built in are ``macs``,
    ``params``, ``bytes``, ``energy`` (estimated µJ, see :mod:`adaprune.cost.energy`) and
    ``latency``. A value in (0, 1] is a fraction of the original model's cost (``Budget(macs=0.5)``
    means at most half the original MACs); a value above 1 is an absolute amount (a count, bytes,
    µJ, ms). ``latency_ms`` is an absolute latency bound. Latency is measured on ``backend``
    (``torch``, ``onnxruntime`` or ``cuda``) with ``threads`` threads, at the batch size of the
    example inputs.

    A budget is immutable, hashable and compared by value; each bound reads as an attribute
    (``Budget(macs=0.5).macs == 0.5``; an unset bound is ``None``).
    """

    __slots__ = ("_bounds", "_costs", "backend", "threads")
    backend: str
    threads: int
    _bounds: dict[str, int | float]  # keyword -> checked value, the set bounds only, in registry order
    _costs: dict[str, tuple[str, bool, bool]]  # keyword -> (cost name, bound absolute?, cost static?)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        positional = (*(kw for name in COSTS.builtin for kw in COSTS.get(name).keywords), "backend", "threads")
        if len(args) > len(positional):
            raise ArgumentTypeError(f"Budget takes at most {len(positional)} positional arguments; name the bounds")
        for name, value in zip(positional, args):
            if name in kwargs:
                raise ArgumentTypeError(f"Budget got two values for {name!r}")
            kwargs[name] = value
        backend, threads = kwargs.pop("backend", "torch"), kwargs.pop("threads", 1)
        known = COSTS.keywords()
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(str(key)[:100], list(known), 1)
                raise ArgumentTypeError(
                    f"Budget got an unknown cost {shown(key)}; "
                    + (f"did you mean {close[0]!r}? " if close else "")
                    + f"registered costs: {', '.join(known)} (and backend=, threads=)"
                )
        bounds: dict[str, int | float] = {}
        costs: dict[str, tuple[str, bool, bool]] = {}
        for kw, entry in known.items():  # registry order: the first bad field is the one reported
            v = kwargs.get(kw)
            if v is None:
                continue
            absolute = kw != entry.name or not entry.relative
            f = as_float(v, kw, low=0.0, low_open=True, where="Budget",
                         hint=_RELATIVE_HINT if not absolute else f"an absolute amount in {entry.unit}")
            bounds[kw] = int(v) if isinstance(v, numbers.Integral) else f  # plain int or float
            costs[kw] = (entry.name, absolute, entry.static)
        if not bounds:
            raise ConfigError(
                f"Budget() sets no bound: give at least one of {', '.join(f'{n}=' for n in COSTS.names())}"
            )
        for entry in COSTS.entries():
            if entry.absolute and entry.name in bounds and entry.absolute in bounds:
                raise ConfigError(
                    f"Budget: give {entry.name}= (relative) or {entry.absolute}= (absolute), not both"
                )
        from .latency import BACKENDS

        check_choice(backend, "backend", BACKENDS.names(), where="Budget")
        object.__setattr__(self, "_bounds", bounds)
        object.__setattr__(self, "_costs", costs)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "threads", as_int(threads, "threads", low=1, where="Budget"))

    # -- a frozen value ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> int | float | None:
        """A bound by its keyword (``None`` when not set); any other name is an ``AttributeError``."""
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._bounds:
            return self._bounds[name]
        if name in COSTS.keywords():
            return None
        raise AttributeError(f"'Budget' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _key(self) -> tuple[Any, ...]:
        return (tuple(sorted(self._bounds.items())), self.backend, self.threads)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Budget)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (dict(self._bounds), self.backend, self.threads))

    def __repr__(self) -> str:
        """Every built-in bound (``None`` when unset), then the other bounds set, backend and threads:
        for built-in costs the dataclass repr of earlier versions, which run directories compare."""
        builtin = [kw for name in COSTS.builtin for kw in COSTS.get(name).keywords]
        shown_ = {kw: self._bounds.get(kw) for kw in builtin}
        shown_.update({kw: v for kw, v in self._bounds.items() if kw not in shown_})
        parts = [f"{k}={v!r}" for k, v in shown_.items()]
        return f"Budget({', '.join(parts)}, backend={self.backend!r}, threads={self.threads!r})"

    # -- what the bounds say -------------------------------------------------------------------
    @property
    def bounds(self) -> dict[str, int | float]:
        """The bounds set, by keyword (``{"macs": 0.5}``, ``{"latency_ms": 3.0}``), in registry order."""
        return dict(self._bounds)

    @property
    def needs_latency(self) -> bool:
        """Whether latency is bounded: it needs the model run on ``backend``."""
        return any(name == "latency" for name, _, _ in self._costs.values())

    @property
    def needs_disk(self) -> bool:
        """Whether the compressed artifact's size (``disk_bytes``) is bounded: only
        :func:`adaprune.compress` can meet that bound (pruning alone keeps float32 weights)."""
        return any(name == "disk_bytes" for name, _, _ in self._costs.values())

    def refuse_disk(self, where: str) -> None:
        """A :class:`ConfigError` when ``disk_bytes`` is bounded: ``where`` prunes, it does not compress."""
        if self.needs_disk:
            raise ConfigError(
                f"{where}: Budget(disk_bytes=...) bounds the compressed artifact, which adaprune.compress makes "
                "(pruning, weight sharing and int8 together); bound params or bytes here, or call adaprune.compress"
            )

    def limits(self, original: dict[str, float]) -> dict[str, float]:
        """Absolute bound per cost name, given the original model's values."""
        out = {}
        for kw, v in self._bounds.items():
            name, absolute, _ = self._costs[kw]
            out[name] = float(v) if absolute or v > 1 else v * original[name]
        return out

    def absolute(self, original: dict[str, float]) -> Budget:
        """The same bounds as absolute amounts, given the original model's values: a budget that means
        the same on a model already pruned (``Budget(macs=0.5)`` of the original, applied to a copy
        that has 0.75 of its MACs). A cost without an absolute keyword keeps a relative bound, rescaled
        to ``original``'s value."""
        out: dict[str, int | float] = {}
        for name, limit in self.limits(original).items():
            entry = COSTS.get(name)
            if entry.absolute:
                out[entry.absolute] = limit
            elif limit > 1 or not entry.relative:
                out[name] = limit
            else:  # no absolute keyword and an amount <= 1, which would read as a fraction
                raise ConfigError(f"Budget.absolute: the {name} bound {limit!r} cannot be stated absolutely")
        return Budget(**out, backend=self.backend, threads=self.threads)

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


COSTS.reserved.update(n for n in dir(Budget) if not n.startswith("_"))
