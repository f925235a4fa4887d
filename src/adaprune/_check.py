"""Argument validators shared by every public entry point.

Small pure functions: each checks one value, returns it converted to a plain Python type (NumPy
scalars become ``int``/``float``/``bool``), or raises an :mod:`adaprune.errors` class whose one-line
message names the argument, shows what was given (bounded by :func:`~adaprune.errors.shown`), says
what is allowed and how to fix it. A wrong type raises :class:`ArgumentTypeError`, NaN or infinity
:class:`NonFiniteArgumentError`, any other wrong value :class:`ConfigError`.
"""

from __future__ import annotations

import math
import numbers
import os
import types
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from .errors import ArgumentTypeError, ConfigError, NonFiniteArgumentError, UnknownNameError, shown

__all__ = [
    "NonFiniteArgumentError",
    "a_type",
    "as_bool",
    "as_float",
    "as_int",
    "brief",
    "check_batches",
    "check_callable",
    "check_choice",
    "check_inputs",
    "check_instance",
    "check_module",
    "check_name",
    "check_path",
    "check_plan",
    "check_ratio",
    "check_tolerance_scale",
    "clip",
    "describe",
    "given",
    "type_name",
]


def type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def brief(value: Any, limit: int = 80) -> str:
    """:func:`~adaprune.errors.shown` on one line (a module's or a tensor's repr spans several)."""
    return " ".join(shown(value, limit).split())


def a_type(value: Any) -> str:
    """'a str', 'an int', 'a torch.Tensor' ..."""
    name = type_name(value)
    return f"{'an' if name[:1] in 'aeiouAEIOU' else 'a'} {name}"


def describe(value: Any) -> str:
    """A short description of a value: 'a tensor of shape (2, 3)', 'a tuple of 3', "a str ('x')" ..."""
    shape = getattr(value, "shape", None)
    if shape is not None and type(value).__module__.split(".")[0] in ("torch", "numpy"):
        return f"{a_type(value)} of shape {tuple(shape)}"
    if isinstance(value, (tuple, list)):
        return f"{a_type(value)} of {len(value)}"
    return f"{a_type(value)} ({brief(value, 40)})"


def clip(text: str, limit: int = 120) -> str:
    """``text`` on one line, cut to ``limit`` characters (for an exception's message quoted in ours)."""
    flat = " ".join(text[: 4 * limit].split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def given(name: str, value: Any, where: str = "") -> str:
    """``name=<value>`` (or ``Where(name=<value>)``), the value bounded."""
    text = f"{name}={brief(value)}"
    return f"{where}({text})" if where else text


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def as_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    where: str = "",
    hint: str = "",
) -> float:
    """``value`` as a finite ``float`` within the bounds (a bound is inclusive unless ``*_open``)."""
    bounds = _range(low, high, low_open, high_open)
    allowed = f"a number {bounds}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{given(name, value, where)} is {a_type(value)}; expected {allowed}{_tail(hint)}")
    try:
        out = float(value)
    except (OverflowError, ValueError):  # an int too large for a float
        raise ConfigError(f"{given(name, value, where)} is too large; expected {allowed}{_tail(hint)}") from None
    if not math.isfinite(out):
        raise NonFiniteArgumentError(f"{given(name, value, where)} is not finite; expected {allowed}{_tail(hint)}")
    too_low = low is not None and (out <= low if low_open else out < low)
    too_high = high is not None and (out >= high if high_open else out > high)
    if too_low or too_high:
        raise ConfigError(f"{given(name, value, where)} must be {bounds}{_tail(hint)}")
    return out


def as_int(
    value: Any,
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    where: str = "",
    hint: str = "",
) -> int:
    """``value`` as an ``int`` (bools and floats refused, even 2.0) within ``[low, high]``."""
    bounds = _range(low, high, False, False)
    allowed = f"an integer {bounds}"
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{given(name, value, where)} is {a_type(value)}; expected {allowed}{_tail(hint)}")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        raise ConfigError(f"{given(name, value, where)} must be {bounds}{_tail(hint)}")
    return out


def as_bool(value: Any, name: str, *, where: str = "") -> bool:
    """``value`` as a ``bool`` (``True``/``False`` or a NumPy bool; not 0/1, not strings)."""
    if not _is_bool(value):
        raise ArgumentTypeError(f"{given(name, value, where)} is {a_type(value)}; expected True or False")
    return bool(value)


