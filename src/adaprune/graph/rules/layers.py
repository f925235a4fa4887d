"""Rules for layers with weights (linear, bilinear, conv, norms, embedding, PReLU), matmul and pooling."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from ..atoms import FIXED
from ..fields import Field, along, collapse, read
from ..registry import Call, rule
from ._contract import contract, elementwise

if TYPE_CHECKING:
    from ..tracer import TraceState


def weight_atoms(state: TraceState, t: torch.Tensor | None, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Atoms of ``t`` along each of ``dims`` (``-1`` where ``t`` carries none); other dims are pinned."""
    if not isinstance(t, torch.Tensor):
        return []
    if id(t) in state.tensor_names:  # a parameter or buffer used as such: its own slots
        return [state.slot(t, d) for d in dims]
    fields, out = state.fields_of(t), []
    for d in dims:
        a, fields = read(state.atoms, fields, t.shape, d)
        out.append(a)
    for f in fields:
        state.atoms.pin(f, f"a dim of a weight that cannot be pruned ({state.module})")
    return out


def couple(state: TraceState, atoms: torch.Tensor, t: torch.Tensor | None, dim: int) -> None:
    """Slices of ``t`` along ``dim`` go with ``atoms``. A parameter's slot seen for the first time simply
    takes those atoms (no new atoms, no unions: the common case, and the fast one)."""
    if not isinstance(t, torch.Tensor):
        return
    if id(t) in state.tensor_names:
        key = (state.tensor_names[id(t)], dim % t.dim())
        if key not in state.slots:
            fresh = atoms.clone()
            missing = fresh < 0
            if bool(missing.any()):
                extra = state.atoms.new(int(missing.sum()))
                fresh[missing] = extra
                state.atoms.pin(extra, FIXED)
            state.slots[key] = fresh
            return
    for ta in weight_atoms(state, t, (dim,)):
        state.atoms.union_pairs(atoms, ta)


def _letters_matmul(na: int, nb: int) -> tuple[list[int], list[int], list[int]]:
    # letters: 0 = n, 1 = k, 2 = m, 3.. = batch dims (right-aligned)
    if na == 1 and nb == 1:
        return [1], [1], []
    if na == 1:
        batch = [3 + i for i in range(nb - 2)]
        return [1], batch + [1, 2], batch + [2]
    if nb == 1:
        batch = [3 + i for i in range(na - 2)]
        return batch + [0, 1], [1], batch + [0]
    nbatch = max(na, nb) - 2
    batch = [3 + i for i in range(nbatch)]
    la = batch[nbatch - (na - 2) :] + [0, 1]
    lb = batch[nbatch - (nb - 2) :] + [1, 2]
    return la, lb, batch + [0, 2]


def matmul_fields(state: TraceState, a: torch.Tensor, b: torch.Tensor, op: str) -> list[Field]:
    la, lb, lo = _letters_matmul(a.dim(), b.dim())
    return contract(
        state,
        [(state.fields_of(a), tuple(a.shape), la), (state.fields_of(b), tuple(b.shape), lb)],
        lo,
        op,
    )


@rule("matmul", "mm", "bmm", "mv", "dot", "__matmul__", "__rmatmul__", "inner")
def matmul(state: TraceState, call: Call) -> None:
    a, b = call.args[0], call.args[1]
    if call.name == "__rmatmul__":
        a, b = b, a
    state.set_fields(call.out, matmul_fields(state, a, b, call.name))


@rule("addmm", "baddbmm", "addmv", "addbmm")
def addmm(state: TraceState, call: Call) -> None:
    names = {"addmm": ("mat1", "mat2"), "addmv": ("mat", "vec")}.get(call.name, ("batch1", "batch2"))
    bias, a, b = call.arg(0, "input"), call.arg(1, names[0]), call.arg(2, names[1])
    if call.name == "addbmm":  # the batch dim of batch1 @ batch2 is summed away: contracted like k
        operands = [(state.fields_of(a), tuple(a.shape), [3, 0, 1]), (state.fields_of(b), tuple(b.shape), [3, 1, 2])]
        fields = contract(state, operands, [0, 2], call.name)
    else:
        fields = matmul_fields(state, a, b, call.name)
    tmp = torch.empty(call.out.shape, device="meta")
    state.fields[tmp] = fields
    state.set_fields(call.out, elementwise(state, [tmp, bias], call.out.dim(), call.name))


