"""Per-layer encodings the hybrid controller moves between, and how a model carries them.

A layer's *level* is how its weight is stored: ``"float"`` (as it is), ``"int8"`` (per-channel int8,
:class:`~adaprune.quantize.weights.Int8Weight`) or ``"share<b>"`` (a k-means codebook of ``2**b``
centroids, :class:`~adaprune.share.SharedWeight`). The levels form one ladder, largest first; a move
takes a layer one rung down.

The controller keeps its working model *plain* (no parametrizations) with every encoded weight
baked to the values its encoding gives; :func:`realize` puts the encodings back on a copy. A baked
shared weight has no more distinct values than centroids, so re-fitting it is exact (k-means keeps
them); a baked int8 weight re-quantizes to the same integers. So the plain model plus the spec is the
compressed model, and a snapshot is a plain ``copy.deepcopy`` (a parametrized module must not be
deep-copied and then un-parametrized: the copy shares its parametrized class with the original).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..meta import plain_copy
from ..quantize.weights import int8_bytes, int8_parts
from ..share.kmeans import fit_tensor, index_dtype, storage_bits
from ..share.result import SharedWeight, Sharing

FLOAT = "float"
INT8 = "int8"


def ladder(methods: tuple[str, ...], bits: tuple[int, ...]) -> list[str]:
    """The levels, largest first: float, int8 (with ``quantize``), then shared at each of ``bits``
    (with ``share``)."""
    out = [FLOAT]
    if "quantize" in methods:
        out.append(INT8)
    if "share" in methods:
        out += [f"share{b}" for b in sorted(set(bits), reverse=True)]
    return out


def share_bits(level: str) -> int | None:
    return int(level[5:]) if level.startswith("share") else None


def level_bytes(level: str, shape: tuple[int, ...], per_channel: bool, itemsize: int = 4) -> int:
    """Bytes a weight of ``shape`` takes at ``level`` before entropy coding."""
    n = math.prod(shape)
    if level == FLOAT:
        return n * itemsize
    if level == INT8:
        return int8_bytes(shape)
    bits = share_bits(level)
    assert bits is not None
    return -(-storage_bits(n, shape[0] if per_channel else 1, bits) // 8)


def part_for(weight: torch.Tensor, level: str, per_channel: bool, seed: int) -> nn.Module | None:
    """The parametrization that encodes ``weight`` at ``level`` (``None`` for float)."""
    if level == FLOAT:
        return None
    if level == INT8:
        return int8_parts(weight)
    bits = share_bits(level)
    assert bits is not None
    fit = fit_tensor(weight, bits, per_channel, None, seed)
    return SharedWeight(
        fit.codebook.to(weight.device, weight.dtype),
        fit.indices.reshape(weight.shape).to(weight.device, index_dtype(bits)),
    )


def realize(model: nn.Module, spec: dict[str, str], per_channel: bool, seed: int) -> Sharing:
    """Put the encodings of ``spec`` (layer -> level) on ``model`` in place, as one transaction."""
    parts: dict[str, nn.Module] = {}
    for name, level in spec.items():
        w = model.get_submodule(name).weight
        assert isinstance(w, torch.Tensor)
        part = part_for(w, level, per_channel, seed)
        if part is not None:
            parts[name] = part
    return Sharing(model, parts)


def bake(model: nn.Module, spec: dict[str, str], per_channel: bool, seed: int) -> None:
    """Write the values of ``spec``'s encodings into ``model``'s plain weights, in place."""
    realize(model, spec, per_channel, seed).materialize()


def weight_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        w: Any = model.get_submodule(name).weight
        out[name] = tuple(w.shape)
    return out


__all__ = ["FLOAT", "INT8", "bake", "ladder", "level_bytes", "part_for", "plain_copy", "realize", "share_bits",
           "weight_shapes"]
