"""Sizes that remember where they came from.

When traced code reads ``x.shape`` or ``x.size(d)`` along a channel axis, the integer it gets is a
:class:`SizeInt`: an ``int`` that also carries the atoms of that axis and a rational factor. Simple
arithmetic keeps the link (``C // n_heads``, ``3 * C``). When such a size reaches a ``view`` or
``reshape``, the rule knows that the dim it sizes must keep that many channels as the axis it was
read from, and couples the two positionally (as ``nn.MultiheadAttention`` does for its width). This
is what lets attention written as ``qkv.reshape(B, N, 3, heads, C // heads)`` (torchvision's Swin)
prune its residual width and its head size together.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Self


class SizeInt(int):
    """An ``int`` equal to ``len(atoms) * num // den``, with the atoms of the axis it was read from."""

    atoms: torch.Tensor
    num: int
    den: int

    def __new__(cls, value: int, atoms: torch.Tensor, num: int = 1, den: int = 1) -> Self:
        obj = super().__new__(cls, value)
        obj.atoms, obj.num, obj.den = atoms, num, den
        return obj

    def __floordiv__(self, other: Any) -> Any:
        if isinstance(other, int) and not isinstance(other, bool) and other > 0 and int(self) % other == 0:
            return SizeInt(int(self) // other, self.atoms, self.num, self.den * other)
        return int(self) // other

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, int) and not isinstance(other, (bool, SizeInt)) and other > 0:
            return SizeInt(int(self) * other, self.atoms, self.num * other, self.den)
        return int(self) * other

    __rmul__ = __mul__

    def __reduce__(self) -> Any:  # copies and pickles of a size are plain ints
        return (int, (int(self),))
