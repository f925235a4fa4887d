"""The rule registry: every coupling rule of ``rules/`` registered under the normalised op names it handles.

A rule is ``fn(state, call)``: it reads the fields of ``call``'s tensor arguments from the trace
state and records how the output's channels are coupled to them. The tracer looks rules up here by
:func:`op_name`; this module imports nothing of the tracer, so the rule modules and the tracer do
not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import resolve_name

from ..errors import AdapruneError

if TYPE_CHECKING:
    from .tracer import TraceState


class NeedsValues(AdapruneError):
    """A rule needs the values of a tensor (an index) that the meta-device run does not have: the
    meta trace is abandoned and the real model is traced instead."""


@dataclass
class Call:
    """One recorded torch function call."""

    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        if index < len(self.args):
            return self.args[index]
        return default


Rule = Callable[["TraceState", Call], None]
RULES: dict[str, Rule] = {}


# Factories whose result's shape is their size arguments: given a channel size read from a traced
# tensor (a SizeInt), the new tensor has that many channels, and the creation rule links them (the
# tracer records these calls even when no traced tensor is among their arguments).
SIZED_BY_ARGS = frozenset({"zeros", "ones", "full", "empty", "rand", "randn", "new_zeros", "new_ones", "new_full",
                           "new_empty"})


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a coupling rule under one or more normalised op names."""

    def deco(fn: Rule) -> Rule:
        for n in names:
            if n in RULES:
                raise ValueError(f"a graph rule for op {n!r} is already registered")
            RULES[n] = fn
        return fn

    return deco


_PREFIXES = (
    "torch.nn.functional.",
    "torch.Tensor.",
    "torch._C._nn.",
    "torch.functional.",
    "torch.",
    "_C._nn.",
    "_VariableFunctionsClass.",  # torch._VF functions resolve_name does not know (_pack_padded_sequence)
)


_NAMES: dict[tuple[Any, Any], str] = {}


def op_name(func: Callable[..., Any]) -> str:
    """Normalised op name: ``F.linear`` -> ``linear``, ``Tensor.add_`` -> ``add_`` (cached per function).

    The cache is keyed by the function *and* its ``__name__``: torch builtins that share one C
    implementation compare (and hash) equal (``torch.mm == torch.spmm``), so the function alone would
    give both the name of whichever was seen first."""
    key = (func, getattr(func, "__name__", None))
    try:
        return _NAMES[key]
    except KeyError:
        name = _NAMES[key] = _op_name(func)
        return name
    except TypeError:  # not hashable: not cached
        return _op_name(func)


def _op_name(func: Callable[..., Any]) -> str:
    try:
        name = str(resolve_name(func) or "")
    except Exception:  # noqa: BLE001  (resolve_name is best-effort on exotic callables)
        name = ""
    # resolve_name looks functions up by equality, and builtins sharing a C implementation are equal:
    # it answers torch.mm with 'torch.spmm'. The function's own name wins when torch.<own> is it.
    own = getattr(func, "__name__", None)
    if (name.startswith("torch.") and isinstance(own, str) and name.rpartition(".")[2] != own
            and getattr(torch, own, None) is func):
        name = f"torch.{own}"
    if not name:
        name = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func)))
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name
