"""Fields: which atom each element of a traced tensor carries, along one channel axis.

A *field* is an int64 label tensor with the same number of dims as the traced tensor it describes,
of size 1 along every dim where the label does not change (so a conv activation ``(N, C, H, W)``
has a field of shape ``(1, C, 1, 1)``). A tensor may carry several fields, one per independent
channel axis (a weight matrix has one for its rows and one for its columns). Shape ops are applied
to the field itself, which makes every reshape, permute, slice and concat exact by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .atoms import NO_ATOM, Atoms

Field = torch.Tensor


def varying(field: Field) -> set[int]:
    """Dims along which the field's labels change."""
    return {d for d, s in enumerate(field.shape) if s > 1}


def compact(atoms: Atoms, field: Field) -> Field:
    """Canonical form: labels replaced by their class roots, constant dims shrunk to size 1."""
    for d in range(field.dim()):  # broadcast dims (stride 0) are constant: shrunk before the lookup
        if field.shape[d] > 1 and field.stride(d) == 0:
            field = field.narrow(d, 0, 1)
    field = atoms.roots(field)
    for d in range(field.dim()):
        if field.shape[d] > 1 and bool((field == field.narrow(d, 0, 1)).all()):
            field = field.narrow(d, 0, 1)
    return field.contiguous()


def full(field: Field, shape: Sequence[int]) -> Field:
    """The field expanded to the full shape of its tensor."""
    return field.expand(*shape)


def collapse(atoms: Atoms, field: Field, dims: Iterable[int]) -> Field:
    """Union the labels across ``dims`` so the field no longer varies along them (size 1 there)."""
    dims = [d for d in dims if field.shape[d] > 1]
    if not dims:
        return field
    keep = [d for d in range(field.dim()) if d not in dims]
    moved = field.permute(*keep, *dims)
    rows = moved.reshape(*[field.shape[d] for d in keep], -1)
    atoms.union_pairs(rows[..., :1], rows)
    out = field
    for d in dims:
        out = out.narrow(d, 0, 1)
    return compact(atoms, out)


def merge(atoms: Atoms, fields: Sequence[Field]) -> Field:
    """Union several fields of the same tensor elementwise into one (broadcasting their shapes)."""
    result = fields[0]
    for other in fields[1:]:
        atoms.union_pairs(result, other)
        result = torch.where(result != NO_ATOM, result, other)  # (broadcasts)
    return compact(atoms, result)


def read(
    atoms: Atoms, fields: Sequence[Field], shape: Sequence[int], dim: int
) -> tuple[torch.Tensor, list[Field]]:
    """One atom per position along ``dim`` (a layer consuming that dim), and the other fields.

    Fields that vary along ``dim`` are merged and collapsed across every other dim; positions no
    field labels get ``-1`` (fixed). Fields that do not vary along ``dim`` are returned untouched.
    """
    dim = dim % len(shape)
    along = [f for f in fields if f.shape[dim] > 1]
    rest = [f for f in fields if f.shape[dim] == 1]
    if shape[dim] == 1 or not along:
        return torch.full((shape[dim],), NO_ATOM, dtype=torch.long), rest
    merged = merge(atoms, along) if len(along) > 1 else along[0]
    merged = collapse(atoms, merged, [d for d in range(merged.dim()) if d != dim])
    return merged.reshape(-1).clone(), rest


def along(size_or_atoms: torch.Tensor, ndim: int, dim: int) -> Field:
    """A field for a tensor of ``ndim`` dims whose labels are ``size_or_atoms`` along ``dim``."""
    shape = [1] * ndim
    shape[dim % ndim] = size_or_atoms.numel()
    return size_or_atoms.reshape(shape)
