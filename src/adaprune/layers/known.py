"""Built-in layer kinds of other libraries, registered by qualified name (nothing is imported): transformers'
``Conv1D`` and attention modules, torchvision's ``VisionTransformer``, Ultralytics' C2f; and the fallback that keeps a
transformers attention module's head counts equal to its pruned projections."""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import FALLBACK_FIXERS, register_fixer, register_layer


@register_fixer("transformers.pytorch_utils.Conv1D")
def _hf_conv1d(m: Any, old: dict[str, Any]) -> None:
    m.nx, m.nf = m.weight.shape


@register_fixer("transformers.models.gpt2.modeling_gpt2.GPT2Attention")
def _gpt2_attention(m: Any, old: dict[str, Any]) -> None:
    inner = m.q_attn.nf if getattr(m, "is_cross_attention", False) else m.c_attn.nf // 3
    m.split_size = m.embed_dim = inner
    m.num_heads = inner // m.head_dim


@register_fixer("torchvision.models.vision_transformer.VisionTransformer")
def _tv_vit(m: Any, old: dict[str, Any]) -> None:
    m.hidden_dim = m.class_token.shape[-1]


@register_fixer("ultralytics.nn.modules.block.C2f")
def _ultralytics_c2f(m: Any, old: dict[str, Any]) -> None:
    """Ultralytics' C2f (and C3k2, C2fCIB ...) splits ``cv1``'s output into two halves of ``c`` channels:
    ``forward`` by ``chunk``, ``forward_split`` (what the ONNX export switches to) by ``c``."""
    m.c = m.cv1.conv.out_channels // 2


def _hf_conv1d_role(m: Any, dim: int) -> Any:  # weight is (in, out)
    return "out" if dim == 1 else "in"


register_layer("transformers.pytorch_utils.Conv1D", role=_hf_conv1d_role, width=lambda m: int(m.weight.shape[1]))


_Q = ("q_proj", "query", "q", "q_lin")
_K = ("k_proj", "key", "k", "k_lin")


def hf_attention(m: Any, old: dict[str, Any]) -> bool:
    """Keep a transformers attention module's head counts equal to its (pruned) projections."""
    head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    q = next((getattr(m, n) for n in _Q if isinstance(getattr(m, n, None), nn.Linear)), None)
    if not isinstance(head_dim, int) or q is None:
        return False
    heads = q.out_features // head_dim
    for name in ("num_heads", "num_attention_heads", "n_heads"):
        if isinstance(getattr(m, name, None), int):
            setattr(m, name, heads)
    if isinstance(getattr(m, "all_head_size", None), int):
        m.all_head_size = q.out_features
    if isinstance(getattr(m, "inner_dim", None), int):
        m.inner_dim = q.out_features
    k = next((getattr(m, n) for n in _K if isinstance(getattr(m, n, None), nn.Linear)), None)
    if k is not None and isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = k.out_features // head_dim
    return True


def _hf_attention_fallback(m: Any, old: dict[str, Any]) -> bool:
    return type(m).__module__.startswith("transformers.") and hf_attention(m, old)


FALLBACK_FIXERS.append(_hf_attention_fallback)
