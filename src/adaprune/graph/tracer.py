"""Run the model once on example inputs and record, op by op, which channels are coupled.

Tracing is a real forward pass under a ``TorchFunctionMode``: Python control flow, HF models and
anything else that runs in eager mode trace as they run. Every torch function called at the user's
level (``F.conv2d``, ``x.view``, ``torch.cat``, ``a + b`` ...) goes to the rule registered for its name
(see ``rules/``); ops with no rule freeze the channels they touch, with a warning naming the op and
the module, so an unknown op can never cause a wrong cut.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import TraceError, shown
from .atoms import Atoms
from .fields import Field, along
from .registry import RULES, SIZED_BY_ARGS, Call, NeedsValues, op_name
from .sizes import SizeInt

Grouped = Literal["inside", "whole"]
"""How grouped convolutions (``groups > 1``, not depthwise) are pruned: ``"inside"`` removes the same
positions inside every group and keeps ``groups``; ``"whole"`` removes whole groups (fewer ``groups``)."""
GROUPED: tuple[Grouped, ...] = ("inside", "whole")


OUTPUT = "the model's output keeps its shape"
"""Pin reason of the channels of the model's output."""
IGNORED = "is in `ignore`"
"""Pin reason (after ``module 'name'``) of the channels of an ignored module's output."""


class UnsupportedOpWarning(UserWarning):
    """An op the graph does not understand touched prunable channels; they were frozen."""


@dataclass(frozen=True)
class Frozen:
    """Channels that cannot be pruned, and why."""

    module: str
    op: str
    reason: str


