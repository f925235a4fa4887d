"""What a model spends: MACs (torch.utils.flop_counter), parameters and bytes."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .._check import as_float, check_inputs, check_module
from ..errors import TraceError
from .counter import MacCounter

__all__ = ["Cost", "count"]


@dataclass(frozen=True)
class Cost:
    """MACs of one forward pass on the example inputs, parameter count, and bytes of weights.

    Each is a finite number >= 0 (NumPy scalars become ``int``/``float``); anything else raises
    :class:`~adaprune.errors.ArgumentTypeError`, :class:`~adaprune.errors.NonFiniteArgumentError` or
    :class:`~adaprune.errors.ConfigError` naming the field.
    """

    macs: int
    params: int
    bytes: int
    disk_bytes: int | None = field(default=None, compare=False)
    """Bytes of the compressed artifact (``save(..., compress=True)``'s weights file), measured by
    :func:`count` by writing it to memory; ``None`` where not measured."""

    def __post_init__(self) -> None:
        for name in ("macs", "params", "bytes", "disk_bytes"):
            value = getattr(self, name)
            if value is None and name == "disk_bytes":
                continue
            number = as_float(value, name, low=0.0, where="Cost")
            object.__setattr__(self, name, int(value) if isinstance(value, numbers.Integral) else number)

    @property
    def energy_uj(self) -> float:
        """Estimated energy of one inference (µJ), see :mod:`adaprune.cost.energy`."""
        from .energy import energy_uj

        return energy_uj(self.macs, self.bytes)

    def ratio_to(self, other: Cost) -> dict[str, float]:
        """Each field as a fraction of ``other``'s."""
        return {
            k: (getattr(self, k) / getattr(other, k) if getattr(other, k) else 1.0)
            for k in ("macs", "params", "bytes")
        }


def _unique(tensors: Any) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _rows(input_shape: Any) -> int:
    """Rows a recurrent layer multiplies by its weights: time steps x batch (all but the feature dim)."""
    n = 1
    for s in input_shape[:-1]:
        n *= int(s)
    return n


def _matrix_numel(shapes: Any) -> int:
    return sum(int(s[0]) * int(s[1]) for s in shapes if len(s) == 2)


def _mkldnn_rnn_layer_flops(input_shape: Any, w_ih: Any, w_hh: Any, *args: Any, **kwargs: Any) -> int:
    """One layer and direction of oneDNN's fused RNN (nn.LSTM/GRU/RNN on CPU): one ``w_ih`` and one
    ``w_hh`` matmul per row, what the unfused path's ``addmm`` calls count."""
    return 2 * _rows(input_shape) * _matrix_numel([w_ih, w_hh])


def _stacked_rnn_flops(input_shape: Any, weights: Any, *args: Any, **kwargs: Any) -> int:
    """cuDNN's / MIOpen's fused RNN (every layer and direction): each weight matrix (``w_ih``,
    ``w_hh``, an LSTM's ``w_hr``) once per row of the input."""
    return 2 * _rows(input_shape) * _matrix_numel(weights)


# Fused recurrent kernels have no formula in torch's flop counter (it would count an LSTM as 0): the
# matmuls they perform, as the unfused path (and the meta device) count them.
_RNN_FLOPS: dict[Any, Any] = {
    torch.ops.aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flops,
    torch.ops.aten._cudnn_rnn: _stacked_rnn_flops,
    torch.ops.aten.miopen_rnn: _stacked_rnn_flops,
}


def count(model: nn.Module, example_inputs: Any, *, disk: bool = True) -> Cost:
    """Count MACs (one multiply-add = one MAC; flop counter's flops / 2), params and bytes, and
    measure ``disk_bytes``.

    Attention is counted as the matmuls it performs: fused kernels (which the flop counter has no
    formula for) are switched off while counting. Fused recurrent kernels (oneDNN, cuDNN) are
    counted as the weight matmuls they perform.

    Bytes are those of the parameters and buffers, i.e. what the weights take in memory.
    ``disk_bytes`` (with ``disk=True``, unless a tensor is on the meta device) is the size of the
    compressed artifact :func:`adaprune.save` writes with ``compress=True``: shared and int8 weights
    packed, everything zstandard-coded; what the model takes on disk. A pruned model's save holds its
    plan in the same file too (compressed: hundreds of bytes to a few kB), which ``count`` does not
    know; :attr:`adaprune.CompressResult.disk_bytes_after` includes it.
    """
    import dataclasses

    from .._check import as_bool

    check_module(model)
    check_inputs(example_inputs)
    disk = as_bool(disk, "disk", where="count")
    cost = count_with_output(model, example_inputs)[0]
    if disk and not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        from ..artifact import disk_bytes

        cost = dataclasses.replace(cost, disk_bytes=disk_bytes(model))
    return cost


def count_with_output(model: nn.Module, example_inputs: Any) -> tuple[Cost, Any]:
    """:func:`count`, and the model's output from the same (eval-mode, no-grad) forward pass."""
    try:
        return counted_call(model, example_inputs)
    except Warning:
        raise
    except Exception as exc:
        raise TraceError.model_failed(exc) from exc


def counted_call(model: nn.Module, example_inputs: Any) -> tuple[Cost, Any]:
    """The model's cost and output from one eval-mode, no-grad forward pass; what the model raises
    propagates as it is (:func:`count_with_output` names it as a :class:`TraceError`)."""
    from ..calls import call_model

    was_training = {m: m.training for m in model.modules()}
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # Fused attention kernels have no flop formula: count the math they replace instead
        # (scaled dot-product attention's math backend, nn.MultiheadAttention's regular path).
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            counter = MacCounter(_RNN_FLOPS)
            try:
                with counter:
                    output = call_model(model, example_inputs)
                flops = counter.flops
            except Exception as exc:
                if not (counter.met_higher_order_op or type(exc).__module__.startswith("torch._dynamo")):
                    raise
                # a higher-order op (torch.cond compiles its branches): torch's own counter handles those
                with FlopCounterMode(display=False, custom_mapping=_RNN_FLOPS) as torch_counter:
                    output = call_model(model, example_inputs)
                flops = torch_counter.get_total_flops()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, flag in was_training.items():
            m.training = flag
    params = _unique(model.parameters())
    buffers = _unique(model.buffers())
    return Cost(
        macs=int(flops) // 2,
        params=sum(p.numel() for p in params),
        bytes=sum(t.numel() * t.element_size() for t in params + buffers),
    ), output
