"""One coupling rule for every op that combines operands index by index (einsum semantics).

Elementwise ops with broadcasting, ``matmul``, ``linear`` and ``einsum`` are all contractions:
each operand dim carries a letter; letters shared by several operands are the same axis. Fields of
different operands that vary along a shared letter are unioned; a field along a letter that some
operand holds at full size *without* a field is pinned (that operand's size cannot follow); fields
along contracted letters are collapsed and consumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..fields import Field, collapse, merge

if TYPE_CHECKING:
    from ..tracer import TraceState

Operand = tuple[Sequence[Field], Sequence[int], Sequence[int]]  # fields, shape, letters


def _to_global(f: Field, letters: Sequence[int], n: int) -> Field:
    order = sorted(range(len(letters)), key=lambda d: letters[d])
    shape = [1] * n
    for d in order:
        shape[letters[d]] = f.shape[d]
    return f.permute(*order).reshape(shape)


def contract(
    state: TraceState, operands: Sequence[Operand], out_letters: Sequence[int], op: str
) -> list[Field]:
    """Union what the operands share and return the fields of the result (in ``out_letters``)."""
    n = 1 + max([max(letters, default=-1) for _, _, letters in operands] + list(out_letters) + [0])
    items: list[tuple[int, Field]] = []
    for i, (fields, _, letters) in enumerate(operands):
        items.extend((i, _to_global(f, letters, n)) for f in fields)
    if not items:
        return []
    # connected components over "varies along a shared letter"
    comp = list(range(len(items)))

    def find(i: int) -> int:
        while comp[i] != i:
            i = comp[i]
        return i

    varying = [{ax for ax, s in enumerate(g.shape) if s > 1} for _, g in items]
    for i in range(len(items)):
        for j in range(i):
            if varying[i] & varying[j]:
                comp[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)

    out: list[Field] = []
    out_set = set(out_letters)
    for members in groups.values():
        merged = merge(state.atoms, [items[i][1] for i in members])
        axes = {ax for ax, s in enumerate(merged.shape) if s > 1}
        holders: dict[int, set[int]] = {items[i][0]: set() for i in members}
        for i in members:
            holders[items[i][0]] |= varying[i]
        for ax in axes:
            for k, (_, shape, letters) in enumerate(operands):
                if ax in letters and shape[list(letters).index(ax)] > 1 and ax not in holders.get(k, set()):
                    state.atoms.pin(
                        merged, f"combined by {op} in {state.module} with a tensor of fixed size"
                    )
                    break
        if not any(merged.shape[ax] > 1 for ax in out_letters):
            continue  # varies only along contracted letters: consumed here
        contracted = [ax for ax in axes if ax not in out_set]
        if contracted:
            merged = collapse(state.atoms, merged, contracted)
        kept = sorted(out_set)
        sub = merged.reshape([merged.shape[ax] for ax in kept])
        out.append(sub.permute(*[kept.index(ax) for ax in out_letters]))
    return out


def elementwise(state: TraceState, tensors: Sequence[torch.Tensor], out_ndim: int, op: str) -> list[Field]:
    """Fields of the result of a broadcasting elementwise op over ``tensors``."""
    operands = []
    for t in tensors:
        letters = list(range(out_ndim - t.dim(), out_ndim))
        operands.append((state.fields_of(t), tuple(t.shape), letters))
    return contract(state, operands, list(range(out_ndim)), op)
