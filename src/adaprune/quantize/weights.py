"""Int8 weights kept on the torch model: what the compressed artifact stores and the hybrid controller tries.

``quantize_weights(model)`` rounds the weight of every Linear / Conv1d / Conv2d / Embedding layer to
symmetric int8 with one float32 scale per output channel (``scale = max|w| / 127``, the scheme of
ONNX Runtime's and torchao's per-channel weight quantization) and puts it back as a parametrization
``w -> q * scale``: the model computes with exactly the values an int8 runtime would hold, stays an
ordinary ``nn.Module``, and :meth:`WeightQuant.undo` or :meth:`WeightQuant.bake` take it off.
``adaprune.save(..., compress=True)`` stores such a weight as its int8 tensor and scales.

This is weight-only quantization simulated in float: it shrinks storage, not compute. For int8
execution see :func:`adaprune.quantize` (ONNX Runtime) and :func:`adaprune.torchao_quantize` (torchao).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._check import check_module
from ..graph import ignore_names
from ..share.result import Sharing

QMAX = 127


class Int8Weight(nn.Module):
    """Parametrization ``w -> q * scale``: ``q`` an int8 buffer shaped like the weight, ``scale`` one
    float per output channel (dim 0), in the weight's dtype."""

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.q.dim() - 1)
        return self.q.to(self.scale.dtype) * self.scale.reshape(shape)


def int8_parts(weight: torch.Tensor) -> Int8Weight:
    """The :class:`Int8Weight` of ``weight``: per output channel symmetric int8."""
    w = weight.detach().float()  # in float32: a half-precision scale of a small channel would underflow
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    tiny = torch.finfo(weight.dtype).tiny if weight.is_floating_point() else 1e-38
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(weight.dtype).float().clamp_min(tiny)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.reshape(shape)).clamp(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(q, scale.to(weight.dtype))  # the parametrization keeps the weight's dtype


def int8_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of an int8 weight of ``shape``: one byte a value and a float32 scale per output channel."""
    n = 1
    for s in shape:
        n *= s
    return n + 4 * shape[0]


@dataclass
class WeightQuant:
    """What :func:`quantize_weights` did: per layer the relative L2 error of its int8 weight, the
    layers left alone (``skipped``: name -> why), and the handle that takes the parametrizations off."""

    layers: dict[str, float]
    skipped: dict[str, str]
    handle: Sharing = field(repr=False)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(4 * _numel(s) for s in self.shapes.values())

    @property
    def bytes_after(self) -> int:
        return sum(int8_bytes(s) for s in self.shapes.values())

    @property
    def active(self) -> bool:
        return self.handle.active

    def undo(self) -> None:
        """Remove the int8 weights: the float weights come back untouched."""
        self.handle.undo()

    def bake(self) -> None:
        """Write the int8 values (as floats) into plain weights and remove the parametrizations."""
        self.handle.materialize()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def quantize_weights(model: nn.Module, *, ignore: object = None, names: list[str] | None = None) -> WeightQuant:
    """Put per-channel int8 weights on ``model``'s Linear / Conv / Embedding layers, in place, as one
    transaction (all or none). ``names`` picks the layers (default: every one not ``ignore``\\ d);
    a weight already parametrized, tied to another layer, or not floating point is skipped, and
    ``skipped`` says why."""
    from ..share import _targets

    check_module(model)
    targets, skipped = _targets(model, ignore_names(model, ignore))
    if names is not None:
        wanted = set(names)
        unknown = sorted(wanted - set(targets) - set(skipped))
        if unknown:
            from ..errors import ConfigError

            raise ConfigError(f"quantize_weights: no shareable layer named {', '.join(map(repr, unknown[:5]))}")
        targets = [n for n in targets if n in wanted]
        skipped = {n: why for n, why in skipped.items() if n in wanted}
    parts: dict[str, nn.Module] = {}
    layers: dict[str, float] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in targets:
        w = model.get_submodule(name).weight
        assert isinstance(w, torch.Tensor)
        part = int8_parts(w)
        with torch.no_grad():
            wd = w.detach().double()
            err = (part(w).double() - wd).pow(2).sum().sqrt() / wd.pow(2).sum().sqrt().clamp_min(1e-300)
        layers[name] = float(err)
        shapes[name] = tuple(w.shape)
        parts[name] = part
    return WeightQuant(layers, skipped, Sharing(model, parts), shapes)


__all__ = ["QMAX", "Int8Weight", "WeightQuant", "int8_bytes", "int8_parts", "quantize_weights"]
