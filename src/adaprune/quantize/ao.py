"""Torch-side weight-only quantization through torchao, for running a model int8 in PyTorch itself.

``torchao_quantize(model, bits=8)`` applies torchao's ``Int8WeightOnlyConfig`` with
``torchao.quantization.quantize_`` to the model's ``nn.Linear`` layers (torchao's weight-only
configs quantize linear layers; convolutions stay float), in place: the weights become torchao's
int8 tensor subclass and the matmuls run on its int8 kernels. ``bits=4`` asks for
``Int4WeightOnlyConfig``, which needs a kernel package torchao finds only on some machines (on a CPU
without it torchao raises, and the error says what is missing). Unlike
:func:`~adaprune.quantize.weights.quantize_weights` (simulated int8 that the compressed artifact
stores), this changes what runs: it is what the benchmark times as "int8 on torch".
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._check import as_int, check_module
from ..errors import ConfigError
from ..graph import ignore_names


def _torchao() -> Any:
    try:
        import torchao.quantization as q
    except ImportError as exc:
        raise ConfigError("torchao_quantize needs torchao: pip install 'adaprune[quantize]' (or pip install torchao)") from exc
    return q


def torchao_quantize(model: nn.Module, bits: int = 8, *, ignore: Any = None) -> nn.Module:
    """Quantize ``model``'s ``nn.Linear`` weights with torchao (weight-only, per output channel for
    int8, groups of 128 for int4), in place; returns the model. ``ignore``: modules or names left
    float. Raises :class:`ConfigError` when torchao is missing, ``bits`` is not 8 or 4, the model
    has no Linear layer to quantize, or torchao cannot run the config on this machine."""
    check_module(model)
    bits = as_int(bits, "bits", low=4, high=8, hint="8 (int8) or 4 (int4)")
    if bits not in (4, 8):
        raise ConfigError(f"torchao_quantize: bits={bits}; torchao's weight-only configs are int8 (8) and int4 (4)")
    q = _torchao()
    skipped = ignore_names(model, ignore)
    chosen = {
        name for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name == n or name.startswith(f"{n}.") for n in skipped)
    }
    if not chosen:
        raise ConfigError("torchao_quantize: the model has no nn.Linear layer left to quantize (torchao's "
                          "weight-only configs quantize linear layers)")
    config = q.Int8WeightOnlyConfig() if bits == 8 else q.Int4WeightOnlyConfig(group_size=128)
    try:
        q.quantize_(model, config, filter_fn=lambda mod, fqn: fqn in chosen)
    except (ImportError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise ConfigError(
            f"torchao cannot run int{bits} weight-only quantization here: {type(exc).__name__}: {exc}"
            + ("; int8 (bits=8) runs on every CPU" if bits == 4 else "")
        ) from exc
    return model


__all__ = ["torchao_quantize"]
