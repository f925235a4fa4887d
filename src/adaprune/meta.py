"""Copies of a model: weightless ones (a model and its inputs on the meta device, for tracing and exact
cost prediction), zeroed copies for models that do not run on meta tensors, and plain copies of a
parametrized model."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device.

    What ``copy.deepcopy`` would make, only faster on deep models: modules that pickle the standard
    way are rebuilt directly, and their empty bookkeeping containers (hook dicts ...) are created
    rather than deep-copied; everything else goes through ``copy.deepcopy`` with one shared memo.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return _copy_module(model, memo)


def zeroed_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters are zeros on their device, and whose buffers
    are copied.

    For cost prediction on models whose forward reads real values (an attention mask checked with
    ``.item()``) and so cannot run on meta tensors: the shapes, and any control flow on the inputs and
    buffers, are the real model's, without copying its weights. Values computed from the weights are
    not the model's; control flow that depends on them (mixture-of-experts routing) may differ, which
    is why the cost predictor checks this copy's count against the real one before using it. Zeros,
    not uninitialised memory: the allocator may hand back a freed copy of the real weights, and the
    check must not pass by chance.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.zeros_like(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.clone()
    return _copy_module(model, memo)


def _plain(cls: type[nn.Module]) -> bool:
    """Whether instances of ``cls`` deep-copy as nn.Module's own state (no custom copy or pickling)."""
    return (
        cls.__getstate__ is nn.Module.__getstate__
        and cls.__setstate__ is nn.Module.__setstate__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and not hasattr(cls, "__deepcopy__")
    )


def _copy_module(m: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]  # type: ignore[no-any-return]
    cls = type(m)
    if not _plain(cls):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = m.__getstate__()
    for k, v in state.items():
        if k == "_modules":
            state[k] = {n: None if c is None else _copy_module(c, memo) for n, c in v.items()}
        elif type(v) in (dict, OrderedDict, set) and not v:
            state[k] = type(v)()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


def to_meta(x: Any) -> Any:
    """``x`` with every tensor moved to the meta device."""
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without parametrizations, each parametrized tensor a plain parameter holding
    the value the model computes with. ``model`` is untouched (``copy.deepcopy`` and then
    ``remove_parametrizations`` would not do: the copy shares its parametrized class with the original,
    and removing deletes the property from that class)."""
    values: dict[str, dict[str, torch.Tensor]] = {
        name: {attr: getattr(mod, attr).detach().clone() for attr in mod.parametrizations}  # type: ignore[union-attr]
        for name, mod in model.named_modules() if parametrize.is_parametrized(mod)
    }
    plain = copy.deepcopy(model)
    for name, attrs in values.items():
        mod = plain.get_submodule(name)
        mod.__class__ = parametrize.type_before_parametrizations(mod)
        del mod.parametrizations
        for attr, value in attrs.items():
            mod.register_parameter(attr, nn.Parameter(value, requires_grad=value.is_floating_point()))
    return plain
