"""The layer registry itself (see :mod:`adaprune.layers`); the built-in kinds register here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

Role = Literal["out", "in"]
Fixer = Callable[[Any, dict[str, Any]], None]

CUTS = "adaprune.cuts"
"""Key of ``old`` under which surgery passes the positions it removed from the module's own tensors:
``{attribute: {dim: positions}}`` (a key no attribute can have)."""


@dataclass(frozen=True)
class Refit:
    """A layer that computes ``out_rows(y) = rows(x) @ weight.reshape(out, -1).T (+ bias)``: reconstruction
    solves for its weight by least squares on those rows.

    - ``inputs(layer)``: its input width (a refit is needed when it shrank);
    - ``rows(layer, x)``: its input as one row per output position (the receptive field, flattened in
      the order of ``weight[o].flatten()``);
    - ``out_rows(layer, y)``: its output as rows of the same positions, one column per output channel;
    - ``why_not(layer)``: a reason this instance cannot be refit (``None`` when it can).
    """

    inputs: Callable[[Any], int]
    rows: Callable[[Any, torch.Tensor], torch.Tensor]
    out_rows: Callable[[Any, torch.Tensor], torch.Tensor]
    why_not: Callable[[Any], str | None] = lambda layer: None


@dataclass
class LayerKind:
    """Everything registered for one module class (see the module docstring for each hook)."""

    key: str
    fix: Fixer | None = None
    role: Callable[[Any, int], Role | None] | None = None
    channel_dim: Callable[[Any, torch.Tensor], int] | None = None
    norm: bool | None = None
    refit: Refit | None = None
    width: Callable[[Any], int] | None = None


HOOKS = tuple(f.name for f in fields(LayerKind) if f.name != "key")
"""The names of the hooks a :class:`LayerKind` can hold."""

LAYERS: dict[str, LayerKind] = {}
"""Every registered kind by its key (``module.QualName``)."""

_FOUND: dict[tuple[type, str], Any] = {}  # (class, hook) -> the hook found along the class's MRO

FALLBACK_FIXERS: list[Callable[[Any, dict[str, Any]], bool]] = []
"""Tried in order on a module no fixer is registered for; each returns whether it applied (the
transformers attention heuristic of :mod:`adaprune.layers.known` is one)."""


def key_of(kind: type | str) -> str:
    """The registry key of a class (``module.QualName``), or a qualified name as given."""
    if isinstance(kind, str):
        if not kind or "." not in kind:
            raise ValueError(f"layer kind {kind!r}: give the class or its qualified name, e.g. 'mylib.layers.MyConv'")
        return kind
    if not isinstance(kind, type):
        raise TypeError(f"layer kind must be a class or its qualified name, got {type(kind).__name__}")
    return f"{kind.__module__}.{kind.__qualname__}"


def register_layer(
    kind: type[nn.Module] | str,
    *,
    fix: Fixer | None = None,
    role: Callable[[Any, int], Role | None] | None = None,
    channel_dim: Callable[[Any, torch.Tensor], int] | None = None,
    norm: bool | None = None,
    refit: Refit | None = None,
    width: Callable[[Any], int] | None = None,
) -> LayerKind:
    """Register hooks for modules of class ``kind`` (and its subclasses); returns the entry.

    Hooks not given are left as they are (a kind may be registered in several calls, one hook each);
    giving a hook the kind already has raises ``ValueError``.
    """
    key = key_of(kind)
    given = {"fix": fix, "role": role, "channel_dim": channel_dim, "norm": norm, "refit": refit, "width": width}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        raise ValueError(f"register_layer({key}): give at least one of {', '.join(HOOKS)}")
    entry = LAYERS.get(key) or LayerKind(key)
    taken = [k for k in given if getattr(entry, k) is not None]
    if taken:
        raise ValueError(f"{key} already has a registered {' and '.join(taken)}")
    for k, v in given.items():
        setattr(entry, k, v)
    LAYERS[key] = entry
    _FOUND.clear()
    return entry


def unregister_layer(kind: type[nn.Module] | str) -> LayerKind:
    """Remove ``kind``'s entry (every hook of it) and return it; ``KeyError`` when it has none."""
    key = key_of(kind)
    if key not in LAYERS:
        raise KeyError(f"no layer kind {key} is registered")
    _FOUND.clear()
    return LAYERS.pop(key)


def lookup(module: nn.Module | type, hook: str) -> Any:
    """The ``hook`` registered for the most specific class of ``module`` that has one (``None`` if none)."""
    cls = module if isinstance(module, type) else type(module)
    if (cls, hook) in _FOUND:
        return _FOUND[cls, hook]
    if hook not in HOOKS:
        raise ValueError(f"unknown layer hook {hook!r}; hooks: {', '.join(HOOKS)}")
    found = None
    for base in cls.__mro__:
        entry = LAYERS.get(key_of(base))
        if entry is not None and getattr(entry, hook) is not None:
            found = getattr(entry, hook)
            break
    _FOUND[cls, hook] = found
    return found


def register_fixer(kind: type[nn.Module] | str) -> Callable[[Fixer], Fixer]:
    """Decorator: register ``fn(module, old_attrs)`` as the fixer of ``kind`` (``register_layer(kind, fix=fn)``).

    ``old_attrs`` is the module's ``__dict__`` from before surgery; under the key :data:`CUTS` it also
    holds the positions removed from the module's own parameters and buffers. ``kind`` may be the class
    or its qualified name (``"transformers.pytorch_utils.Conv1D"``), so a fixer for an optional library
    does not import it.
    """

    def deco(fn: Fixer) -> Fixer:
        register_layer(kind, fix=fn)
        return fn

    return deco


def has_fixer(module: nn.Module) -> bool:
    """Whether a fixer is registered for the module's class (or a base class)."""
    return lookup(module, "fix") is not None


def fix_module(module: nn.Module, old: dict[str, Any]) -> bool:
    """Apply the most specific registered fixer, else the first of :data:`FALLBACK_FIXERS` that applies;
    returns False when nothing applies."""
    fn = lookup(module, "fix")
    if fn is not None:
        fn(module, old)
        return True
    return any(fallback(module, old) for fallback in FALLBACK_FIXERS)


def weight_role(module: nn.Module, dim: int) -> Role | None:
    """Whether dim ``dim`` of ``module.weight`` indexes its outputs, its inputs, or neither (``None``)."""
    fn = lookup(module, "role")
    return None if fn is None else fn(module, dim)


def output_channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dim of ``output`` (what ``module`` returned) that holds its channels; the last by default."""
    fn = lookup(module, "channel_dim")
    return output.dim() - 1 if fn is None else int(fn(module, output))


def is_norm(module: nn.Module | type) -> bool:
    """Whether ``module`` is a registered normalisation layer."""
    return bool(lookup(module, "norm"))


def refit_of(module: nn.Module) -> Refit | None:
    """How ``module`` is refit by reconstruction, or ``None`` when it cannot be."""
    return lookup(module, "refit")  # type: ignore[no-any-return]


def output_width(module: nn.Module) -> int | None:
    """The module's output width for reports, or ``None`` for kinds that report none."""
    fn = lookup(module, "width")
    return None if fn is None else int(fn(module))
