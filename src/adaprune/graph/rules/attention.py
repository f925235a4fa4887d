"""Rules for attention: ``nn.MultiheadAttention`` (whole heads) and scaled dot-product attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..fields import along, compact, full, read
from ..registry import Call, rule
from ._contract import contract
from .layers import weight_atoms

if TYPE_CHECKING:
    from ..tracer import TraceState


def _heads(state: TraceState, rows: torch.Tensor, blocks: int, heads: int) -> torch.Tensor:
    """Union the rows of each head across its q/k/v blocks; return one atom per head."""
    grid = rows.view(blocks, heads, -1).permute(1, 0, 2).reshape(heads, -1)
    state.atoms.union_pairs(grid[:, :1], grid)
    return grid[:, 0]


@rule("multi_head_attention_forward")
def multi_head_attention(state: TraceState, call: Call) -> None:
    """Whole heads go together. ``nn.MultiheadAttention`` ties its width to its heads
    (``embed_dim == num_heads * head_dim``), so the model width and the heads shrink together:
    inner dim ``j`` (head ``j // head_dim``) is paired with outer channel ``j``."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    heads = call.arg(4, "num_heads")
    q_in, _ = read(state.atoms, state.fields_of(q), q.shape, -1)
    k_in, _ = read(state.atoms, state.fields_of(k), k.shape, -1)
    v_in, _ = read(state.atoms, state.fields_of(v), v.shape, -1)
    if call.arg(17, "use_separate_proj_weight", False):
        rq, cq = weight_atoms(state, call.arg(18, "q_proj_weight"), (0, 1))
        rk, ck = weight_atoms(state, call.arg(19, "k_proj_weight"), (0, 1))
        rv, cv = weight_atoms(state, call.arg(20, "v_proj_weight"), (0, 1))
        rows = torch.cat([rq, rk, rv])
        for a, c in ((q_in, cq), (k_in, ck), (v_in, cv)):
            state.atoms.union_pairs(a, c)
        outer = cq
    else:
        rows, cols = weight_atoms(state, call.arg(5, "in_proj_weight"), (0, 1))
        for a in (q_in, k_in, v_in):
            state.atoms.union_pairs(a, cols)
        outer = cols
    e = rows.numel() // 3
    for bias in weight_atoms(state, call.arg(6, "in_proj_bias"), (0,)):
        state.atoms.union_pairs(rows, bias)
    for i, name in ((7, "bias_k"), (8, "bias_v")):
        for bias in weight_atoms(state, call.arg(i, name), (2,)):
            state.atoms.union_pairs(rows[(i - 6) * e : (i - 5) * e], bias)
    head = _heads(state, rows, 3, heads)
    state.atoms.union_pairs(outer, rows[:e])
    out_rows, out_cols = weight_atoms(state, call.arg(11, "out_proj_weight"), (0, 1))
    state.atoms.union_pairs(out_cols, rows[2 * e :])
    state.atoms.union_pairs(out_rows, rows[:e])
    for bias in weight_atoms(state, call.arg(12, "out_proj_bias"), (0,)):
        state.atoms.union_pairs(out_rows, bias)
    out, weights = call.out
    state.set_fields(out, [along(out_rows, out.dim(), -1)])
    if isinstance(weights, torch.Tensor) and weights.dim() >= 3 and weights.shape[-3] == heads:
        state.set_fields(weights, [along(head, weights.dim(), -3)])


@rule("scaled_dot_product_attention")
def sdpa(state: TraceState, call: Call) -> None:
    q, k, v = call.args[0], call.args[1], call.args[2]
    mask = call.arg(3, "attn_mask")
    kf, vf = state.fields_of(k), state.fields_of(v)
    kshape, vshape = tuple(k.shape), tuple(v.shape)
    if call.arg(7, "enable_gqa", False) and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        kf = [compact(state.atoms, full(f, kshape).repeat_interleave(rep, dim=-3)) for f in kf]
        vf = [compact(state.atoms, full(f, vshape).repeat_interleave(rep, dim=-3)) for f in vf]
        kshape = kshape[:-3] + (q.shape[-3],) + kshape[-2:]
        vshape = vshape[:-3] + (q.shape[-3],) + vshape[-2:]
    nb = q.dim() - 2
    batch = list(range(4, 4 + nb))
    # letters: 0 = L (queries), 1 = E (qk features), 2 = S (keys), 3 = Ev (value features)
    scores = contract(
        state,
        [(state.fields_of(q), tuple(q.shape), batch + [0, 1]), (kf, kshape, batch[len(batch) - (len(kshape) - 2):] + [2, 1])],
        batch + [0, 2],
        "scaled_dot_product_attention",
    )
    score_shape = tuple(q.shape[:-1]) + (kshape[-2],)
    operands = [(scores, score_shape, batch + [0, 2])]
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        mb = batch + [0, 2]
        operands.append((state.fields_of(mask), tuple(mask.shape), mb[len(mb) - mask.dim():]))
    if len(operands) > 1:
        scores = contract(state, operands, batch + [0, 2], "scaled_dot_product_attention")
    out = contract(
        state,
        [(scores, score_shape, batch + [0, 2]), (vf, vshape, batch[len(batch) - (len(vshape) - 2):] + [2, 3])],
        batch + [0, 3],
        "scaled_dot_product_attention",
    )
    state.set_fields(call.out, out)