@rule("einsum")
def einsum(state: TraceState, call: Call) -> None:
    eq = call.args[0].replace(" ", "")
    ops = call.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if "..." in eq or "->" not in eq:
        state.unknown(call, "einsum without an explicit output or with '...'")
        return
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if any(len(set(t)) != len(t) for t in terms):
        state.unknown(call, "einsum with a repeated index")
        return
    code = {c: i for i, c in enumerate(sorted(set(eq) - set(",->")))}
    operands = [
        (state.fields_of(t), tuple(t.shape), [code[c] for c in term]) for t, term in zip(ops, terms)
    ]
    state.set_fields(call.out, contract(state, operands, [code[c] for c in rhs], "einsum"))


@rule("linear")
def linear(state: TraceState, call: Call) -> None:
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    n = x.dim()
    batch = list(range(2, n + 1))
    operands = [
        (state.fields_of(x), tuple(x.shape), batch + [0]),
        (state.fields_of(w), tuple(w.shape), [1, 0]),
    ]
    fields = contract(state, operands, batch + [1], "linear")
    if isinstance(b, torch.Tensor):
        tmp = torch.empty(call.out.shape, device="meta")
        state.fields[tmp] = fields
        fields = elementwise(state, [tmp, b], call.out.dim(), "linear")
    state.set_fields(call.out, fields)


def _spatial(name: str) -> int:
    m = re.search(r"(\d)d", name)
    return int(m.group(1)) if m else 2


@rule("conv1d", "conv2d", "conv3d")
def conv(state: TraceState, call: Call) -> None:
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    k = _spatial(call.name)
    cd = x.dim() - k - 1
    a_in, rest = read(state.atoms, state.fields_of(x), x.shape, cd)
    for f in rest:
        state.pin_op(f, call.name, "a channel axis along positions is mixed by a convolution")
    if groups == 1 and id(w) in state.tensor_names:
        a_out = weight_atoms(state, w, (0,))[0]
        couple(state, a_in, w, 1)
    else:
        a_out, w_in = weight_atoms(state, w, (0, 1))
        if groups == 1:
            state.atoms.union_pairs(a_in, w_in)
        elif state.grouped == "inside" and w_in.numel() > 1:
            _inside_groups(state, a_in, a_out, w_in, groups)
        else:
            _group_couple(state, a_in, a_out, w_in, groups)
    couple(state, a_out, b, 0)
    state.set_fields(call.out, [along(a_out, call.out.dim(), cd)])


def _inside_groups(
    state: TraceState, a_in: torch.Tensor, a_out: torch.Tensor, w_per_group: torch.Tensor, g: int
) -> None:
    """Grouped conv pruned inside its groups (``groups`` kept): input position ``j`` of every group is
    column ``j`` of the weight, which all groups share, so it goes in every group at once; output
    position ``j`` of every group likewise (the same number of outputs per group, and a grouped conv
    reading these outputs needs the same positions in every group)."""
    state.atoms.union_pairs(a_in.view(g, -1), w_per_group.view(1, -1))
    gout = a_out.view(g, -1)
    state.atoms.union_pairs(gout[:1], gout)


def _group_couple(
    state: TraceState, a_in: torch.Tensor, a_out: torch.Tensor, w_per_group: torch.Tensor, g: int
) -> None:
    """Grouped conv: a whole group (its inputs and outputs) is removed together."""
    state.atoms.pin(w_per_group, "the per-group width of a grouped conv is kept")
    gin, gout = a_in.view(g, -1), a_out.view(g, -1)
    state.atoms.union_pairs(gin[:, :1], gin)
    state.atoms.union_pairs(gout[:, :1], gout)
    state.atoms.union_pairs(gin[:, :1], gout[:, :1])


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(state: TraceState, call: Call) -> None:
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    groups = call.arg(6, "groups", 1)
    k = _spatial(call.name)
    cd = x.dim() - k - 1
    a_in, rest = read(state.atoms, state.fields_of(x), x.shape, cd)
    for f in rest:
        state.pin_op(f, call.name, "a channel axis along positions is mixed by a convolution")
    w_in, w_out = weight_atoms(state, w, (0, 1))
    state.atoms.union_pairs(a_in, w_in)
    if groups == 1:
        a_out = w_out
    else:
        state.atoms.pin(w_out, "the per-group width of a grouped transposed conv is kept")
        gin = a_in.view(groups, -1)
        state.atoms.union_pairs(gin[:, :1], gin)
        a_out = gin[:, :1].expand(groups, w_out.numel()).reshape(-1)
    couple(state, a_out, b, 0)
    state.set_fields(call.out, [along(a_out, call.out.dim(), cd)])


