"""One small traced example per graph rule name (``adaprune.graph.registry.RULES``), for test_rule_matrix.

Every example is an :class:`OpNet`: a stem (``Linear`` / ``Conv{1,2,3}d`` / ``Embedding`` / ``EmbeddingBag``) produces
prunable channels, squashed into (0.25, 0.75) so every op's domain holds (log, acos, logit ...); the op
under test runs on them (binary ops on two stems, so the op couples them); a ``Linear`` head reads the
flattened result. Families (unary, binary, reductions, pools ...) are generated from tables; the rest is
written out. Three kinds of names need more than a plain call:

- names no torch callable dispatches under (an in-place variant torch lacks, ``fractional_max_pool1d``,
  dunders that dispatch as their alias, e.g. ``Tensor.__add__`` as ``add``): the example calls a
  *stand-in* function of that name that goes through ``handle_torch_function``, so the tracer sees a
  call of exactly that name (``DEAD`` lists them; test_rule_matrix checks that they are unreachable);
- ``cuda``: the forward calls ``Tensor.cuda``, and an outer ``TorchFunctionMode`` answers it on the CPU
  (the tracer's mode still records the real ``Tensor.cuda`` call);
- rules that freeze by design (``hstack``/``vstack``, ``unfold`` as ``F.unfold``) are
  expected to warn with ``UnsupportedOpWarning`` and to leave the model unpruned.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function

from adaprune.graph.registry import op_name

B, IN, C, T, L, OUT, VOCAB = 2, 6, 8, 4, 6, 3, 7
"""batch, stem input width, channels (prunable), sequence length, spatial size, head width, vocabulary."""

Op = Callable[..., Any]  # op(module, h, k) -> tensor; k is the second stem's output (binary ops) or None


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


def _stem(kind: str) -> nn.Module:
    if kind in ("lin", "seq"):
        return nn.Linear(IN, C)
    if kind.startswith("conv"):
        return getattr(nn, f"Conv{kind[-1]}d")(3, C, 3, padding=1)
    if kind == "emb":
        return nn.Embedding(VOCAB, C)
    if kind == "bag":
        return nn.EmbeddingBag(VOCAB, C)
    raise ValueError(kind)


def example_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "lin":
        return torch.randn(B, IN, generator=g)
    if kind == "seq":
        return torch.randn(B, T, IN, generator=g)
    if kind in ("emb", "bag"):
        return torch.randint(0, VOCAB, (B, T), generator=g)
    nd = int(kind[-1])
    return torch.randn(B, 3, *([L if nd < 3 else 4] * nd), generator=g)


class OpNet(nn.Module):
    """``x -> stem -> squash -> op (-> with a second stem for binary ops) -> flatten -> head``."""

    def __init__(
        self,
        op: Op,
        stem: str = "lin",
        second: bool = False,
        params: dict[str, tuple[int, ...]] | None = None,
        modules: dict[str, Callable[[], nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        self.op = op
        self.stem = _stem(stem)
        self.stem2 = _stem(stem) if second else None
        for name, shape in (params or {}).items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * 0.5))
        for name, make in (modules or {}).items():
            self.add_module(name, make())
        self.eval()
        with torch.no_grad():
            y = self.body(example_input(stem))
        self.head = nn.Linear(y.shape[1], OUT)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.stem(x)) * 0.5 + 0.25
        k = torch.sigmoid(self.stem2(x)) * 0.5 + 0.25 if self.stem2 is not None else None
        y = self.op(self, h, k)
        y = y.reshape(1, -1) if y.dim() < 2 else y.flatten(1)
        return y.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------------------------------
# catalogue entries
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """How to exercise one rule name.

    ``prunes``: a prune at ratio 0.5 removes channels (False where the op pins them by design; the
    comment at the entry says why). ``exact``: removing and masking the pruned channels must give the
    same outputs (no norm or reduction spans them, nothing random runs). ``warns``: the rule freezes
    by design (``UnsupportedOpWarning``). ``synthetic``: no torch callable dispatches under this name;
    a stand-in of that name is called. ``context``: entered around everything that runs the model.
    ``xfail``: a known bug in src, with the reason.
    """

    name: str
    op: Op
    stem: str = "lin"
    second: bool = False
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    modules: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)
    prunes: bool = True
    exact: bool = True
    warns: bool = False
    synthetic: bool = False
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    xfail: str | None = None

    def build(self) -> tuple[OpNet, torch.Tensor]:
        torch.manual_seed(0)
        with self.context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = OpNet(self.op, self.stem, self.second, self.params, self.modules)
        return model, example_input(self.stem)


CATALOGUE: dict[str, Example] = {}


def add(name: str, op: Op, **kw: Any) -> None:
    if name in CATALOGUE:
        raise ValueError(f"two examples for {name!r}")
    CATALOGUE[name] = Example(name, op, **kw)


def _find(name: str, *where: Any) -> Callable[..., Any]:
    """The first of ``torch.<name>``, ``Tensor.<name>``, ``F.<name>``, ``torch._C._nn.<name>`` (in the
    order given) whose normalised name is ``name``."""
    for ns in where or (torch, torch.Tensor, F, torch._C._nn):
        fn = getattr(ns, name, None)
        if fn is not None and op_name(fn) == name:
            return fn
    raise LookupError(f"no torch callable for {name!r}")


# -- stand-ins for names no torch callable dispatches under ------------------------------------------

DEAD: set[str] = set()


def stand_in(name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    """A function named ``name`` that goes through ``handle_torch_function`` (so a tracing mode sees a
    call of ``name``) and then runs ``impl``."""

    def fn(*args: Any, **kwargs: Any) -> Any:
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        if has_torch_function(tensors):
            return handle_torch_function(fn, tensors, *args, **kwargs)
        return impl(*args, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    return fn


def add_dead(name: str, op: Op, **kw: Any) -> None:
    DEAD.add(name)
    add(name, op, synthetic=True, **kw)


# -- cuda on a machine without a GPU -------------------------------------------------------------------


class CudaOnCpu(TorchFunctionMode):
    """Answers ``Tensor.cuda`` with the tensor itself (as on a tensor already on the GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if op_name(func) == "cuda":
            return args[0]
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------------
# elementwise: unary (and in-place variants)
# --------------------------------------------------------------------------------------------------

_UNARY_ARGS: dict[str, tuple[Any, ...]] = {
    "clamp": (0.3, 0.6), "clip": (0.3, 0.6), "clamp_min": (0.3,), "clamp_max": (0.6,), "threshold": (0.5, 0.0),
    "pow": (2,), "float_power": (2,), "type": (torch.float64,), "to": (torch.float64,), "fill_": (0.5,),
    "full_like": (0.5,), "dropout": (0.5, False), "alpha_dropout": (0.5, False), "feature_alpha_dropout": (0.5, False),
}
_UNARY_KWARGS: dict[str, dict[str, Any]] = {
    "dropout1d": {"training": False}, "dropout2d": {"training": False}, "dropout3d": {"training": False},
}
_UNARY_STEM = {"dropout1d": "conv1", "dropout2d": "conv2", "dropout3d": "conv3", "dropout1d_": "conv1"}
_UNARY_PRE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "acosh": lambda h: h + 1,
    "bitwise_not": lambda h: h > 0.5,
    "__invert__": lambda h: h > 0.5,
    "float_power_": lambda h: h.double(),
    "requires_grad_": lambda h: h.detach(),
}
_RANDOM = {"normal_", "uniform_", "rand_like", "randn_like", "rrelu", "rrelu_"}
# the functional form of an activation (what nn modules call), else the tensor method
_F_FIRST = {
    "relu", "relu6", "gelu", "silu", "mish", "selu", "celu", "elu", "leaky_relu", "hardtanh", "hardswish",
    "hardsigmoid", "hardshrink", "softshrink", "tanhshrink", "softplus", "softsign", "threshold", "logsigmoid",
    "rrelu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
}


