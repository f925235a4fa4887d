"""The shared weights on the model (parametrizations) and what :func:`adaprune.share` reports."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..surgery.mask import Masking
from .kmeans import storage_bits


class SharedWeight(nn.Module):
    """Parametrization ``w -> codebook[indices]``: every weight is one of its group's centroids.

    ``codebook`` (groups, 2**bits) is a parameter (fine-tuning moves the centroids: each receives the
    summed gradient of the weights assigned to it); ``indices`` is a buffer of the smallest integer
    dtype that fits, shaped like the weight. Group ``g`` is output channel ``g`` (one group: the layer).
    """

    indices: torch.Tensor

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("indices", indices)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        groups = self.codebook.shape[0]
        flat = self.indices.reshape(groups, -1).long()
        return self.codebook.gather(1, flat).reshape(self.indices.shape)


class Sharing(Masking):
    """Shared weights put on a model, as one transaction: all of them or none. ``undo()`` takes them
    off (the original weights come back, the same objects); ``materialize()`` writes the centroid
    values into the weights and removes the parametrizations."""

    def __init__(self, model: nn.Module, shared: Mapping[str, nn.Module]) -> None:
        self._entries: list[tuple[nn.Module, str]] = []
        self._order: dict[int, list[str]] = {}
        self.parts: dict[str, nn.Module] = {}
        try:
            for name, part in shared.items():
                mod = model.get_submodule(name)
                self._order.setdefault(id(mod), list(mod._parameters))
                parametrize.register_parametrization(mod, "weight", part)
                self._entries.append((mod, "weight"))
                self.parts[name] = part
        except BaseException:  # an interrupt too: no shared weight may stay on the model
            self.undo()
            raise

    @property
    def active(self) -> bool:
        return bool(self._entries)

    def _finish(self, leave: bool) -> None:
        super()._finish(leave)
        self.parts = {}


@dataclass
class LayerShare:
    """One layer's shared weight.

    ``groups``: codebooks (1, or one per output channel); ``centroids``: the most centroids one of
    them uses (at most ``2**bits``); ``exact_groups``: codebooks that hold their group's values exactly;
    ``error``: relative L2 error ``||W - W_shared|| / ||W||``; ``weighted_error``: the same with each
    squared error weighted by the weight's importance (``None`` without calibration).
    """

    name: str
    shape: tuple[int, ...]
    bits: int
    groups: int
    centroids: int
    exact_groups: int
    error: float
    weighted_error: float | None
    bits_before: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_after(self) -> int:
        """Indices packed at ``bits`` bits plus the codebooks as float32."""
        return storage_bits(self.numel, self.groups, self.bits)

    @property
    def bytes_before(self) -> int:
        return -(-self.bits_before // 8)

    @property
    def bytes_after(self) -> int:
        return -(-self.bits_after // 8)

    @property
    def ratio(self) -> float:
        """``bytes_after / bytes_before`` (0.125 is an eighth)."""
        return self.bytes_after / max(self.bytes_before, 1)


@dataclass
class ShareResult:
    """What :func:`adaprune.share` did: per shared layer its :class:`LayerShare`, the layers left as
    they were (``skipped``: name -> why) and the storage of the shared weights before and after.

    The model keeps its shared weights as parametrizations until :meth:`undo` (the original weights,
    bit-identical) or :meth:`bake` (the centroid values written into plain weights).
    """

    bits: int
    scope: str
    layers: dict[str, LayerShare]
    skipped: dict[str, str]
    sharing: Sharing = field(repr=False)
    finetuned: bool = False

    @property
    def bytes_before(self) -> int:
        """Bytes of the shared layers' weights as they were."""
        return sum(s.bytes_before for s in self.layers.values())

    @property
    def bytes_after(self) -> int:
        """Bytes of the shared layers' weights: packed indices plus float32 codebooks."""
        return sum(s.bytes_after for s in self.layers.values())

    @property
    def ratio(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)

    @property
    def active(self) -> bool:
        """Whether the parametrizations are still on the model."""
        return self.sharing.active

    def codebooks(self) -> dict[str, nn.Parameter]:
        """Each shared layer's codebook parameter (groups, 2**bits), while active."""
        return {name: part.codebook for name, part in self.sharing.parts.items() if isinstance(part, SharedWeight)}

    def undo(self) -> None:
        """Remove the sharing: the original weights come back untouched (same objects, same order)."""
        self.sharing.undo()

    def bake(self) -> None:
        """Write the shared (centroid) values into the weights and remove the parametrizations: the
        model is a plain module again, computing what the shared model computed."""
        self.sharing.materialize()

    materialize = bake

    def summary(self) -> str:
        lines = [
            f"weight sharing: {self.bits} bits, scope={self.scope!r}, {len(self.layers)} layers shared"
            + (", codebooks fine-tuned" if self.finetuned else "")
            + ("" if self.active else " (no longer on the model)"),
            f"  {'layer':<32} {'shape':<18} {'books':>5} {'used':>4} {'error':>7} {'bytes':>10} {'ratio':>6}",
        ]
        for s in self.layers.values():
            lines.append(
                f"  {s.name[-32:]:<32} {str(s.shape)[:18]:<18} {s.groups:>5} {s.centroids:>4} "
                f"{s.error:>7.4f} {s.bytes_after:>10,} {s.ratio:>6.3f}"
            )
        lines.append(
            f"  shared weights: {self.bytes_before:,} -> {self.bytes_after:,} bytes ({self.ratio:.3f}x)"
        )
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name or '(model)'}: {why}")
        return "\n".join(lines)


__all__ = ["LayerShare", "ShareResult", "SharedWeight", "Sharing"]
