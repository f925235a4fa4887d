"""The compressed artifact: shared weights as bit-packed indices + codebooks, int8 weights as int8 +
scales, the rest as it is, in one zstandard-compressed safetensors blob with the plan in its metadata.

``adaprune.save(result, dir, compress=True)`` writes it (``model.safetensors.zst`` beside
``plan.json`` and ``adaprune.json``) and ``adaprune.load`` reads it back into a model whose outputs
equal the compressed model's: shared and int8 weights come back as the same parametrizations
(:class:`~adaprune.share.SharedWeight`, :class:`~adaprune.quantize.weights.Int8Weight`).
:func:`disk_bytes` is the size that blob takes, measured by writing it to memory; ``ap.count``
reports it as ``Cost.disk_bytes``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..plan import Plan
from .codec import CodecError, decode, encode, from_blob, plain_state, to_blob

#: zstandard's level for the artifact: past ~10 the blobs of packed indices barely shrink and
#: compressing slows down many times over
LEVEL = 10


def blob(model: nn.Module, plan: Plan | None = None, level: int = LEVEL) -> tuple[bytes, int]:
    """The compressed blob of ``model`` (and its plan) and its size before compression."""
    return to_blob(encode(model), (plan or Plan()).to_json(), level)


def disk_bytes(model: nn.Module, plan: Plan | None = None, level: int = LEVEL) -> int:
    """Bytes of ``model``'s compressed artifact (``save(..., compress=True)``'s weights file, which
    holds the plan too): what it takes on disk."""
    return len(blob(model, plan, level)[0])


def float_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s plain float safetensors file (what ``save`` without ``compress`` writes for
    the weights): the usual reference for a compression ratio."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="adaprune-size-") as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_plain(model, path)
        return os.path.getsize(path)


def save_plain(model: nn.Module, path: str) -> None:
    """The plain safetensors file of ``model`` (what :func:`adaprune.save` writes without ``compress``):
    a parametrized weight as the value it computes with."""
    from safetensors.torch import save_model

    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        save_model(model, path)
        return
    state = plain_state(model)

    class _Plain(nn.Module):  # what safetensors' save_model reads: the plain state dict, ties kept
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return state

    save_model(_Plain(), path)


__all__ = ["LEVEL", "CodecError", "blob", "decode", "disk_bytes", "encode", "float_bytes", "from_blob", "save_plain",
           "to_blob"]