def _unary_op(name: str) -> Op:
    base = name[:-1] if name.endswith("_") and name[:-1] in _unary_names() else name
    args = _UNARY_ARGS.get(base, ())
    kwargs = _UNARY_KWARGS.get(name, {})
    pre = _UNARY_PRE.get(name, _UNARY_PRE.get(base, lambda h: h))
    if name in ("dropout_", "alpha_dropout_", "feature_alpha_dropout_"):
        fn = _find(name, torch)
    elif name in _F_FIRST:
        fn = _find(name, F, torch, torch.Tensor)
    else:
        fn = _find(name, torch.Tensor, torch, F, torch._C._nn)
    if name == "type_as":
        return lambda m, h, k: fn(h, torch.ones(1, dtype=torch.float64))
    if name == "empty_like":  # uninitialised values: zero them (zero_ keeps the channels too)
        return lambda m, h, k: fn(h).zero_()
    return lambda m, h, k: fn(pre(h), *args, **kwargs)


def _unary_names() -> list[str]:
    from adaprune.graph.rules.elementwise import _BINARY, _UNARY, _inplace

    return [n for n in _inplace(_UNARY) if n not in _BINARY]


def _fill_unary() -> None:
    for name in _unary_names():
        if name in ("cuda", "data.__get__"):
            continue
        try:
            op = _unary_op(name)
        except LookupError:
            continue  # a dead name: filled in below
        add(name, op, stem=_UNARY_STEM.get(name, "lin"), exact=name not in _RANDOM)
    add("data.__get__", lambda m, h, k: h.data)
    add("cuda", lambda m, h, k: h.cuda(), context=CudaOnCpu)


