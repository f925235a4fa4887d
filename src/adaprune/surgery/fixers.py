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
_FIXERS: dict[str, Fixer] = {}

CUTS = "adaprune.cuts"
"""Key of ``old`` under which surgery passes the positions it removed from the module's own tensors:
``{attribute: {dim: positions}}`` (a key no attribute can have)."""


def _key(kind: type | str) -> str:
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def register_fixer(kind: type[nn.Module] | str) -> Callable[[Fixer], Fixer]:
    """Register ``fn(module, old_attrs)`` for modules of class ``kind`` (and subclasses).

    ``old_attrs`` is the module's ``__dict__`` from before surgery; under the key :data:`CUTS` it also
    holds the positions removed from the module's own parameters and buffers.

    ``kind`` may be the class or its qualified name (``"transformers.pytorch_utils.Conv1D"``), so a
    fixer for an optional library does not import it.
    """

    def deco(fn: Fixer) -> Fixer:
        key = _key(kind)
        if key in _FIXERS:
            raise ValueError(f"a fixer for {key} is already registered")
        _FIXERS[key] = fn
        return fn

    return deco


def has_fixer(module: nn.Module) -> bool:
    """Whether a fixer is registered for the module's class (or a base class)."""
    return any(_key(kind) in _FIXERS for kind in type(module).__mro__)


def fix_module(module: nn.Module, old: dict[str, Any]) -> bool:
    """Apply the most specific registered fixer; return False when none matches."""
    for kind in type(module).__mro__:
        fn = _FIXERS.get(_key(kind))
        if fn is not None:
            fn(module, old)
            return True
    if type(module).__module__.startswith("transformers."):
        return _hf_attention(module, old)
    return False


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


_Q = ("q_proj", "query", "q", "q_lin")
_K = ("k_proj", "key", "k", "k_lin")


def _hf_attention(m: Any, old: dict[str, Any]) -> bool:
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
