"""Rules for ops that move elements without mixing them: views, slices, splits, concatenation.

These ops are applied to the fields themselves, so the mapping of channels is exact whatever the
op does. What the rules add is *rigidity*: a dim whose size the code fixes (an integer index, the
non-inferred sizes of a split reshape, the number of chunks) cannot shrink, so the channels across
it are pruned in lockstep (or pinned when nothing else can shrink).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...layers import has_fixer
from ..atoms import NO_ATOM
from ..fields import Field, collapse, compact, full, merge
from ..registry import Call, NeedsValues, rule
from ..sizes import SizeInt
from ._contract import contract, elementwise

if TYPE_CHECKING:
    from ..tracer import TraceState


def _apply(call: Call, x: torch.Tensor, label: Field) -> Any:
    args = list(call.args)
    args[0] = full(label, x.shape)
    return call.func(*args, **call.kwargs)


def _set_results(state: TraceState, out: Any, results: list[Any]) -> None:
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    for i, o in enumerate(outs):
        fs = []
        for r in results:
            lab = r if isinstance(r, torch.Tensor) else r[i]
            fs.append(compact(state.atoms, lab))
        state.set_fields(o, [f for f in fs if any(s > 1 for s in f.shape)])


_MOVE = ["permute", "transpose", "swapaxes", "swapdims", "t", "T.__get__", "mT.__get__", "movedim", "moveaxis", "squeeze", "unsqueeze", "expand", "broadcast_to", "repeat", "tile", "flip", "fliplr", "flipud", "rot90", "repeat_interleave", "unfold", "diagonal"]


@rule(*_MOVE)
def move(state: TraceState, call: Call) -> None:
    x = call.args[0]
    if call.name == "unfold" and call.func is not torch.Tensor.unfold:  # F.unfold (im2col) mixes positions
        state.unknown(call)
        return
    fields = state.fields_of(x)
    # windows along a dim (Tensor.unfold) and a diagonal across two dims select positions by index: a cut
    # along such a dim selects other elements (a diagonal of a (T, C') slice is not the kept part of the
    # old one), so a channel axis there is pinned
    positional: list[int] = []
    if call.name == "unfold" and x.dim():
        positional = [call.arg(1, "dimension") % x.dim()]
    elif call.name == "diagonal":
        positional = [call.arg(2, "dim1", 0) % x.dim(), call.arg(3, "dim2", 1) % x.dim()]
    for f in fields:
        if any(f.shape[d] > 1 for d in positional):
            state.pin_op(f, call.name, "elements picked by position along a channel dim")
    results = [_apply(call, x, f) for f in fields]
    _set_results(state, call.out, results)


@rule("expand_as")
def expand_as(state: TraceState, call: Call) -> None:
    """``x.expand_as(other)``: the result has ``other``'s shape, so it couples like a broadcasting
    elementwise op of the two (``x``'s channels with ``other``'s along shared dims; ``other``'s along
    dims where ``x`` is broadcast)."""
    x, other = call.args[0], call.arg(1, "other")
    state.set_fields(call.out, elementwise(state, [x, other], call.out.dim(), call.name))


@rule("roll")
def roll(state: TraceState, call: Call) -> None:
    """A roll along a channel dim wraps a different channel around once channels are cut (the shift
    is fixed, the width is not): those channels are pinned. Along other dims the channels go through."""
    x = call.args[0]
    dims = call.arg(2, "dims")
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):  # over the flattened tensor
        rolled = list(range(x.dim()))
    else:
        rolled = [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
    fields = state.fields_of(x)
    for f in fields:
        if any(f.shape[d] > 1 for d in rolled):
            state.pin_op(f, call.name, "rolled along a channel dim")
    _set_results(state, call.out, [_apply(call, x, f) for f in fields])


def _tie(state: TraceState, f: Field, dim: int, blocks: int, across: int) -> Field:
    """Dim ``dim`` of ``f`` seen as ``(blocks, n // blocks)``: union the labels across the block index
    (``across=0``: position ``j`` of every block together) or within each block (``across=1``)."""
    parts = f.unflatten(dim, (blocks, f.shape[dim] // blocks))
    state.atoms.union_pairs(parts.narrow(dim + across, 0, 1), parts)
    return compact(state.atoms, f)


@rule("pixel_shuffle", "pixel_unshuffle", "channel_shuffle")
def shuffle(state: TraceState, call: Call) -> None:
    """Ops that regroup channels by their position, exact when the cut keeps the grouping:

    - ``pixel_shuffle(x, r)``: output channel ``c`` is input channels ``c*r*r ... c*r*r + r*r - 1``
      spread over ``r x r`` pixels, so those ``r*r`` input channels are one channel;
    - ``pixel_unshuffle(x, r)``: input channel ``c`` becomes output channels ``c*r*r ...`` (a cut of
      ``c`` removes them all, exact as is); a channel axis along the pixels goes in blocks of ``r``;
    - ``channel_shuffle(x, g)``: the channels seen as ``(g, C/g)`` are transposed, so position ``j`` of
      every group is one channel (every group keeps the same positions, and ``C'`` stays a multiple
      of ``g``)."""
    x = call.args[0]
    cd = x.dim() - 3 if call.name.startswith("pixel") else 1
    results = []
    for f in state.fields_of(x):
        if call.name == "pixel_shuffle":
            r = int(call.arg(1, "upscale_factor"))
            if f.shape[cd] > 1:
                f = _tie(state, f, cd, f.shape[cd] // (r * r), 1)
        elif call.name == "pixel_unshuffle":
            r = int(call.arg(1, "downscale_factor"))
            for d in (cd + 1, cd + 2):
                if f.shape[d] > 1:
                    f = _tie(state, f, d, f.shape[d] // r, 1)
        elif f.shape[cd] > 1:
            f = _tie(state, f, cd, int(call.arg(1, "groups")), 0)
        results.append(_apply(call, x, f))
    _set_results(state, call.out, results)


def _reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims whose sizes multiply to the same number."""
    if 0 in src or 0 in dst:
        return []
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    try:
        while i < len(src) and j < len(dst):
            a, b = [i], [j]
            pa, pb = src[i], dst[j]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    a.append(i)
                    pa *= src[i]
                    i += 1
                else:
                    b.append(j)
                    pb *= dst[j]
                    j += 1
            groups.append((a, b))
    except IndexError:
        return []
    return groups


def _shape_args(call: Call) -> list[Any] | None:
    if call.name in ("view_as", "reshape_as"):
        return None
    rest = call.args[1:]
    if call.name == "reshape" and "shape" in call.kwargs:
        rest = (call.kwargs["shape"],)
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        rest = tuple(rest[0])
    return list(rest)


@rule("view", "reshape", "view_as", "reshape_as")
def reshape(state: TraceState, call: Call) -> None:
    x, out = call.args[0], call.out
    if call.name == "view" and len(call.args) == 2 and isinstance(call.args[1], torch.dtype):
        state.set_fields(out, list(state.fields_of(x)))
        return
    sizes = _shape_args(call)
    free = {i for i, s in enumerate(sizes or []) if isinstance(s, int) and s == -1}
    fields = []
    for f in state.fields_of(x):
        g = compact(state.atoms, full(f, x.shape).reshape(out.shape))
        for src_dims, dst_dims in _reshape_groups(list(x.shape), list(out.shape)):
            if len(dst_dims) < 2:
                continue  # a merge (flatten) or an unchanged dim: computed size, free
            vary = [d for d in dst_dims if g.shape[d] > 1]
            if len(vary) < 2:
                continue
            loose = [d for d in vary if d in free] or [max(vary)]
            rigid = [d for d in vary if d not in loose[:1]]
            g = collapse(state.atoms, g, rigid)
        fields.append(g)
    if call.name in ("view_as", "reshape_as"):
        fields = _union_with(state, fields, state.fields_of(call.args[1]))
    # A merge can leave an axis that cannot shrink (a position-bias table's heads) varying along the
    # same dim as a prunable one; the fixed axis needs no tracking and must not pin the other.
    fields = [f for f in fields if not _all_pinned(state, f)]
    own = {r for f in state.fields_of(x) for r in state.atoms.roots(f).reshape(-1).tolist()}
    for k, size in enumerate(sizes or []):
        # a size read from this very tensor is kept by the reshape itself; one read from another axis
        # (the residual width, in C // heads) ties that axis to this dim
        if isinstance(size, SizeInt) and not set(state.atoms.roots(size.atoms).tolist()) <= own:
            fields = [_follow(state, f, k, size) for f in fields]
    state.set_fields(out, [f for f in fields if any(s > 1 for s in f.shape)])


def _all_pinned(state: TraceState, field: Field) -> bool:
    labels = field.reshape(-1)
    labels = labels[labels >= 0]
    return labels.numel() > 0 and bool(state.atoms.is_pinned(labels).all())


def _follow(state: TraceState, field: Field, k: int, size: SizeInt) -> Field:
    """Dim ``k`` was sized from another channel axis (``C // heads``): pair its positions with that
    axis's channels so both shrink together (position ``d`` with channels ``h * n + d``)."""
    n = field.shape[k]
    if n <= 1 or size.num != 1 or any(s > 1 for e, s in enumerate(field.shape) if e != k):
        return field
    if size.atoms.numel() != n * size.den:
        return field
    state.atoms.union_pairs(field.reshape(1, n), size.atoms.view(size.den, n))
    return compact(state.atoms, field)


def _union_with(state: TraceState, a: list[Field], b: list[Field]) -> list[Field]:
    if not b:
        return a
    return [merge(state.atoms, a + b)] if a else list(b)


@rule("flatten", "unflatten", "ravel")
def flatten(state: TraceState, call: Call) -> None:
    x, out = call.args[0], call.out
    fields = []
    for f in state.fields_of(x):
        g = compact(state.atoms, full(f, x.shape).reshape(out.shape))
        if call.name == "unflatten":
            dim = call.arg(1, "dim") % x.dim()
            sizes = list(call.arg(2, "sizes"))
            new = list(range(dim, dim + len(sizes)))
            vary = [d for d in new if g.shape[d] > 1]
            if len(vary) > 1:
                loose = [dim + i for i, s in enumerate(sizes) if s == -1 and dim + i in vary]
                keep = loose[:1] or [max(vary)]
                g = collapse(state.atoms, g, [d for d in vary if d not in keep])
        fields.append(g)
    state.set_fields(out, [f for f in fields if any(s > 1 for s in f.shape)])


def _index_dims(x: torch.Tensor, index: Any) -> tuple[list[int], list[int]] | None:
    """Input dims hit by an integer (rigid) and by a partial slice / tensor index (fixed)."""
    idx = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(
        (i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1)
        for i in idx
        if i is not None and i is not Ellipsis
    )
    ints, fixed = [], []
    d = 0
    for i in idx:
        if i is None:
            continue
        if i is Ellipsis:
            d += x.dim() - consumed
            continue
        if isinstance(i, bool):
            return None
        if isinstance(i, int):
            ints.append(d)
        elif isinstance(i, slice):
            whole = i.start in (None, 0) and i.step in (None, 1)
            if not (whole and (i.stop is None or (isinstance(i.stop, int) and i.stop >= x.shape[d]))):
                fixed.append(d)
        elif isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            fixed.extend(range(d, d + i.dim()))
            d += i.dim()
            continue
        else:
            fixed.append(d)
        d += 1
    return ints, fixed


@rule("__getitem__")
def getitem(state: TraceState, call: Call) -> None:
    x, index = call.args[0], call.args[1]
    hit = _index_dims(x, index)
    if hit is None:
        state.unknown(call)
        return
    ints, fixed = hit
    if any(isinstance(i, torch.Tensor) and i.is_meta for i in (index if isinstance(index, tuple) else (index,))):
        raise NeedsValues(f"{call.name} with a tensor index in {state.module}")
    results = []
    lookup = id(x) in state.tensor_names  # a table indexed by position (e.g. relative position bias)
    for f in state.fields_of(x):
        if any(f.shape[d] > 1 for d in fixed):
            if lookup:
                state.atoms.pin(f, f"rows of a lookup table indexed in {state.module}")
            else:
                state.pin_op(f, call.name, "sliced by a fixed index along a channel dim")
        f = collapse(state.atoms, f, ints)
        results.append(_apply(call, x, f))
    _set_results(state, call.out, results)


@rule("__setitem__")
def setitem(state: TraceState, call: Call) -> None:
    """``dest[rows] = value`` with ``rows`` an int, a slice or a 1-D index along dim 0 (what
    torchvision's ``MultiScaleRoIAlign`` does to gather each level's pooled features): the value's
    other dims are the destination's, so their channels are united (a destination sized by a channel
    size read from a traced tensor carries that axis; one of a size fixed in the code pins the
    value's channels). Rows assigned at fixed positions of a channel dim pin it; any other key is
    not understood."""
    dest, key = call.args[0], call.args[1]
    value = call.args[2] if len(call.args) > 2 else None
    rows = isinstance(key, (int, slice)) and not isinstance(key, bool)
    if isinstance(key, torch.Tensor):
        rows = key.dim() == 1 or (key.dim() == 0 and not key.dtype.is_floating_point)
    if not isinstance(dest, torch.Tensor) or dest.dim() == 0 or not rows:
        state.unknown(call, "in-place assignment into a slice")
        return
    if not (isinstance(key, slice) and key == slice(None)):
        for f in state.fields_of(dest):
            if f.shape[0] > 1:
                state.pin_op(f, call.name, "assigned at fixed positions along a channel dim")
    if not isinstance(value, torch.Tensor) or not state.fields_of(value):
        return  # constants, or a value without channels: the destination keeps its own
    n = dest.dim()
    kept = n - 1 if isinstance(key, int) or (isinstance(key, torch.Tensor) and key.dim() == 0) else n
    if value.dim() > kept:
        state.unknown(call, "in-place assignment of a value with more dims than its slice")
        return
    letters = list(range(n - value.dim(), n))  # the value, right-aligned to dest[key], in dest's dims
    rows_dim = [i for i, d in enumerate(letters) if d == 0]
    fields = [collapse(state.atoms, f, rows_dim) for f in state.fields_of(value)]  # rows: not channels
    shape = tuple(1 if d == 0 else size for d, size in zip(letters, value.shape))
    operands = [(state.fields_of(dest), tuple(dest.shape), list(range(n))), (fields, shape, letters)]
    state.set_fields(dest, contract(state, operands, list(range(n)), call.name))


@rule("narrow")
def narrow(state: TraceState, call: Call) -> None:
    x = call.args[0]
    dim = call.arg(1, "dim") % x.dim()
    length = call.arg(3, "length")
    results = []
    for f in state.fields_of(x):
        if f.shape[dim] > 1 and length != x.shape[dim]:
            state.pin_op(f, call.name, "narrowed to a fixed length along a channel dim")
        results.append(_apply(call, x, f))
    _set_results(state, call.out, results)


@rule("chunk", "split", "tensor_split", "unbind", "split_with_sizes", "hsplit", "vsplit")
def split(state: TraceState, call: Call) -> None:
    x = call.args[0]
    if call.name == "hsplit":  # torch.hsplit splits dim 1 (dim 0 of a 1-d tensor), vsplit dim 0
        dim = 1 if x.dim() > 1 else 0
    elif call.name == "vsplit":
        dim = 0
    else:
        dim = call.arg(1 if call.name == "unbind" else 2, "dim", 0)
    dim = dim % x.dim()
    pieces = len(call.out)
    size = x.shape[dim]
    widths = [o.shape[dim] for o in call.out]
    results = []
    for f in state.fields_of(x):
        if f.shape[dim] > 1:
            if call.name == "unbind":
                f = collapse(state.atoms, f, [dim])
            elif call.name in _AT_INDICES and not _sections(call):
                state.pin_op(f, call.name, "split at positions the code fixes along a channel dim")
            elif call.name in _SIZED:
                classes = _sized_pieces(state, call, widths)
                if classes is None:
                    state.pin_op(f, call.name, "split into pieces whose sizes the code fixes (keep the sizes in "
                                 "module attributes and register a fixer that updates them to prune these channels)")
                else:
                    f = _lockstep(state, f, x.shape, dim, widths, classes)
            elif size % pieces == 0 and all(w == size // pieces for w in widths):
                f = _lockstep(state, f, x.shape, dim, widths, [list(range(pieces))])
            else:
                state.pin_op(f, call.name, "split into unequal pieces along a channel dim")
        results.append(_apply(call, x, f))
    _set_results(state, call.out, results)


_SIZED = ("split", "split_with_sizes")
_AT_INDICES = ("tensor_split", "hsplit", "vsplit")  # a number of equal sections, or split points


def _sections(call: Call) -> bool:
    """Whether a ``tensor_split``/``hsplit``/``vsplit`` asks for a number of sections (not split points)."""
    arg = call.args[1] if len(call.args) > 1 else next(
        (call.kwargs[k] for k in ("sections", "indices_or_sections", "tensor_indices_or_sections") if k in call.kwargs),
        None,
    )
    if isinstance(arg, torch.Tensor):
        return arg.dim() == 0
    return isinstance(arg, int) and not isinstance(arg, bool)


def _lockstep(
    state: TraceState, f: Field, shape: Sequence[int], dim: int, widths: list[int], classes: list[list[int]]
) -> Field:
    """Union the pieces of each class position by position (they keep equal widths)."""
    parts = full(f, shape).split(widths, dim)
    for members in classes:
        for k in members[1:]:
            state.atoms.union_pairs(parts[members[0]], parts[k])
    return compact(state.atoms, f)


def _sized_pieces(state: TraceState, call: Call, widths: list[int]) -> list[list[int]] | None:
    """Pieces of a split with explicit sizes that may shrink, as classes kept in lockstep; None pins them.

    The sizes must come from attributes of the module running the split, and that module must have a
    registered fixer (which keeps them equal to its pruned tensors, as GPT-2's attention fixer does
    for ``split_size``); the check after surgery still catches a fixer that does not. Pieces of one
    size shrink in lockstep (an ``int`` split size, q/k/v of equal widths); pieces of different sizes
    (``split([q_size, kv_size, kv_size])``) shrink independently."""
    module = state.module_objects[-1] if state.module_objects else None
    if module is None or not has_fixer(module):
        return None
    every = [list(range(len(widths)))]
    sizes = call.args[1] if len(call.args) > 1 else next(
        (call.kwargs[k] for k in ("split_size_or_sections", "split_size", "split_sizes") if k in call.kwargs), None
    )
    ints, seqs = _size_attributes(module)
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        return every if int(sizes) in ints and len(set(widths)) == 1 else None
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) for s in sizes):
        return None
    if tuple(int(s) for s in sizes) not in seqs and not all(int(s) in ints for s in sizes):
        return None
    by_width: dict[int, list[int]] = {}
    for k, w in enumerate(widths):
        by_width.setdefault(w, []).append(k)
    return list(by_width.values())