# --------------------------------------------------------------------------------------------------
# elementwise: binary, comparisons, logical, dunders
# --------------------------------------------------------------------------------------------------

_BOOL = {"bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__", "__iand__", "__ior__",
         "__rand__", "__ror__", "__rxor__"}
_THREE = {"lerp": 0.5, "addcmul": None, "addcdiv": None}
# reflected dunders: called on the tensor with a Python number on the left
_REFLECTED = {"__rsub__": 2.0, "__rtruediv__": 2.0, "__rfloordiv__": 2.0, "__rmod__": 2.0, "__rpow__": 2.0}
# dunders that exist on Tensor but dispatch under their alias (``Tensor.__add__`` is recorded as ``add``)
ALIASED = {"__abs__", "__neg__", "__pos__", "__add__", "__radd__", "__iadd__", "__sub__", "__isub__", "__mul__",
           "__rmul__", "__imul__", "__div__", "__truediv__", "__itruediv__", "__mod__", "__ge__", "__gt__", "__le__",
           "__lt__", "__ne__", "__rand__", "__ror__", "__rxor__", "__matmul__",
           "upsample", "upsample_nearest", "upsample_bilinear"}  # F.upsample* call F.interpolate


def _binary_op(name: str) -> tuple[Op, bool]:
    """The op and whether it reads the second stem."""
    if name in ALIASED:
        raise LookupError(f"Tensor.{name} dispatches under another name")
    base = name[:-1] if name.endswith("_") and not name.startswith("__") else name
    fn = _find(name, torch.Tensor, torch) if name.endswith("_") or name.startswith("__") else _find(name, torch, torch.Tensor)
    cast = (lambda t: t > 0.5) if base in _BOOL else (lambda t: t)
    if name in _REFLECTED:
        scalar = _REFLECTED[name]
        return (lambda m, h, k: fn(cast(h), scalar)), False
    if base == "where":
        return (lambda m, h, k: fn(h > k, h, k)), True
    if base == "masked_fill":
        return (lambda m, h, k: fn(h, k > 0.5, 0.0)), True
    if base in _THREE:
        w = _THREE[base]
        return ((lambda m, h, k: fn(h, k, w)) if w is not None else (lambda m, h, k: fn(h, k, k))), True
    return (lambda m, h, k: fn(cast(h), cast(k))), True


def _fill_binary() -> None:
    from adaprune.graph.rules.elementwise import _BINARY, _inplace

    for name in _inplace(_BINARY):
        try:
            op, second = _binary_op(name)
        except LookupError:
            continue
        add(name, op, second=second)


# --------------------------------------------------------------------------------------------------
# reductions, softmax-like ops, sorting, tensor creation
# --------------------------------------------------------------------------------------------------


