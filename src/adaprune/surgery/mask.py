"""Soft, reversible surgery: zero the planned slices with ``torch.nn.utils.parametrize``.

A masked model computes what the physically pruned model computes (wherever no norm or reduction
spans the pruned dim) while keeping every tensor's shape; :meth:`Masking.undo` restores it.
Buffers (BatchNorm running statistics) are not masked: the masked weight and bias already make
the removed channels' outputs zero.
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


def mask_tensor(shape: torch.Size, dims: dict[int, tuple[int, ...]], device: torch.device) -> torch.Tensor:
    mask = torch.ones(shape, device=device)
    for d, idx in dims.items():
        if idx:
            mask.index_fill_(d, torch.tensor(list(idx), device=device), 0.0)
    return mask


class Masking:
    """The masks a plan put on a model; ``undo()`` takes them off again."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        plan.check(model)
        self._entries: list[tuple[nn.Module, str]] = []
        params = dict(model.named_parameters(remove_duplicate=False))
        try:
            for name, dims in plan.removals.items():
                if name not in params:
                    continue  # a buffer
                mod_name, _, attr = name.rpartition(".")
                mod = model.get_submodule(mod_name)
                p = params[name]
                parametrize.register_parametrization(
                    mod, attr, ChannelMask(mask_tensor(p.shape, dict(dims), p.device))
                )
                self._entries.append((mod, attr))
        except Exception:
            self.undo()
            raise

    def undo(self) -> None:
        """Remove the masks; the original weights come back untouched."""
        for mod, attr in reversed(self._entries):
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self._entries.clear()


def mask(model: nn.Module, plan: Plan) -> Masking:
    """Zero what ``plan`` removes, reversibly; returns the :class:`Masking` handle."""
    return Masking(model, plan)