def _size_attributes(module: Any) -> tuple[set[int], set[tuple[int, ...]]]:
    """The module's public ``int`` attributes, and its lists/tuples of ints."""
    ints: set[int] = set()
    seqs: set[tuple[int, ...]] = set()
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int):
            ints.add(int(value))
        elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            seqs.add(tuple(int(v) for v in value))
    return ints, seqs


@rule("cat", "concat", "concatenate", "stack", "hstack", "vstack")
def cat(state: TraceState, call: Call) -> None:
    tensors = [t for t in call.arg(0, "tensors") if t.numel() > 0 or t.dim() == call.out.dim()]
    tensors = [t for t in tensors if t.numel() > 0] or tensors  # empty pieces (a fresh KV cache) add nothing
    out = call.out
    if call.name in ("hstack", "vstack"):
        state.unknown(call)
        return
    dim = call.arg(1, "dim", call.kwargs.get("axis", 0))  # torch.concatenate(..., axis=1), cat(..., axis=)
    if call.name == "stack":
        dim = dim % (tensors[0].dim() + 1)
        tensors_shapes = [tuple(t.unsqueeze(dim).shape) for t in tensors]
        fields_per = [[f.unsqueeze(dim) for f in state.fields_of(t)] for t in tensors]
    else:
        dim = dim % tensors[0].dim()
        tensors_shapes = [tuple(t.shape) for t in tensors]
        fields_per = [list(state.fields_of(t)) for t in tensors]
    items = [(k, f) for k, fs in enumerate(fields_per) for f in fs]
    comp = list(range(len(items)))

    def find(i: int) -> int:
        while comp[i] != i:
            i = comp[i]
        return i

    vary = [{d for d, s in enumerate(f.shape) if s > 1} for _, f in items]
    for i in range(len(items)):
        for j in range(i):
            if vary[i] & vary[j]:
                comp[find(i)] = find(j)
    comps: dict[int, list[int]] = {}
    for i in range(len(items)):
        comps.setdefault(find(i), []).append(i)
    fields = []
    for members in comps.values():
        parts = []
        for k, shape in enumerate(tensors_shapes):
            mine = [items[i][1] for i in members if items[i][0] == k]
            if mine:
                lab = merge(state.atoms, mine) if len(mine) > 1 else mine[0]
                parts.append(full(lab, shape))
            else:
                parts.append(torch.full(shape, NO_ATOM, dtype=torch.long))
        if any(items[i][1].shape[dim] > 1 for i in members):
            fields.append(compact(state.atoms, torch.cat(parts, dim)))
            continue
        # concatenated along another axis (tokens): every part carries the same channels, in lockstep
        heads = [p.narrow(dim, 0, 1) for p in parts]
        for h in heads[1:]:
            state.atoms.union_pairs(heads[0], h)
        fields.append(compact(state.atoms, merge(state.atoms, heads)))
    state.set_fields(out, [f for f in fields if any(s > 1 for s in f.shape)])


@rule("pad")
def pad(state: TraceState, call: Call) -> None:
    x = call.args[0]
    widths = list(call.arg(1, "pad"))
    mode = call.arg(2, "mode", "constant")
    padded = [x.dim() - 1 - i for i in range(len(widths) // 2)]
    results = []
    for f in state.fields_of(x):
        hit = [d for d in padded if f.shape[d] > 1]
        if hit and mode != "constant":
            state.pin_op(f, call.name, "padded (not with a constant) along a channel dim")
        if hit and mode == "constant":
            results.append(torch.nn.functional.pad(full(f, x.shape), widths, value=NO_ATOM))
        else:
            results.append(f)
    _set_results(state, call.out, results)
