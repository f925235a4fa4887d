"""Rules for elementwise ops, reductions and normalisations along a dim."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..fields import along, collapse
from ..registry import SIZED_BY_ARGS, Call, rule
from ..sizes import SizeInt
from ._contract import elementwise

if TYPE_CHECKING:
    from ..tracer import TraceState

_UNARY = ["abs", "absolute", "neg", "negative", "positive", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "square", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sigmoid", "logit", "erf", "erfc", "erfinv", "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "nan_to_num", "relu", "relu6", "gelu", "silu", "mish", "selu", "celu", "elu", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "hardshrink", "softshrink", "tanhshrink", "softplus", "softsign", "threshold", "logsigmoid", "rrelu", "clamp", "clip", "clamp_min", "clamp_max", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "isnan", "isinf", "isfinite", "logical_not", "bitwise_not", "__invert__", "__neg__", "__abs__", "__pos__", "contiguous", "clone", "detach", "to", "type", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda", "requires_grad_", "data.__get__", "type_as", "float_power", "pow", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "zero_", "fill_", "normal_", "uniform_", "nan_to_num_", "silu_"]

_BINARY = ["add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder", "fmod", "atan2", "arctan2", "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt", "ge", "greater", "less", "greater_equal", "less_equal", "not_equal", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "where", "lerp", "addcmul", "addcdiv", "masked_fill", "hypot", "copysign", "xlogy", "rsub", "heaviside", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__iand__", "__ior__"]

_REDUCE = ["sum", "mean", "nansum", "nanmean", "amax", "amin", "prod", "std", "var", "logsumexp", "argmax", "argmin", "all", "any", "count_nonzero", "median", "nanmedian", "mode", "kthvalue", "var_mean", "std_mean", "aminmax", "max", "min", "norm"]

_ALONG_DIM = ["softmax", "log_softmax", "softmin", "normalize", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"]


def _inplace(names: list[str]) -> list[str]:
    out = []
    for n in names:
        out.append(n)
        if not n.startswith("_") and not n.endswith("_") and "." not in n:
            out.append(n + "_")
    return sorted(set(out))


def _first_tensor(call: Call) -> torch.Tensor:
    for a in call.args:
        if isinstance(a, torch.Tensor):
            return a
    for a in call.kwargs.values():
        if isinstance(a, torch.Tensor):
            return a
    raise TypeError(f"{call.name} has no tensor argument")


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return [t for t in getattr(out, "__iter__", lambda: iter(()))() if isinstance(t, torch.Tensor)]


def _binary_operands(call: Call) -> list[torch.Tensor]:
    tensors = [a for a in call.args if isinstance(a, torch.Tensor)]
    tensors += [v for k, v in call.kwargs.items() if isinstance(v, torch.Tensor) and k != "out"]
    return tensors


@rule(*[n for n in _inplace(_UNARY) if n not in _BINARY])
def unary(state: TraceState, call: Call) -> None:
    x = _first_tensor(call)
    fields = state.fields_of(x)
    for out in _outputs(call.out):
        if tuple(out.shape) == tuple(x.shape):
            state.set_fields(out, list(fields))
        else:  # e.g. a broadcasting clamp with tensor bounds: treat as a binary op
            state.set_fields(out, elementwise(state, _binary_operands(call), out.dim(), call.name))


@rule(*_inplace(_BINARY))
def binary(state: TraceState, call: Call) -> None:
    out = call.out if isinstance(call.out, torch.Tensor) else call.args[0]
    state.set_fields(out, elementwise(state, _binary_operands(call), out.dim(), call.name))


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return [d % ndim for d in dim]


@rule(*_REDUCE)
def reduce(state: TraceState, call: Call) -> None:
    x = call.args[0]
    if call.name in ("max", "min") and len(call.args) > 1 and isinstance(call.args[1], torch.Tensor):
        return binary(state, call)
    if call.name in ("norm", "kthvalue"):  # norm(input, p, dim), kthvalue(input, k, dim=-1)
        dim = call.arg(2, "dim", -1 if call.name == "kthvalue" else None)
    else:
        dim = call.arg(1, "dim", -1 if call.name == "mode" else None)
    if isinstance(dim, bool):  # std(input, unbiased) / var(input, unbiased): over every dim
        dim = None
    if x.dim() == 0:
        return
    dims = _dims(dim, x.dim())
    for out in _outputs(call.out):
        keep = out.dim() == x.dim()
        fields = []
        for f in state.fields_of(x):
            if not any(f.shape[d] > 1 for d in dims):
                g = f
            elif all(f.shape[d] == 1 for d in range(f.dim()) if d not in dims):
                state.atoms.span(f)  # varies only along reduced dims: consumed, nothing to couple
                continue
            else:
                state.atoms.span(f)
                g = collapse(state.atoms, f, dims)
            if not keep:
                g = g.reshape([g.shape[d] for d in range(g.dim()) if d not in dims])
            if any(s > 1 for s in g.shape):
                fields.append(g)
        state.set_fields(out, fields)


@rule(*_ALONG_DIM)
def along_dim(state: TraceState, call: Call) -> None:
    x = call.args[0]
    dim = call.arg(2 if call.name == "normalize" else 1, "dim", 1 if call.name == "normalize" else None)
    fields = state.fields_of(x)
    if dim is not None:
        d = dim % x.dim()
        for f in fields:
            if f.shape[d] > 1:
                state.atoms.span(f)
    for out in _outputs(call.out):
        state.set_fields(out, list(fields))


@rule("sort", "argsort", "topk", "msort")
def sort(state: TraceState, call: Call) -> None:
    x = call.args[0]
    default = 0 if call.name == "msort" else -1  # msort sorts dim 0 and takes no dim
    dim = default if call.name == "msort" else call.arg(2 if call.name == "topk" else 1, "dim", default)
    if not isinstance(dim, int) or isinstance(dim, bool):
        dim = default
    d = dim % x.dim()
    if any(f.shape[d] > 1 for f in state.fields_of(x)):
        for f in state.fields_of(x):
            state.pin_op(f, call.name, "channels are reordered by their values")
        return
    for out in _outputs(call.out):
        state.set_fields(out, list(state.fields_of(x)))


@rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "arange", "zeros", "ones", "full", "empty",
      "tensor", "as_tensor", "randn", "rand", "randint", "eye", "linspace", "logspace")
def creation(state: TraceState, call: Call) -> None:
    """A new tensor of sizes given by the code: it carries no channels (its sizes are checked where
    it meets a channel axis), except along a dim sized by a channel size read from a traced tensor
    (``torch.zeros(n, x.shape[1])``), which keeps that axis's channels: the code sizes it anew on
    every run. ``tensor``/``as_tensor``/``new_tensor`` of a tensor hold its values (``as_tensor``
    often returns the very tensor): its channels go through."""
    data = call.arg(1, "data") if call.name == "new_tensor" else call.arg(0, "data")
    size = _size_args(call)
    for out in _outputs(call.out):
        if (call.name in ("tensor", "as_tensor", "new_tensor") and isinstance(data, torch.Tensor)
                and tuple(data.shape) == tuple(out.shape)):
            state.set_fields(out, list(state.fields_of(data)))
        elif len(size) == out.dim():
            state.set_fields(out, [along(s.atoms, out.dim(), d) for d, s in enumerate(size)
                                   if isinstance(s, SizeInt) and s.num == s.den == 1 and s.atoms.numel() == out.shape[d]])
        else:
            state.set_fields(out, [])


def _size_args(call: Call) -> tuple[Any, ...]:
    """The size a factory was called with (``zeros((a, b))``, ``zeros(a, b)``, ``x.new_zeros((a, b))``,
    ``full((a, b), v)``); ``()`` for the factories that take no size."""
    if call.name not in SIZED_BY_ARGS:
        return ()
    args = call.args[1:] if call.name.startswith("new_") else call.args
    size = call.kwargs.get("size", args[0] if args else ())
    if isinstance(size, (tuple, list, torch.Size)):
        return tuple(size)
    if call.name in ("full", "new_full") or call.name.startswith("new_"):
        return ()
    ints = []
    for a in args:  # zeros(a, b, ...)
        if not isinstance(a, int) or isinstance(a, bool):
            break
        ints.append(a)
    return tuple(ints)
