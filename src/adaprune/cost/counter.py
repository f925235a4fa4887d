"""Counting MACs: torch's flop formulas (``torch.utils.flop_counter``) without its per-module bookkeeping.

``FlopCounterMode`` tracks the module hierarchy (a global module hook on every call, every parent's
count updated per op), builds a set of skipped ops on every op, and asks every op that has no formula
whether it decomposes. A prune counts the model twice and the adaptive controller many times more, and
only the total is ever read. :class:`MacCounter` takes the same decisions (the same ops skipped, the
same decompositions, the same formulas, so the same totals) with the per-op work cached, and keeps the
total only. A higher-order op (``cond``, a Triton kernel) raises :class:`NeedsTorchCounter` (and sets
``met_higher_order_op``, since torch may wrap the exception): the caller counts that model with
``FlopCounterMode``, which handles them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator, OpOverload
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

_aten = torch.ops.aten
# the ops FlopCounterMode answers NotImplemented (sizes, strides, layout: non-standard tensor policies)
_SKIP = frozenset({
    _aten.sym_is_contiguous.default, _aten.is_contiguous.default, _aten.is_contiguous.memory_format,
    _aten.is_strides_like_format.default, _aten.is_non_overlapping_and_dense.default, _aten.size.default,
    _aten.sym_size.default, _aten.stride.default, _aten.sym_stride.default, _aten.storage_offset.default,
    _aten.sym_storage_offset.default, _aten.numel.default, _aten.sym_numel.default, _aten.dim.default,
    torch.ops.prim.layout.default,
})
_DECOMPOSES: dict[OpOverload, bool] = {}  # op -> whether it has a CompositeImplicitAutograd kernel


class NeedsTorchCounter(Exception):
    """The model ran a higher-order op; count it with ``torch.utils.flop_counter.FlopCounterMode``."""


def _decomposes(func: OpOverload) -> bool:
    found = _DECOMPOSES.get(func)
    if found is None:
        key = DispatchKey.CompositeImplicitAutograd
        found = _DECOMPOSES[func] = key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), key
        )
    return found


class MacCounter(TorchDispatchMode):
    """Total flops of the ops run under it, by torch's flop registry plus ``custom`` formulas
    (``{op packet: fn(*shapes, out_shape=...)}``, as ``FlopCounterMode``'s ``custom_mapping``)."""

    supports_higher_order_operators = True

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps a subclass's __torch_dispatch__ in torch._dynamo.disable, which imports
        # torch._dynamo (1.5 s) on the first op counted in a process; counting runs eagerly, never
        # under torch.compile, so it needs no such guard
        return False

    def __init__(self, custom: dict[Any, Callable[..., int]] | None = None) -> None:
        super().__init__()
        self.registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in (custom or {}).items()}}
        self.flops = 0
        self.met_higher_order_op = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _SKIP:
            return NotImplemented
        if isinstance(func, HigherOrderOperator):
            self.met_higher_order_op = True  # (torch may wrap the exception: the flag tells the caller)
            raise NeedsTorchCounter(str(func))
        if func not in self.registry and func is not torch.ops.prim.device.default and _decomposes(func):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out