def _per_channel(state: TraceState, call: Call, x: torch.Tensor, dim: int, tensors: list) -> torch.Tensor:
    a, rest = read(state.atoms, state.fields_of(x), x.shape, dim)
    for t in tensors:
        couple(state, a, t, 0)
    state.set_fields(call.out, rest + [along(a, call.out.dim(), dim)])
    return a


@rule("batch_norm", "instance_norm")
def batch_norm(state: TraceState, call: Call) -> None:
    x = call.args[0]
    tensors = [call.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    _per_channel(state, call, x, 1 if x.dim() > 1 else 0, tensors)


@rule("group_norm")
def group_norm(state: TraceState, call: Call) -> None:
    x, g = call.args[0], call.arg(1, "num_groups")
    a, rest = read(state.atoms, state.fields_of(x), x.shape, 1)
    grid = a.view(g, -1)
    state.atoms.union_pairs(grid[:1], grid)  # lockstep: every group keeps the same width
    state.atoms.span(a)
    for t in (call.arg(2, "weight"), call.arg(3, "bias")):
        couple(state, a, t, 0)
    state.set_fields(call.out, rest + [along(a, call.out.dim(), 1)])


@rule("layer_norm", "rms_norm")
def layer_norm(state: TraceState, call: Call) -> None:
    x, shape = call.args[0], call.arg(1, "normalized_shape")
    w = call.arg(2, "weight")
    b = call.arg(3, "bias") if call.name == "layer_norm" else None
    nd = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    if nd != 1:
        for f in state.fields_of(x):
            state.pin_op(f, call.name, "normalized over several dims")
        state.set_fields(call.out, [])
        return
    a, rest = read(state.atoms, state.fields_of(x), x.shape, -1)
    state.atoms.span(a)
    if w is None:
        state.pin_op(along(a, 1, 0), call.name, "a norm without affine weights keeps its normalized_shape")
    for t in (w, b):
        couple(state, a, t, 0)
    state.set_fields(call.out, rest + [along(a, call.out.dim(), -1)])


@rule("prelu")
def prelu(state: TraceState, call: Call) -> None:
    x, w = call.args[0], call.args[1]
    if w.numel() == 1:
        state.set_fields(call.out, list(state.fields_of(x)))
        return
    _per_channel(state, call, x, 1 if x.dim() > 1 else 0, [w])


@rule("bilinear")
def bilinear(state: TraceState, call: Call) -> None:
    """``y[..., o] = x1[..., i] W[o, i, j] x2[..., j] + b[o]``: one contraction of three operands."""
    x1, x2 = call.arg(0, "input1"), call.arg(1, "input2")
    w, b = call.arg(2, "weight"), call.arg(3, "bias")
    batch = list(range(3, x1.dim() + 2))  # letters: 0 = o, 1 = i, 2 = j, 3... = the leading dims
    operands = [
        (state.fields_of(x1), tuple(x1.shape), batch + [1]),
        (state.fields_of(x2), tuple(x2.shape), batch + [2]),
        (state.fields_of(w), tuple(w.shape), [0, 1, 2]),
    ]
    fields = contract(state, operands, batch + [0], "bilinear")
    if isinstance(b, torch.Tensor):
        tmp = torch.empty(call.out.shape, device="meta")
        state.fields[tmp] = fields
        fields = elementwise(state, [tmp, b], call.out.dim(), "bilinear")
    state.set_fields(call.out, fields)


def _embedding_columns(state: TraceState, w: torch.Tensor, max_norm: object) -> torch.Tensor:
    rows, cols = weight_atoms(state, w, (0, 1))
    state.atoms.pin(rows, "embedding rows are addressed by token ids")
    if max_norm is not None:  # rows are renormalised over their columns: a cut changes the norms
        state.atoms.span(cols)
    return cols


@rule("embedding")
def embedding(state: TraceState, call: Call) -> None:
    if call.func is torch.embedding:  # torch.embedding(weight, indices, ...): F.embedding's order reversed
        w, ids, max_norm = call.arg(0, "weight"), call.arg(1, "indices"), None
    else:
        ids, w, max_norm = call.arg(0, "input"), call.arg(1, "weight"), call.arg(3, "max_norm")
    cols = _embedding_columns(state, w, max_norm)
    # the result is one row per id: channels along the ids' dims go through
    passed = [f.unsqueeze(-1) for f in state.fields_of(ids)]
    state.set_fields(call.out, passed + [along(cols, call.out.dim(), -1)])


@rule("embedding_bag")
def embedding_bag(state: TraceState, call: Call) -> None:
    """Like ``embedding``, each bag reduced (sum / mean / max) per column: the columns are prunable.
    A 2-d ``input`` of bags passes channels along its bag dim (0) through; channels along the members
    of a bag, in a 1-d ``input`` (bags given by ``offsets``), in ``offsets`` or in ``per_sample_weights``
    are pinned."""
    out = call.out
    if call.func is torch.embedding_bag:  # torch.embedding_bag(weight, indices, offsets, ...) -> (output, ...)
        w, ids, offsets, weights = call.arg(0, "weight"), call.arg(1, "indices"), call.arg(2, "offsets"), call.arg(6, "per_sample_weights")
        max_norm, out = None, out[0]
        for extra in call.out[1:]:
            state.set_fields(extra, [])
    else:
        ids, w, offsets, weights = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "offsets"), call.arg(8, "per_sample_weights")
        max_norm = call.arg(3, "max_norm")
    cols = _embedding_columns(state, w, max_norm)
    passed = []
    for f in state.fields_of(ids):
        if ids.dim() == 2 and f.shape[1] == 1 and offsets is None:
            passed.append(f)
        else:
            state.pin_op(f, call.name, "a channel axis along the members of a bag")
    for f in [*state.fields_of(offsets), *state.fields_of(weights)]:
        state.pin_op(f, call.name, "a channel axis along the offsets or per-sample weights of bags")
    state.set_fields(out, passed + [along(cols, out.dim(), -1)])


