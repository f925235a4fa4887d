"""The built-in layer kinds of ``torch.nn``: fixers, weight roles, channel dims, norms, refit and widths."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import CUTS, Refit, Role, register_fixer, register_layer

# -- fixers: size attributes from the sliced tensors ---------------------------------------------------

@register_fixer(nn.Linear)
def _linear(m: Any, old: dict[str, Any]) -> None:
    m.out_features, m.in_features = m.weight.shape


@register_fixer(nn.Bilinear)
def _bilinear(m: Any, old: dict[str, Any]) -> None:
    m.out_features, m.in1_features, m.in2_features = m.weight.shape


def _new_groups(old_groups: int, old_rows: int, new_rows: int, removed: Any) -> int:
    """Groups left after rows (dim 0 of the weight) ``removed``: a group goes when all its rows go.
    Pruned inside its groups, a conv keeps every group (each loses the same rows); pruned by whole
    groups, it loses the groups whose rows all went. Without the positions (a fixer called outside
    surgery), rows are assumed to go by whole groups."""
    if old_groups == 1:
        return 1
    per = old_rows // old_groups
    if removed is None:
        return new_rows // per
    lost = [0] * old_groups
    for r in removed:
        lost[r // per] += 1
    return old_groups - sum(n == per for n in lost)


@register_fixer(nn.modules.conv._ConvNd)
def _conv(m: Any, old: dict[str, Any]) -> None:
    w = m.weight
    removed = old[CUTS].get("weight", {}).get(0, ()) if CUTS in old else None
    if m.transposed:
        g = _new_groups(old["groups"], old["in_channels"], w.shape[0], removed)
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * g
    else:
        g = _new_groups(old["groups"], old["out_channels"], w.shape[0], removed)
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * g
    m.groups = g


@register_fixer(nn.modules.batchnorm._NormBase)
def _norm(m: Any, old: dict[str, Any]) -> None:
    for name in ("weight", "running_mean", "bias", "running_var"):
        t = getattr(m, name, None)
        if t is not None:
            m.num_features = t.shape[0]
            return


@register_fixer(nn.GroupNorm)
def _group_norm(m: Any, old: dict[str, Any]) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@register_fixer(nn.LayerNorm)
def _layer_norm(m: Any, old: dict[str, Any]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@register_fixer(nn.RMSNorm)
def _rms_norm(m: Any, old: dict[str, Any]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@register_fixer(nn.PReLU)
def _prelu(m: Any, old: dict[str, Any]) -> None:
    m.num_parameters = m.weight.numel()


@register_fixer(nn.Embedding)
def _embedding(m: Any, old: dict[str, Any]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@register_fixer(nn.EmbeddingBag)
def _embedding_bag(m: Any, old: dict[str, Any]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@register_fixer(nn.MultiheadAttention)
def _mha(m: Any, old: dict[str, Any]) -> None:
    if m._qkv_same_embed_dim:
        inner = m.in_proj_weight.shape[0] // 3
        m.kdim = m.vdim = inner
    else:
        inner = m.q_proj_weight.shape[0]
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    m.num_heads = inner // old["head_dim"]
    m.embed_dim = inner


@register_fixer(nn.RNNBase)
def _rnn(m: Any, old: dict[str, Any]) -> None:
    """``nn.LSTM``/``nn.GRU``/``nn.RNN``: sizes from the first layer's weights (every layer and direction
    shares them), then the flat weight list rebuilt (and flattened for cuDNN where it applies)."""
    if old.get("proj_size", 0) > 0:
        m.proj_size, m.hidden_size = m.weight_hr_l0.shape
    else:
        m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()


@register_fixer(nn.RNNCellBase)
def _rnn_cell(m: Any, old: dict[str, Any]) -> None:
    m.input_size, m.hidden_size = m.weight_ih.shape[1], m.weight_hh.shape[1]


# -- weight roles: which dim of the weight indexes outputs (producers) and inputs (consumers) -----------


def _linear_role(m: nn.Linear, dim: int) -> Role | None:
    return "out" if dim == 0 else "in"


def _conv_role(m: Any, dim: int) -> Role | None:
    """dims 0 and 1 index outputs and inputs (the other way round when transposed); kernel dims neither."""
    if dim not in (0, 1):
        return None
    return "out" if dim == (1 if m.transposed else 0) else "in"


def _embedding_role(m: nn.Embedding, dim: int) -> Role | None:
    return "out" if dim == 1 else None


register_layer(nn.Linear, role=_linear_role)
register_layer(nn.modules.conv._ConvNd, role=_conv_role)
register_layer(nn.Embedding, role=_embedding_role)


# -- where the channels lie in a layer's output; normalisation layers -----------------------------------


def _conv_channel_dim(m: Any, out: torch.Tensor) -> int:
    return out.dim() - len(m.kernel_size) - 1


def _channel_first(m: Any, out: torch.Tensor) -> int:
    """Dim 1 of a batch ``(N, C, ...)``; dim 0 of an unbatched instance norm's ``(C, L)`` / ``(C, H, W)`` /
    ``(C, D, H, W)`` (BatchNorm1d's ``(N, C)`` and ``(N, C, L)`` are batched: dim 1)."""
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and out.dim() == m._get_no_batch_dim():
        return 0
    return 1 if out.dim() > 1 else 0


register_layer(nn.modules.conv._ConvNd, channel_dim=_conv_channel_dim)
register_layer(nn.modules.batchnorm._NormBase, channel_dim=_channel_first, norm=True)
register_layer(nn.GroupNorm, channel_dim=_channel_first, norm=True)
register_layer(nn.LayerNorm, norm=True)
register_layer(nn.RMSNorm, norm=True)


# -- reconstruction: layers that are linear maps of their (unfolded) inputs -----------------------------


def _linear_rows(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _conv_rows(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The conv's input as rows (one per output position) of its receptive field, flattened."""
    args: list[tuple[int, ...]] = [tuple(layer.kernel_size), tuple(layer.dilation), tuple(layer.stride),
                                   tuple(int(p) for p in layer.padding)]  # padding is explicit (see _conv_why_not)
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
        args = [*((1, a[0]) for a in args[:3]), (0, args[3][0])]
    cols = nn.functional.unfold(x, args[0], dilation=args[1], padding=args[3], stride=args[2])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conv_out_rows(layer: Any, y: torch.Tensor) -> torch.Tensor:
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _conv_why_not(layer: Any) -> str | None:
    if layer.groups != 1:
        return "grouped convolution"
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return "padding mode other than explicit zeros"
    return None


register_layer(nn.Linear, refit=Refit(lambda m: int(m.in_features), _linear_rows, _linear_rows))
_CONV_REFIT = Refit(lambda m: int(m.in_channels), _conv_rows, _conv_out_rows, _conv_why_not)
register_layer(nn.Conv1d, refit=_CONV_REFIT)
register_layer(nn.Conv2d, refit=_CONV_REFIT)


# -- output widths for reports --------------------------------------------------------------------------


def _out_rows_width(m: Any) -> int:
    return int(m.weight.shape[0])


def _transposed_width(m: Any) -> int:
    return int(m.weight.shape[1]) * int(m.groups)


register_layer(nn.Linear, width=_out_rows_width)
register_layer(nn.modules.conv._ConvNd, width=_out_rows_width)
register_layer(nn.modules.conv._ConvTransposeNd, width=_transposed_width)