def _values(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


_REDUCE: dict[str, Op] = {
    # over the sequence dim of a (B, T, C) activation: the channels go through
    "sum": lambda m, h, k: h.sum(1),
    "mean": lambda m, h, k: torch.mean(h, dim=1),
    "nansum": lambda m, h, k: torch.nansum(h, 1),
    "nanmean": lambda m, h, k: torch.nanmean(h, 1),
    "amax": lambda m, h, k: torch.amax(h, 1),
    "amin": lambda m, h, k: torch.amin(h, 1),
    "prod": lambda m, h, k: torch.prod(h, 1),
    "std": lambda m, h, k: torch.std(h, 1),
    "var": lambda m, h, k: h.var(dim=1),
    "logsumexp": lambda m, h, k: torch.logsumexp(h, 1),
    "argmax": lambda m, h, k: torch.argmax(h, 1),
    "argmin": lambda m, h, k: torch.argmin(h, dim=1),
    "all": lambda m, h, k: torch.all(h > 0.5, 1),
    "any": lambda m, h, k: torch.any(h > 0.5, dim=1),
    "count_nonzero": lambda m, h, k: torch.count_nonzero(h > 0.5, 1),
    "median": lambda m, h, k: torch.median(h, 1).values,
    "nanmedian": lambda m, h, k: torch.nanmedian(h, dim=1).values,
    "mode": lambda m, h, k: torch.mode(h, 1).values,
    "kthvalue": lambda m, h, k: torch.kthvalue(h, 2, 1).values,  # k positional, then dim
    "var_mean": lambda m, h, k: sum(torch.var_mean(h, 1)),
    "std_mean": lambda m, h, k: sum(torch.std_mean(h, dim=1)),
    "aminmax": lambda m, h, k: sum(torch.aminmax(h, dim=1)),
    "max": lambda m, h, k: torch.max(h, 1).values,
    "min": lambda m, h, k: h.min(dim=1).values,
    "norm": lambda m, h, k: torch.norm(h, dim=1),
}

_ALONG: dict[str, Op] = {
    # along the channels (they are mixed: the channels are spanned, still prunable)
    "softmax": lambda m, h, k: F.softmax(h, dim=-1),
    "log_softmax": lambda m, h, k: F.log_softmax(h, -1),
    "softmin": lambda m, h, k: F.softmin(h, dim=-1),
    "normalize": lambda m, h, k: F.normalize(h, dim=-1),
    "logcumsumexp": lambda m, h, k: torch.logcumsumexp(h, -1),
    # along the sequence
    "cumsum": lambda m, h, k: torch.cumsum(h, 1),
    "cumprod": lambda m, h, k: h.cumprod(dim=1),
    "cummax": lambda m, h, k: torch.cummax(h, 1).values,
    "cummin": lambda m, h, k: torch.cummin(h, dim=1).values,
}
_SPANNING = {"softmax", "log_softmax", "softmin", "normalize", "logcumsumexp"}

_SORT: dict[str, Op] = {  # along the sequence (batch for msort): the channels go through
    "sort": lambda m, h, k: torch.sort(h, dim=1).values,
    "argsort": lambda m, h, k: torch.argsort(h, 1),
    "topk": lambda m, h, k: torch.topk(h, 2, dim=1).values,
    "msort": lambda m, h, k: torch.msort(h),
}


def _row(h: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor carrying the channels (the first sample)."""
    return torch.empty_like(h[0])


# Creation ops carry no channels. They are recorded only when a tracked tensor is an argument: a
# ``new_*`` call on an activation, ``torch.tensor``/``as_tensor`` of one, or a buffer passed as ``out=``.
# The result is combined with the activation only through a broadcasting size-1 dim or a scalar, so the
# channels stay prunable (at full width a channel-less tensor pins them: the code fixes its size).
_CREATE: dict[str, Op] = {
    "new_zeros": lambda m, h, k: h + h.new_zeros(h.shape[0], 1),
    "new_ones": lambda m, h, k: h * h.new_ones(h.shape[0], 1),
    "new_full": lambda m, h, k: h + h.new_full((h.shape[0], 1), 0.5),
    "new_empty": lambda m, h, k: h + h.new_empty(h.shape[0], 1).zero_(),
    "new_tensor": lambda m, h, k: h + h.new_tensor([0.5]),
    "tensor": lambda m, h, k: h + _quiet(torch.tensor, h).mean(),  # (the mean mixes the channels: not exact)
    "as_tensor": lambda m, h, k: h + torch.as_tensor(h).mean(),
    "zeros": lambda m, h, k: h + torch.zeros(h.shape, out=torch.empty_like(h)).mean(),
    "ones": lambda m, h, k: h + torch.ones(h.shape, out=torch.empty_like(h)).mean(),
    "full": lambda m, h, k: h + torch.full(h.shape, 0.5, out=torch.empty_like(h)).mean(),
    "empty": lambda m, h, k: h + torch.empty(h.shape, out=torch.empty_like(h)).zero_().mean(),
    "randn": lambda m, h, k: h + torch.randn(h.shape, out=torch.empty_like(h)).mean(),
    "rand": lambda m, h, k: h + torch.rand(h.shape, out=torch.empty_like(h)).mean(),
    "randint": lambda m, h, k: h + torch.randint(0, 3, h.shape, out=torch.empty_like(h)).mean(),
    # (their values depend on the width: the first element does not)
    "eye": lambda m, h, k: h + torch.eye(h.shape[0], h.shape[1], out=torch.empty_like(h))[0, 0],
    "arange": lambda m, h, k: h + torch.arange(h.shape[1], out=_row(h))[1],
    "linspace": lambda m, h, k: h + torch.linspace(0, 1, h.shape[1], out=_row(h))[0],
    "logspace": lambda m, h, k: h + torch.logspace(0, 1, h.shape[1], out=_row(h))[0],
}
_CREATE_INEXACT = {"randn", "rand", "randint", "tensor"}


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.tensor(tensor) recommends clone().detach()
        return fn(*args)


def _fill_dims() -> None:
    for name, op in _REDUCE.items():
        add(name, op, stem="seq")
    for name, op in _ALONG.items():
        add(name, op, stem="seq", exact=name not in _SPANNING)
    for name, op in _SORT.items():
        add(name, op, stem="seq")
    for name, op in _CREATE.items():
        add(name, op, exact=name not in _CREATE_INEXACT)


# --------------------------------------------------------------------------------------------------
# layers: matmul, linear, conv, norms, embedding, PReLU, pooling
# --------------------------------------------------------------------------------------------------

D = 5  # output width of functional weights


def _fill_layers() -> None:
    w = {"w": (C, D)}
    add("matmul", lambda m, h, k: torch.matmul(h, m.w), params=w)
    matmul_ = stand_in("__matmul__", torch.matmul)  # `h @ w` dispatches as matmul
    add_dead("__matmul__", lambda m, h, k: matmul_(h, m.w), params=w)
    add("__rmatmul__", lambda m, h, k: torch.Tensor.__rmatmul__(m.w, h), params=w)  # `h @ w` for a non-tensor h
    add("mm", lambda m, h, k: torch.mm(h, m.w), params=w)  # (torch.mm == torch.spmm: op_name tells them apart)
    add("bmm", lambda m, h, k: torch.bmm(h, m.w.expand(h.shape[0], -1, -1)), stem="seq", params=w)
    add("mv", lambda m, h, k: torch.mv(m.w.t(), h[0]), params=w)
    add("dot", lambda m, h, k: torch.dot(h[0], m.v), params={"v": (C,)})
    add("inner", lambda m, h, k: torch.inner(h, m.v), params={"v": (C,)})
    add("addmm", lambda m, h, k: torch.addmm(m.b, h, m.w), params={**w, "b": (D,)})
    add("baddbmm", lambda m, h, k: torch.baddbmm(m.b, h, m.w.expand(h.shape[0], -1, -1)), stem="seq",
        params={**w, "b": (D,)})
    add("addmv", lambda m, h, k: torch.addmv(m.b, m.w.t(), h[0]), params={**w, "b": (D,)})
    add("addbmm", lambda m, h, k: torch.addbmm(m.b, h, m.w.expand(h.shape[0], -1, -1)), stem="seq",
        params={**w, "b": (D,)})
    add("einsum", lambda m, h, k: torch.einsum("btc,cd->btd", h, m.w), stem="seq", params=w)
    add("linear", lambda m, h, k: F.linear(h, m.w.t().contiguous(), m.b), params={**w, "b": (D,)})
    for nd in (1, 2, 3):
        add(f"conv{nd}d", lambda m, h, k: m.conv(h), stem=f"conv{nd}",
            modules={"conv": lambda nd=nd: getattr(nn, f"Conv{nd}d")(C, D, 3, padding=1)})
        add(f"conv_transpose{nd}d", lambda m, h, k: m.conv(h), stem=f"conv{nd}",
            modules={"conv": lambda nd=nd: getattr(nn, f"ConvTranspose{nd}d")(C, D, 2, stride=2)})
    add("batch_norm", lambda m, h, k: m.norm(h), modules={"norm": lambda: nn.BatchNorm1d(C)})
    add("instance_norm", lambda m, h, k: m.norm(h), stem="conv1",
        modules={"norm": lambda: nn.InstanceNorm1d(C, affine=True)}, exact=False)
    add("group_norm", lambda m, h, k: m.norm(h), stem="conv2", modules={"norm": lambda: nn.GroupNorm(2, C)},
        exact=False)
    add("layer_norm", lambda m, h, k: m.norm(h), stem="seq", modules={"norm": lambda: nn.LayerNorm(C)},
        exact=False)
    add("rms_norm", lambda m, h, k: m.norm(h), stem="seq", modules={"norm": lambda: nn.RMSNorm(C)}, exact=False)
    add("prelu", lambda m, h, k: m.act(h), stem="conv1", modules={"act": lambda: nn.PReLU(C)})
    add("embedding", lambda m, h, k: h, stem="emb")
    add("embedding_bag", lambda m, h, k: h, stem="bag")  # bags of T ids, averaged per column
    add("bilinear", lambda m, h, k: m.bil(h, k), second=True, modules={"bil": lambda: nn.Bilinear(C, C, D)})


_POOL_ARGS: dict[str, tuple[Any, ...]] = {
    "avg": (2,), "max": (2,), "lp": (2, 2), "adaptive_avg": (2,), "adaptive_max": (2,), "fractional_max": (2,),
}


def _fill_pools() -> None:
    from adaprune.graph.rules.layers import _POOL

    for name in _POOL:
        kind, rest = name.split("_pool")
        nd = int(rest[0])
        args = _POOL_ARGS[kind]
        kwargs = {"output_size": 2} if kind == "fractional_max" else {}
        exact = kind != "fractional_max"
        try:
            fn = _find(name, F)
        except LookupError:  # no such function: a stand-in with the pool of the same kind
            real = getattr(F, f"{kind}_pool{nd}d", None) or (lambda x, *a, **kw: F.max_pool1d(x, 2))
            fn = stand_in(name, real)
            DEAD.add(name)
            add(name, lambda m, h, k, fn=fn, args=args, kwargs=kwargs: _values(fn(h, *args, **kwargs)),
                stem=f"conv{nd}", synthetic=True, exact=exact)
            continue
        add(name, lambda m, h, k, fn=fn, args=args, kwargs=kwargs: _values(fn(h, *args, **kwargs)),
            stem=f"conv{nd}", exact=exact)
    add("interpolate", lambda m, h, k: F.interpolate(h, scale_factor=2), stem="conv1")
    # F.upsample* dispatch as interpolate (they call it), so these names are reached by stand-ins
    for name, real in (("upsample", F.interpolate), ("upsample_nearest", F.interpolate),
                       ("upsample_bilinear", lambda x, **kw: F.interpolate(x, mode="bilinear", **kw))):
        fn = stand_in(name, real)
        add_dead(name, lambda m, h, k, fn=fn: fn(h, scale_factor=2), stem="conv2")


# --------------------------------------------------------------------------------------------------
# attention and recurrent layers
# --------------------------------------------------------------------------------------------------

HEADS = 2


def _sdpa(m: Any, h: torch.Tensor, k: Any) -> torch.Tensor:
    b, t = h.shape[:2]
    q, key, v = m.qkv(h).view(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, key, v)
    return m.proj(y.transpose(1, 2).reshape(b, t, -1))


def _packed(m: Any, h: torch.Tensor, k: Any) -> torch.Tensor:
    packed = nn.utils.rnn.pack_padded_sequence(h, [h.shape[1], h.shape[1] - 1], batch_first=True)
    out, _ = m.rnn(packed)
    return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])[0]


def _fill_sequence() -> None:
    add("multi_head_attention_forward", lambda m, h, k: m.mha(h, h, h, need_weights=False)[0], stem="seq",
        modules={"mha": lambda: nn.MultiheadAttention(C, HEADS, batch_first=True)})
    add("scaled_dot_product_attention", _sdpa, stem="seq",
        modules={"qkv": lambda: nn.Linear(C, 3 * C), "proj": lambda: nn.Linear(C, C)})
    for name, make in (("lstm", lambda: nn.LSTM(C, 6, batch_first=True)), ("gru", lambda: nn.GRU(C, 6, batch_first=True)),
                       ("rnn_tanh", lambda: nn.RNN(C, 6, batch_first=True)),
                       ("rnn_relu", lambda: nn.RNN(C, 6, nonlinearity="relu", batch_first=True))):
        add(name, lambda m, h, k: m.rnn(h)[0], stem="seq", modules={"rnn": make})
    for name, make in (("lstm_cell", lambda: nn.LSTMCell(C, 6)), ("gru_cell", lambda: nn.GRUCell(C, 6)),
                       ("rnn_tanh_cell", lambda: nn.RNNCell(C, 6)),
                       ("rnn_relu_cell", lambda: nn.RNNCell(C, 6, nonlinearity="relu"))):
        add(name, lambda m, h, k: _values(m.cell(h)), modules={"cell": make})
    add("_pack_padded_sequence", _packed, stem="seq", modules={"rnn": lambda: nn.LSTM(C, 6, batch_first=True)})
    add("_pad_packed_sequence", _packed, stem="seq", modules={"rnn": lambda: nn.GRU(C, 6, batch_first=True)})
    add("index_select", lambda m, h, k: h.index_select(0, torch.tensor([1, 0])))


# --------------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------------

_MOVE: dict[str, tuple[Op, str]] = {
    "permute": (lambda m, h, k: h.permute(0, 2, 1), "seq"),
    "transpose": (lambda m, h, k: torch.transpose(h, 1, 2), "seq"),
    "swapaxes": (lambda m, h, k: h.swapaxes(1, 2), "seq"),
    "swapdims": (lambda m, h, k: torch.swapdims(h, 1, 2), "seq"),
    "t": (lambda m, h, k: m.lin(torch.t(h)).t(), "lin"),  # (C, B) -> Linear over the batch -> back
    "T.__get__": (lambda m, h, k: m.lin(h.T).T, "lin"),
    "mT.__get__": (lambda m, h, k: h.mT, "seq"),
    "movedim": (lambda m, h, k: torch.movedim(h, 2, 1), "seq"),
    "moveaxis": (lambda m, h, k: h.moveaxis(-1, 1), "seq"),
    "squeeze": (lambda m, h, k: h[:, :1].squeeze(1), "seq"),
    "unsqueeze": (lambda m, h, k: torch.unsqueeze(h, 1), "lin"),
    "expand": (lambda m, h, k: h.unsqueeze(1).expand(-1, 3, -1), "lin"),
    # h's channels follow ref's dim 2; ref's own dim 1 reaches the result too (as in h + ref), and the index
    # keeps it out of the head's flattened input, where two axes in one dim would merge into one channel
    "expand_as": (lambda m, h, k: h.unsqueeze(1).expand_as(m.ref)[:, 0], "lin"),
    "broadcast_to": (lambda m, h, k: torch.broadcast_to(h.unsqueeze(1), (h.shape[0], 3, h.shape[1])), "lin"),
    "repeat": (lambda m, h, k: h.repeat(1, 2), "lin"),  # along the channels: every channel twice
    "tile": (lambda m, h, k: torch.tile(h, (1, 2, 1)), "seq"),
    "flip": (lambda m, h, k: torch.flip(h, [1]), "lin"),  # reverses the channels
    "fliplr": (lambda m, h, k: torch.fliplr(h), "lin"),
    "flipud": (lambda m, h, k: torch.flipud(h), "lin"),
    "roll": (lambda m, h, k: torch.roll(h, 1, 1), "lin"),  # along the channels: pinned (see _fill_shape)
    "rot90": (lambda m, h, k: torch.rot90(h, 1, (2, 3)), "conv2"),
    "repeat_interleave": (lambda m, h, k: h.repeat_interleave(2, dim=1), "lin"),
    "pixel_shuffle": (lambda m, h, k: F.pixel_shuffle(h, 2), "conv2"),
    "pixel_unshuffle": (lambda m, h, k: F.pixel_unshuffle(h, 2), "conv2"),
    "channel_shuffle": (lambda m, h, k: F.channel_shuffle(h, 2), "conv2"),
    "unfold": (lambda m, h, k: h.unfold(1, 2, 1), "seq"),  # Tensor.unfold: windows along the sequence
    "diagonal": (lambda m, h, k: torch.diagonal(h, 0, 0, 1).t(), "seq"),
}

_SPLIT: dict[str, tuple[Op, str]] = {
    # along the channels: equal pieces go in lockstep
    "chunk": (lambda m, h, k: torch.cat(h.chunk(2, dim=-1)[::-1], -1), "seq"),
    "tensor_split": (lambda m, h, k: sum(torch.tensor_split(h, 2, dim=-1)), "seq"),
    # along the sequence: the channels go through
    "split": (lambda m, h, k: sum(h.split(1, dim=1)), "seq"),
    "split_with_sizes": (lambda m, h, k: sum(t.sum(1) for t in h.split_with_sizes([1, h.shape[1] - 1], 1)), "seq"),
    "unbind": (lambda m, h, k: sum(torch.unbind(h, 1)), "seq"),
    "hsplit": (lambda m, h, k: sum(torch.hsplit(h, 2)), "seq"),  # splits dim 1 (the sequence) of a 3-d tensor
    "vsplit": (lambda m, h, k: torch.cat(torch.vsplit(h, 2), 0), "seq"),  # splits dim 0 (the batch)
}


def _fill_shape() -> None:
    for name, (op, stem) in _MOVE.items():
        modules = {"lin": lambda: nn.Linear(B, B)} if name in ("t", "T.__get__") else {}
        params = {"ref": (B, 3, C)} if name == "expand_as" else {}
        # a roll along the channels wraps another channel around once some are cut: pinned by design
        add(name, op, stem=stem, modules=modules, params=params, prunes=name != "roll")
    add("view", lambda m, h, k: h.view(h.shape[0], -1), stem="seq")
    add("reshape", lambda m, h, k: torch.reshape(h, (h.shape[0], h.shape[1], 2, -1)), stem="seq")  # heads of 2 channels
    add("view_as", lambda m, h, k: h.view_as(k), stem="seq", second=True)
    add("reshape_as", lambda m, h, k: h.flatten(1).reshape_as(k.flatten(1)), stem="seq", second=True)
    add("flatten", lambda m, h, k: torch.flatten(h, 1), stem="conv2")
    add("unflatten", lambda m, h, k: h.unflatten(-1, (2, -1)), stem="seq")
    add("ravel", lambda m, h, k: torch.ravel(h), stem="lin")
    add("__getitem__", lambda m, h, k: h[:, 0], stem="seq")
    add("__setitem__", _setitem, stem="seq")  # rows of a buffer sized by the channels (MultiScaleRoIAlign)
    add("narrow", lambda m, h, k: h.narrow(1, 0, h.shape[1] - 1), stem="seq")
    for name, (op, stem) in _SPLIT.items():
        add(name, op, stem=stem)
    add("cat", lambda m, h, k: torch.cat([h, k], dim=-1), second=True)
    add("concat", lambda m, h, k: torch.concat([h, k], 1), second=True)
    add("concatenate", lambda m, h, k: torch.concatenate([h, k], axis=1), second=True)
    add("stack", lambda m, h, k: torch.stack([h, k], dim=1), second=True)
    add("hstack", lambda m, h, k: torch.hstack([h, k]), second=True, warns=True, prunes=False)  # not understood
    add("vstack", lambda m, h, k: torch.vstack([h, k]), second=True, warns=True, prunes=False)  # not understood
    add("pad", lambda m, h, k: F.pad(h, (1, 2)), stem="lin")  # along the channels, with zeros
    add("torchvision.roi_align", _roi("roi_align"), stem="conv2")
    add("torchvision.roi_pool", _roi("roi_pool"), stem="conv2")


def _setitem(m: Any, h: torch.Tensor, k: Any) -> torch.Tensor:
    out = h.new_zeros((2 * h.shape[0], h.shape[1], h.shape[2]))  # its channels: read from h
    out[: h.shape[0]] = h
    out[torch.arange(h.shape[0], 2 * h.shape[0])] = 2 * h
    return out


def _roi(name: str) -> Op:
    def op(m: Any, h: torch.Tensor, k: Any) -> torch.Tensor:
        import torchvision

        boxes = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [1, 1.0, 1.0, 5.0, 4.0]])
        pooled = getattr(torchvision.ops, name)(h, boxes, output_size=2)
        return pooled

    return op


# --------------------------------------------------------------------------------------------------
# names no torch callable dispatches under
# --------------------------------------------------------------------------------------------------


def _fill_dead() -> None:
    """Every rule name still without an example: torch has no callable of that name, or the callable of
    that name dispatches under another one (``Tensor.__add__`` as ``add``); a stand-in is called."""
    from adaprune.graph.registry import RULES

    binary = {"__add__": torch.add, "__sub__": torch.sub, "__mul__": torch.mul, "__div__": torch.div,
              "__truediv__": torch.div, "__mod__": torch.remainder, "__iadd__": torch.Tensor.add_,
              "__isub__": torch.Tensor.sub_, "__imul__": torch.Tensor.mul_, "__itruediv__": torch.Tensor.div_,
              "__ge__": torch.ge, "__gt__": torch.gt, "__le__": torch.le, "__lt__": torch.lt, "__ne__": torch.ne,
              "__radd__": torch.add, "__rmul__": torch.mul, "__rand__": torch.logical_and,
              "__ror__": torch.logical_or, "__rxor__": torch.logical_xor, "fmax_": torch.Tensor.copy_,
              "fmin_": torch.Tensor.copy_, "maximum_": torch.Tensor.copy_, "minimum_": torch.Tensor.copy_,
              "rsub_": torch.Tensor.sub_, "where_": torch.Tensor.copy_}
    unary = {"__abs__": torch.abs, "__neg__": torch.neg, "__pos__": torch.positive}
    for name in sorted(set(RULES) - set(CATALOGUE)):
        if name in binary:
            fn = stand_in(name, binary[name])
            add_dead(name, lambda m, h, k, fn=fn: fn(h, k), second=True)
        elif name.endswith("_") or name in unary:  # an in-place variant torch does not have: in place, as is
            fn = stand_in(name, unary.get(name, lambda x, *a: x))
            add_dead(name, lambda m, h, k, fn=fn: fn(h), stem=_UNARY_STEM.get(name, "lin"))


# Known bugs in src (strict xfails in test_rule_matrix): the example is right, the rule is not.
XFAIL: dict[str, str] = {}

_fill_unary()
_fill_binary()
_fill_dims()
_fill_layers()
_fill_pools()
_fill_sequence()
_fill_shape()
_fill_dead()

for _name, _why in XFAIL.items():
    CATALOGUE[_name] = replace(CATALOGUE[_name], xfail=_why)