_POOL = [
    f"{kind}_pool{k}d{suffix}"
    for kind in ("avg", "max", "lp", "adaptive_avg", "adaptive_max", "fractional_max")
    for k in (1, 2, 3)
    for suffix in ("", "_with_indices")
]


@rule("torchvision.roi_align", "torchvision.roi_pool")
def roi_pool(state: TraceState, call: Call) -> None:
    """torchvision's RoI pooling: ``(N, C, H, W)`` features and boxes in, ``(K, C, h, w)`` out (and
    roi_pool's argmax of the same shape): channels go through, the image and spatial dims do not."""
    x = call.args[0]
    fields = [collapse(state.atoms, f, [0, *range(2, x.dim())]) for f in state.fields_of(x)]
    for f in [f for t in call.args[1:2] for f in state.fields_of(t)]:
        state.pin_op(f, call.name, "boxes of RoI pooling")
    for o in [call.out] if isinstance(call.out, torch.Tensor) else list(call.out):
        state.set_fields(o, [f for f in fields if any(s > 1 for s in f.shape)] if o.dim() == x.dim() else [])


@rule(*_POOL, "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def spatial(state: TraceState, call: Call) -> None:
    x = call.args[0]
    k = x.dim() - 2 if call.name.startswith(("interpolate", "upsample")) else _spatial(call.name)
    dims = list(range(x.dim() - k, x.dim()))
    fields = [collapse(state.atoms, f, dims) for f in state.fields_of(x)]
    outs = [call.out] if isinstance(call.out, torch.Tensor) else list(call.out)
    for o in outs:
        state.set_fields(o, [f for f in fields if any(s > 1 for s in f.shape)])

