"""Soft, reversible surgery: zero weights with ``torch.nn.utils.parametrize``.

A masked model computes what the physically pruned model computes (wherever no norm or reduction
spans the pruned dim) while keeping every tensor's shape. :meth:`Masking.undo` restores the original
weights; :meth:`Masking.materialize` bakes the zeros into the weights and drops the masks. Buffers
(BatchNorm running statistics) are not masked: the masked weight and bias already make the removed
channels' outputs zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..plan import Plan


class ChannelMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed 0/1 mask broadcast over ``w``."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class ShiftedMask(nn.Module):
    """Parametrization ``w -> (w + shift) * mask``: a pruning method that also updates the kept weights
    (SparseGPT) keeps the update beside the untouched parameter, so ``undo()`` gives the original back
    and gradients still reach ``w``."""

    mask: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mask: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("shift", shift)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + self.shift) * self.mask


def mask_tensor(
    shape: torch.Size, dims: dict[int, tuple[int, ...]], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A 0/1 mask of ``shape`` with the positions ``dims`` lists zeroed; in the masked tensor's ``dtype``
    (a parametrization may not change it: a bfloat16 weight needs a bfloat16 mask)."""
    mask = torch.ones(shape, device=device, dtype=dtype)
    for d, idx in dims.items():
        if idx:
            mask.index_fill_(d, torch.tensor(list(idx), device=device), 0.0)
    return mask


class Masking:
    """Masks put on a model's parameters; ``undo()`` takes them off, ``materialize()`` bakes them in."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor],
                 shifts: dict[str, torch.Tensor] | None = None) -> None:
        """``masks``: parameter name -> 0/1 mask; ``shifts``: parameter name -> an update added to the
        weight before masking (:class:`ShiftedMask`), for the parameters that have one."""
        self._entries: list[tuple[nn.Module, str]] = []
        self._order: dict[int, list[str]] = {}
        shifts = shifts or {}
        try:
            for name, m in masks.items():
                mod_name, _, attr = name.rpartition(".")
                mod = model.get_submodule(mod_name)
                self._order.setdefault(id(mod), list(mod._parameters))
                parametrization = ShiftedMask(m, shifts[name]) if name in shifts else ChannelMask(m)
                parametrize.register_parametrization(mod, attr, parametrization)
                self._entries.append((mod, attr))
        except BaseException:  # an interrupt too: no mask may stay on the model
            self.undo()
            raise

    def _finish(self, leave: bool) -> None:
        for mod, attr in reversed(self._entries):
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=leave)
        for mod, _ in self._entries:  # parametrize re-registers at the end: restore the original order
            order = self._order.get(id(mod), [])
            params = mod._parameters
            mod._parameters = {k: params[k] for k in order if k in params} | {
                k: v for k, v in params.items() if k not in order
            }
        self._entries.clear()

    def undo(self) -> None:
        """Remove the masks; the original weights come back untouched (same objects, same order)."""
        self._finish(leave=False)

    def materialize(self) -> None:
        """Write the masked (zeroed) weights into the parameters and remove the masks."""
        self._finish(leave=True)


def mask(model: nn.Module, plan: Plan) -> Masking:
    """Zero what ``plan`` removes, reversibly; returns the :class:`Masking` handle."""
    from .._check import check_module, check_plan

    check_module(model)
    check_plan(plan)
    plan.check(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = {
        name: mask_tensor(params[name].shape, dict(dims), params[name].device, params[name].dtype)
        for name, dims in plan.removals.items()
        if name in params
    }
    return Masking(model, masks)