def check_module(value: Any, name: str = "model") -> nn.Module:
    """``value`` itself when it is an ``nn.Module`` instance."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        fix = f"pass an instance ({value.__name__}(...)), not the class"
    elif isinstance(value, Mapping):
        fix = "pass the model itself, not its state_dict"
    else:
        fix = "pass the torch.nn.Module to work on"
    raise ArgumentTypeError(f"{name} is {describe(value)}; expected an nn.Module: {fix}")


def check_inputs(value: Any, name: str = "example_inputs") -> Any:
    """Example inputs: anything the model may accept, but not ``None`` and not a module."""
    if value is None:
        raise ArgumentTypeError(
            f"{name}=None: the model is run on example inputs; pass a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs"
        )
    if isinstance(value, nn.Module):
        raise ArgumentTypeError(
            f"{name} is an nn.Module ({type(value).__name__}); expected the model's inputs (a tensor, tuple or "
            "dict): are model and example_inputs swapped?"
        )
    return value


def check_instance(value: Any, cls: type | tuple[type, ...], name: str, expected: str, hint: str = "") -> Any:
    """``value`` when it is an instance of ``cls`` (described to the user as ``expected``)."""
    if not isinstance(value, cls):
        raise ArgumentTypeError(f"{given(name, value)} is {a_type(value)}; expected {expected}{_tail(hint)}")
    return value


def check_callable(value: Any, name: str, expected: str) -> Any:
    if not callable(value):
        raise ArgumentTypeError(f"{given(name, value)} is {a_type(value)}; expected {expected}")
    return value


def check_batches(value: Any, name: str, expected: str = "(inputs, targets) batches", *, reusable: bool = False) -> Any:
    """An iterable of batches: not a string, bytes or mapping (those iterate characters or keys).

    ``reusable``: refuse generators too (they are empty after one pass, and the value is read again).
    """
    iterable = isinstance(value, Iterable) or hasattr(type(value), "__getitem__")  # (a Dataset iterates by index)
    scalar = isinstance(value, np.generic) or getattr(value, "ndim", None) == 0  # (NumPy scalars have __getitem__)
    bad = isinstance(value, (str, bytes, bytearray, Mapping)) or not iterable or scalar
    if bad or (reusable and isinstance(value, types.GeneratorType)):
        fix = "a list or a DataLoader (read more than once)" if reusable else "a list or a DataLoader"
        raise ArgumentTypeError(
            f"{given(name, value)} is {a_type(value)}; expected an iterable of {expected}, e.g. {fix}"
        )
    return value


def check_choice(value: Any, name: str, choices: Collection[str], *, where: str = "") -> str:
    """``value`` when it is one of the strings ``choices``."""
    options = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{given(name, value, where)} is {a_type(value)}; expected one of {options}")
    if value not in choices:
        raise ConfigError(f"{given(name, value, where)} is not one of {options}")
    return value


def check_name(value: str, names: Collection[str], name: str, kind: str) -> str:
    """A registered name: else :class:`UnknownNameError` listing ``names`` (the value bounded)."""
    if value not in names:
        raise UnknownNameError(f"{name}={brief(value)}: unknown {kind}; registered: {', '.join(sorted(names))}")
    return value


def check_path(value: Any, name: str) -> Any:
    """``None``, a ``str`` or an ``os.PathLike``."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{given(name, value)} is {a_type(value)}; expected a path (str or pathlib.Path)")
    if value is not None and os.fspath(value) == "":
        raise ConfigError(f"{name}='' is an empty path; give a file or directory name ('.' is the current directory)")
    return value


def check_plan(value: Any, name: str = "plan") -> Any:
    """An :class:`adaprune.Plan` (a dict or JSON text is not one: ``Plan.from_dict``/``from_json`` reads them)."""
    from .plan import Plan

    fix = "pass result.plan" if isinstance(getattr(value, "plan", None), Plan) else "read a saved plan with Plan.from_json(text)"
    return check_instance(value, Plan, name, "an adaprune.Plan", fix)


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ArgumentTypeError(f"{name} must be a number in [0, 1), got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(
            f"{name}={shown(ratio)} is outside [0, 1): {name} is the fraction of channels removed from each "
            "group (0.5 removes half); use a value such as 0.3"
        )
    return float(ratio)


def check_tolerance_scale(tolerance: float, value: float, metric: str, where: str = "") -> None:
    """Refuse a tolerance of 1 or more for a metric measured in [0, 1] (accuracy, Dice, recall@1 ...): a drop
    that large allows any model, so it is a percentage meant as a fraction. Tolerances are absolute, in
    the metric's own units; a perplexity's may well be 1 or more."""
    if tolerance >= 1.0 and 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{where}tolerance={tolerance:g} for the metric {metric!r}, which measured {value:.4g}: a drop of "
            f"{tolerance:g} allows any model; the tolerance is absolute, in the metric's units (write "
            f"{tolerance / 100:g} for {tolerance:g} points)"
        )
