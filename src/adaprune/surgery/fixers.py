"""Per-module-kind updates of size attributes after tensors were sliced.

Each fixer reads the module's new tensor shapes and the attributes it had before surgery, and
sets ``in_channels``, ``out_features``, ``num_heads``, ``groups`` ... so the module is an ordinary
module of its class with smaller shapes. Register one for a custom layer with :func:`register_fixer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Fixer = Callable[[Any, dict[str, Any]], None]
_FIXERS: list[tuple[type[nn.Module], Fixer]] = []


def register_fixer(kind: type[nn.Module]) -> Callable[[Fixer], Fixer]:
    """Register ``fn(module, old_attrs)`` for modules of class ``kind`` (and subclasses)."""

    def deco(fn: Fixer) -> Fixer:
        if any(k is kind for k, _ in _FIXERS):
            raise ValueError(f"a fixer for {kind.__name__} is already registered")
        _FIXERS.append((kind, fn))
        return fn

    return deco


def fix_module(module: nn.Module, old: dict[str, Any]) -> bool:
    """Apply the most specific registered fixer; return False when none matches."""
    for kind in type(module).__mro__:
        for k, fn in _FIXERS:
            if k is kind:
                fn(module, old)
                return True
    return False


@register_fixer(nn.Linear)
def _linear(m: Any, old: dict[str, Any]) -> None:
    m.out_features, m.in_features = m.weight.shape


@register_fixer(nn.Bilinear)
def _bilinear(m: Any, old: dict[str, Any]) -> None:
    m.out_features, m.in1_features, m.in2_features = m.weight.shape


def _new_groups(old_groups: int, old_per_group_out: int, new_out: int) -> int:
    return 1 if old_groups == 1 else new_out // old_per_group_out


@register_fixer(nn.modules.conv._ConvNd)
def _conv(m: Any, old: dict[str, Any]) -> None:
    w = m.weight
    g_old = old["groups"]
    if m.transposed:
        in_old = old["in_channels"]
        g = _new_groups(g_old, in_old // g_old, w.shape[0])
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * g
    else:
        out_old = old["out_channels"]
        g = _new_groups(g_old, out_old // g_old, w.shape[0])
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
