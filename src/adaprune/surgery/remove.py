"""Physical removal: slice the planned tensors, update module attributes, check, or roll back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import SurgeryError
from ..plan import Plan
from .fixers import fix_module


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """For each parameter/buffer object: every (module, attribute, is_param) that holds it."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, name, True))
        for name, b in mod._buffers.items():
            if b is not None:
                out.setdefault(id(b), []).append((mod, name, False))
    return out


def _sliced(t: torch.Tensor, dims: dict[int, tuple[int, ...]]) -> torch.Tensor:
    out = t.detach()
    for d, idx in dims.items():
        if not idx:
            continue
        keep = torch.ones(t.shape[d], dtype=torch.bool)
        keep[list(idx)] = False
        out = out.index_select(d, keep.nonzero().flatten().to(t.device))
    return out.clone()


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def remove(
    model: nn.Module,
    plan: Plan,
    check: Callable[[], Any] | None = None,
    expected_shapes: list[tuple[int, ...]] | None = None,
    commit: bool = True,
) -> None:
    """Apply ``plan`` physically to ``model`` in place.

    Args:
        model: the model (changed in place).
        plan: what to remove.
        check: optional ``() -> output``; run after surgery, its output shapes must equal
            ``expected_shapes``. On any failure the model is restored exactly and
            :class:`SurgeryError` is raised.
        expected_shapes: output shapes the model must keep.
        commit: with ``False`` the model is restored after a successful check (a dry run).
    """
    plan.check(model)
    if plan.is_empty:
        return
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    owners = _owners(model)
    touched: dict[int, nn.Module] = {}
    for name in plan.removals:
        for mod, _, _ in owners[id(tensors[name])]:
            touched[id(mod)] = mod
    parents = _ancestors(model, touched)
    saved = {
        k: (dict(m.__dict__), dict(m._parameters), dict(m._buffers))
        for k, m in [*touched.items(), *((id(p), p) for p in parents)]
    }
    try:
        for name, dims in plan.removals.items():
            old = tensors[name]
            new = _sliced(old, dict(dims))
            if isinstance(old, nn.Parameter):  # one new Parameter shared by all owners keeps ties
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for mod, attr, is_param in owners[id(old)]:
                store: dict[str, Any] = mod._parameters if is_param else mod._buffers
                store[attr] = new
        for k, mod in touched.items():
            fix_module(mod, saved[k][0])
        for mod in parents:  # containers whose attributes mirror their children's sizes
            fix_module(mod, saved[id(mod)][0])
        if check is not None:
            with torch.no_grad():
                got = output_shapes(check())
            if expected_shapes is not None and got != expected_shapes:
                raise SurgeryError(
                    f"after surgery the output shapes are {got}, expected {expected_shapes}"
                )
    except Exception as exc:
        _restore(touched, saved)
        _restore({id(p): p for p in parents}, saved)
        if isinstance(exc, SurgeryError):
            raise SurgeryError(f"{exc}; the model was restored unchanged") from exc
        raise SurgeryError(
            f"applying the plan failed ({type(exc).__name__}: {exc}); the model was restored "
            "unchanged. If the model computes sizes from constants (e.g. view(B, 512, -1)), add the "
            "module that does so to `ignore`, or register a fixer for its class with "
            "adaprune.surgery.register_fixer"
        ) from exc
    if not commit:
        _restore(touched, saved)
        _restore({id(p): p for p in parents}, saved)


def _ancestors(model: nn.Module, touched: dict[int, nn.Module]) -> list[nn.Module]:
    """Modules containing a touched module (not touched themselves), deepest first."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    found: dict[str, None] = {}
    for k in touched:
        parts = names.get(k, "").split(".") if names.get(k) else []
        for i in range(len(parts) - 1, -1, -1):
            found[".".join(parts[:i])] = None
    mods = [(n, model.get_submodule(n)) for n in found]
    mods = [(n, m) for n, m in mods if id(m) not in touched]
    mods.sort(key=lambda nm: -nm[0].count(".") - (1 if nm[0] else 0))
    return [m for _, m in mods]


def _restore(touched: dict[int, nn.Module], saved: dict[int, tuple[dict, dict, dict]]) -> None:
    for k, mod in touched.items():
        d, params, bufs = saved[k]
        mod.__dict__.clear()
        mod.__dict__.update(d)
        mod._parameters = params
        mod._buffers = bufs