@dataclass
class TraceState:
    """Everything tracing accumulates: atoms, fields of live tensors, tensor slots, frozen notes."""

    tensor_names: dict[int, str]
    atoms: Atoms = field(default_factory=Atoms)
    fields: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    slots: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    module_stack: list[str] = field(default_factory=list)
    module_objects: list[nn.Module] = field(default_factory=list)
    frozen: list[Frozen] = field(default_factory=list)
    unsupported: list[Frozen] = field(default_factory=list)  # the frozen notes of ops no rule understood
    strict: bool = False
    grouped: Grouped = "inside"

    # -- tensors -------------------------------------------------------------------------------
    @property
    def module(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<model>"

    def is_tracked(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and (bool(self.fields.get(t)) or id(t) in self.tensor_names)

    def slot(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The atoms of dim ``dim`` of a parameter or buffer (created on first use)."""
        key = (self.tensor_names[id(t)], dim % t.dim())
        if key not in self.slots:
            self.slots[key] = self.atoms.new(t.shape[key[1]])
        return self.slots[key]

    def fields_of(self, t: Any) -> list[Field]:
        if not isinstance(t, torch.Tensor):
            return []
        if t in self.fields:
            return self.fields[t]
        if id(t) in self.tensor_names:
            return [along(self.slot(t, d), t.dim(), d) for d in range(t.dim()) if t.shape[d] > 1]
        return []

    def set_fields(self, t: Any, fields: list[Field]) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in self.tensor_names:
            kept = [f for f in fields if f.numel() > 0]
            if kept:
                self.fields[t] = kept
            elif t in self.fields:
                del self.fields[t]

    def sized(self, t: torch.Tensor, out: Any, dim: Any) -> Any:
        """``t.shape`` / ``t.size(dim)``, with the sizes of channel axes as :class:`SizeInt`."""
        if not self.is_tracked(t):
            return out

        def wrap(d: int, value: int) -> int:
            along = [f for f in self.fields_of(t) if f.shape[d] > 1]
            if len(along) == 1 and all(s == 1 for e, s in enumerate(along[0].shape) if e != d):
                return SizeInt(value, along[0].reshape(-1))
            return value

        if isinstance(out, torch.Size):
            return torch.Size([wrap(d, v) for d, v in enumerate(out)])
        if isinstance(out, int) and isinstance(dim, int):
            return wrap(dim % t.dim(), out)
        return out

    # -- freezing ------------------------------------------------------------------------------
    def freeze(self, t: Any, op: str, reason: str) -> None:
        for f in self.fields_of(t):
            self.atoms.pin(f, f"{reason} (op {op} in module {self.module})")

    def pin_op(self, field: Field, op: str, reason: str) -> None:
        """Pin the channels of ``field`` because ``op`` fixes their size; listed in ``frozen``."""
        if bool((field >= 0).any()):
            self.atoms.pin(field, f"{reason} (op {op} in module {self.module})")
            note = Frozen(self.module, op, reason)
            if note not in self.frozen:
                self.frozen.append(note)

    def unknown(self, call: Call, why: str = "") -> None:
        """Freeze every channel an op we cannot reason about touches."""
        tensors = [t for t in tree_flatten((call.args, call.kwargs))[0] if self.is_tracked(t)]
        if not tensors:
            return
        reason = why or f"op {call.name!r} is not understood by the graph"
        for t in tensors:
            self.freeze(t, call.name, reason)
        note = Frozen(self.module, call.name, reason)
        if note not in self.frozen:
            self.frozen.append(note)
            self.unsupported.append(note)
            warnings.warn(
                f"adaprune froze the channels touched by {call.name!r} in module {self.module!r}: "
                f"{reason}. Pruning continues on the rest of the model.",
                UnsupportedOpWarning,
                stacklevel=4,
            )

    def opaque(self, module: str, kind: str, inputs: Any, params: Iterator[torch.Tensor]) -> None:
        """A TorchScript submodule runs: freeze what goes in and its own parameters, and warn once."""
        op = "torchscript"
        reason = (
            f"module {module!r} is TorchScript ({kind}) and its ops cannot be traced; to prune inside "
            "it, pass the eager module instead of a torch.jit.script / torch.jit.trace one"
        )
        for t in tree_flatten(inputs)[0]:
            self.freeze(t, op, reason)
        for p in params:
            if id(p) in self.tensor_names:
                for d in range(p.dim()):
                    self.atoms.pin(self.slot(p, d), reason)
        note = Frozen(module, op, reason)
        if note not in self.frozen:
            self.frozen.append(note)
            self.unsupported.append(note)
            warnings.warn(
                f"adaprune froze the channels going into {module!r}: {reason}. Pruning continues on "
                "the rest of the model.",
                UnsupportedOpWarning,
                stacklevel=4,
            )

    # -- recording -----------------------------------------------------------------------------
    def record(self, call: Call) -> None:
        if not (_any_tensor(call.args, self.is_tracked) or _any_tensor(call.kwargs, self.is_tracked)
                or (call.name in SIZED_BY_ARGS and _any_size(call))):
            return
        if call.out is not None and not _any_tensor(call.out, _true):
            return
        fn = RULES.get(call.name)
        if fn is None:
            self.unknown(call)
            return
        try:
            fn(self, call)
        except NeedsValues:
            raise
        except Exception as exc:
            if self.strict:
                raise
            self.unknown(call, f"the graph rule for {call.name!r} failed ({exc})")


def _true(t: torch.Tensor) -> bool:
    return True


def _any_size(call: Call) -> bool:
    return any(isinstance(a, SizeInt) for a in tree_flatten((call.args, call.kwargs))[0])


def _any_tensor(obj: Any, pred: Callable[[torch.Tensor], bool]) -> bool:
    """Whether a tensor satisfying ``pred`` sits in ``obj`` or in its tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return pred(obj)
    if isinstance(obj, (tuple, list)):
        return any(_any_tensor(o, pred) for o in obj)
    if isinstance(obj, dict):
        return any(_any_tensor(o, pred) for o in obj.values())
    return False


# On meta tensors only shapes matter, and many ops' meta kernels run as slow Python decompositions
# (a ReLU ~0.5 ms, a linear ~2 ms): ops whose result is known are answered directly.
_SAME_SHAPE = frozenset({"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"})
# activations (same shape and dtype): the position of their `inplace` argument, None when they have none
_ACTIVATIONS: dict[str, int | None] = {
    "relu": 1, "relu6": 1, "hardswish": 1, "hardsigmoid": 1, "silu": 1, "mish": 1, "selu": 1,
    "elu": 2, "celu": 2, "leaky_relu": 2, "hardtanh": 3, "gelu": None, "softplus": None,
    "sigmoid": None, "tanh": None,
}
_IN_PLACE = frozenset(n + "_" for n in _ACTIVATIONS)
_SAME_OPERANDS = frozenset({"add", "sub", "mul", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__"})


def _like(x: torch.Tensor) -> torch.Tensor:
    # torch.empty_like on meta runs a Python implementation; new_empty is the same for a contiguous x
    return x.new_empty(x.shape) if x.is_contiguous() else torch.empty_like(x)


def _meta_result(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The result of op ``name`` on meta tensors when it is known without running the op, else None."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_meta or "out" in kwargs:
        return None
    if name in _SAME_SHAPE:
        return _like(x)
    if name in _IN_PLACE:
        return x
    if name in _ACTIVATIONS:
        at = _ACTIVATIONS[name]
        inplace = kwargs.get("inplace", at is not None and len(args) > at and args[at])
        return x if bool(inplace) else _like(x)
    if name in _SAME_OPERANDS and len(args) == 2:  # e.g. a residual sum of two same-shaped tensors
        y = args[1]
        if isinstance(y, torch.Tensor) and y.is_meta and y.shape == x.shape and y.dtype == x.dtype:
            return _like(x)
    if name == "linear":
        w, b = args[1] if len(args) > 1 else kwargs.get("weight"), args[2] if len(args) > 2 else kwargs.get("bias")
        if not (isinstance(w, torch.Tensor) and w.is_meta and w.dim() == 2 and x.dim() >= 1):
            return None
        if x.shape[-1] == w.shape[1] and (b is None or (isinstance(b, torch.Tensor) and b.is_meta and b.shape == w.shape[:1])):
            return x.new_empty((*x.shape[:-1], w.shape[0]))
    return None


class _Mode(TorchFunctionMode):
    def __init__(self, state: TraceState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = op_name(func)
        out = _meta_result(name, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if name in ("size", "shape.__get__") and args and isinstance(args[0], torch.Tensor):
            return self.state.sized(args[0], out, args[1] if len(args) > 1 else kwargs.get("dim"))
        self.state.record(Call(name, func, tuple(args), dict(kwargs), out))
        return out


def _scripted(mod: nn.Module) -> bool:
    return isinstance(mod, torch.jit.ScriptModule)


class _Opaque(nn.Module):
    """Stands in for a TorchScript submodule while tracing: its ops run inside the TorchScript
    interpreter, where no tracing mode sees them, so everything it touches is frozen."""

    def __init__(self, inner: nn.Module, name: str, state: TraceState) -> None:
        super().__init__()
        self._call = (inner,)  # a tuple, so the module is not registered (and not hooked) twice
        self._name, self._state = name, state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        (inner,) = self._call
        self._state.opaque(self._name, type(inner).__name__, (args, kwargs), inner.parameters())
        return inner(*args, **kwargs)


@contextmanager
def _scripted_stand_ins(model: nn.Module, state: TraceState) -> Iterator[None]:
    """Each TorchScript submodule replaced by an :class:`_Opaque` for the run, and put back after it
    (on every path, interrupts included)."""
    names = {id(m): n for n, m in model.named_modules() if _scripted(m)}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        if names:
            for parent in list(model.modules()):
                if _scripted(parent):
                    continue
                for key, child in list(parent._modules.items()):
                    if child is not None and _scripted(child):
                        swapped.append((parent, key, child))
                        parent._modules[key] = _Opaque(child, names[id(child)], state)
        yield
    finally:
        for parent, key, child in reversed(swapped):
            parent._modules[key] = child


@contextmanager
def _module_hooks(
    model: nn.Module, state: TraceState, ignore: set[int]
) -> Iterator[None]:
    """Forward hooks that keep the stack of running modules; all removed on every path."""
    handles = []
    try:
        for name, mod in model.named_modules():

            def pre(m: nn.Module, a: Any, n: str = name) -> None:
                state.module_stack.append(n or "<model>")
                state.module_objects.append(m)

            def post(m: nn.Module, a: Any, out: Any, n: str = name) -> None:
                if id(m) in ignore:
                    for t in tree_flatten(out)[0]:
                        state.freeze(t, "output", f"module {n!r} {IGNORED}")
                if state.module_stack:
                    state.module_stack.pop()
                    state.module_objects.pop()

            try:
                handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post, always_call=True))
            except (RuntimeError, TypeError, AttributeError) as exc:
                raise TraceError(
                    f"cannot put a forward hook on module {name or '<model>'!r} ({type(mod).__name__}): "
                    f"{shown(str(exc), 200)}; adaprune traces eager nn.Modules that accept hooks"
                ) from exc
        yield
    finally:
        for h in handles:
            h.remove()


def unused_parameters(model: nn.Module, state: TraceState) -> list[str]:
    """Parameters no traced op touched (e.g. branches that run only in train mode)."""
    seen = {name for name, _ in state.slots}
    return [n for n, p in model.named_parameters() if n not in seen and p.numel() > 1]


def run_traced(
    model: nn.Module,
    call_model: Callable[[], Any],
    ignore: set[int],
    state: TraceState | None = None,
    grouped: Grouped = "inside",
) -> tuple[TraceState, Any]:
    """Run ``call_model`` under the tracing mode; return the trace state and the model's output.

    Passing the ``state`` of an earlier run (the same model in another mode) adds this run's couplings
    (and keeps its ``grouped`` setting); ``grouped`` applies to a new state.
    """
    from . import rules  # noqa: F401  (registers the rules)

    if state is None:
        names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)
        for n, b in model.named_buffers(remove_duplicate=False):
            if b.is_floating_point():  # integer buffers (position ids, counters) index: no channels
                names.setdefault(id(b), n)
        state = TraceState(names, strict=os.environ.get("ADAPRUNE_STRICT_TRACE") == "1", grouped=grouped)
    if _scripted(model):
        raise TraceError(
            f"the model is a TorchScript module ({type(model).__name__}): its ops run inside the "
            "TorchScript interpreter, which tracing cannot see; pass the eager nn.Module (before "
            "torch.jit.script / torch.jit.trace) and script the pruned model afterwards"
        )
    with _scripted_stand_ins(model, state), _module_hooks(model, state, ignore), _Mode(state):
        out = call_model()
    for t in tree_flatten(out)[0]:
        state.freeze(t, "output", OUTPUT)
    return state, out
