"""Exact cost of a plan without touching the model: replay it on a weightless (meta) copy.

Parameters and bytes follow from the plan and the tensor shapes. MACs come from
``torch.utils.flop_counter`` run on a meta-device copy of the model with the plan applied; norm
layers, which the flop counter does not count and which are slow to run on meta tensors, are
swapped for identities in that private copy. Models whose forward needs real values (data-dependent
control flow) fall back to a real copy.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..plan import Plan
from . import Cost, count

_NO_MACS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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


def _strip_norms(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, _NO_MACS):
                setattr(mod, child_name, nn.Identity())


class CostPredictor:
    """Predicts the exact cost of plans for one model (results cached per plan)."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self._cache: dict[str, Cost] = {}
        real = count(model, example_inputs)
        self.use_meta = True
        try:
            meta = self._macs(Plan())
        except Exception:  # noqa: BLE001  (data-dependent control flow cannot run on meta tensors)
            meta = -1
        self.use_meta = meta == real.macs
        self.original = real

    def _macs(self, plan: Plan) -> int:
        from ..surgery.remove import remove

        if self.use_meta:
            clone = meta_copy(self.model)
            remove(clone, plan)
            _strip_norms(clone)
            return count(clone, to_meta(self.example_inputs)).macs
        clone = copy.deepcopy(self.model)
        remove(clone, plan)
        return count(clone, self.example_inputs).macs

    def __call__(self, plan: Plan) -> Cost:
        key = plan.to_json()
        if key not in self._cache:
            self._cache[key] = Cost(
                macs=self._macs(plan),
                params=plan.predicted_params(self.model),
                bytes=plan.predicted_bytes(self.model),
            )
        return self._cache[key]
