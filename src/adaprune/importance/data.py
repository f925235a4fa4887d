"""Criteria measured on the task's data (calibration batches).

- ``taylor``: first-order Taylor expansion of the loss (Molchanov et al., 2019, "Importance
  Estimation for Neural Network Pruning"): |w * dL/dw| per weight, accumulated over batches, summed
  over the channel's parameter slices in its group.
- ``activation``: mean |output| of the channel (neuron contribution), measured on the output of the
  group's normalisation layer when it has one (what the activation function sees), else on the
  output of the layer that produces the channel.
- ``apoz``: 1 - average percentage of zeros after ReLU (Hu et al., 2016, "Network Trimming"), i.e.
  the fraction of positions where that same output is positive (what a ReLU lets through).
- ``wanda``: |W| * ||X|| (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"),
  summed over the weights that consume the channel, X being the consumer's input.

Groups whose layers are not observed by hooks (e.g. inside ``nn.MultiheadAttention``, which calls
its projections functionally) fall back to ``l1`` for the activation criteria. The model is run in
eval mode, its ``.grad`` fields and ``requires_grad`` flags are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._check import clip, describe
from ..calls import call_model
from ..errors import ConfigError, NonFiniteError, shown
from ..graph import Group
from ..layers import is_norm, output_channel_dim, weight_role
from .magnitude import group_sums, per_channel, slot_rows
from .registry import IMPORTANCE, Context


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def norm_slots(model: nn.Module, group: Group) -> list[tuple[str, torch.Tensor]]:
    """(module name, channel map) for normalisation layers in the group: their output is what the
    activation function sees."""
    out = []
    for slot, owner in zip(group.slots, group.channel_of):
        if slot.tensor.endswith(".weight") and slot.dim == 0:
            mod = model.get_submodule(slot.module)
            if is_norm(mod):
                out.append((slot.module, owner))
    return out


def _weight_slots(model: nn.Module, group: Group, role: str) -> list[tuple[str, str, int, torch.Tensor]]:
    return [
        (slot.module, slot.tensor, slot.dim, owner)
        for slot, owner in zip(group.slots, group.channel_of)
        if slot.tensor.endswith(".weight") and weight_role(model.get_submodule(slot.module), slot.dim) == role
    ]


def producer_slots(model: nn.Module, group: Group) -> list[tuple[str, torch.Tensor]]:
    """(module name, channel map) for layers whose *outputs* are the group's channels."""
    return [(m, owner) for m, _, _, owner in _weight_slots(model, group, "out")]


def consumer_slots(model: nn.Module, group: Group) -> list[tuple[str, str, int, torch.Tensor]]:
    """(module name, tensor name, dim, channel map) for layers that *consume* the group's channels."""
    return _weight_slots(model, group, "in")


def batch_error(criterion: str, index: int, what: str, exc: BaseException) -> ConfigError:
    """The error for calibration batch ``index`` that ``criterion`` could not use (``what`` went wrong)."""
    return ConfigError(
        f"importance={shown(criterion, 30)}: calibration batch {index}: {what} "
        f"({type(exc).__name__}: {clip(str(exc), 150)})"
    )


_PASS_THROUGH = (ConfigError, Warning, torch.cuda.OutOfMemoryError)


def run_batch(model: nn.Module, x: Any, criterion: str, index: int) -> Any:
    """``model`` called on a calibration batch's inputs; a failure names the batch and the criterion."""
    try:
        return call_model(model, x)
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        raise batch_error(criterion, index, "the model cannot run its inputs", exc) from exc


def observe(
    model: nn.Module,
    names: set[str],
    batches: Sequence[tuple[Any, Any]],
    fn: Callable[[str, nn.Module, torch.Tensor], None],
    inputs: bool,
    criterion: str = "activation",
) -> None:
    """Run the batches; call ``fn(name, module, tensor)`` on each named module's input or output.

    A batch the model cannot run raises :class:`ConfigError` naming it and ``criterion``."""
    handles = []
    for name in sorted(names):
        mod = model.get_submodule(name)
        if inputs:
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: fn(n, m, a[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, n=name: fn(n, m, o)))
    try:
        with _eval(model), torch.no_grad():
            for i, (x, _) in enumerate(batches):
                run_batch(model, x, criterion, i)
    finally:
        for h in handles:
            h.remove()


def _per_position(stat: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def collect(store: dict[str, list[torch.Tensor]], name: str, mod: nn.Module, t: torch.Tensor) -> None:
        d = output_channel_dim(mod, t)
        flat = t.detach().movedim(d, 0).reshape(t.shape[d], -1).double().cpu()
        acc = store.setdefault(name, [torch.zeros(t.shape[d], dtype=torch.float64), torch.zeros(1)])
        acc[0] += stat(flat).sum(1)
        acc[1] += flat.shape[1]

    return collect


class _OutputStat:
    """Scores from a per-position statistic of the producing layers' outputs."""

    name = ""

    def stat(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.abs()

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], ctx: Context
    ) -> dict[str, torch.Tensor]:
        batches = ctx.batches(self.name)
        producers = {g.name: norm_slots(model, g) or producer_slots(model, g) for g in groups}
        store: dict[str, list[torch.Tensor]] = {}
        collect = _per_position(self.stat)
        names = {n for ps in producers.values() for n, _ in ps}
        observe(model, names, batches, lambda n, m, t: collect(store, n, m, t), inputs=False, criterion=self.name)
        out = {}
        for g in groups:
            seen = [(store[n][0] / store[n][1], owner) for n, owner in producers[g.name] if n in store]
            if not seen:
                out[g.name] = group_sums(model, g, 1.0)
                continue
            out[g.name] = per_channel(g, seen) / len(seen)
        return out


@IMPORTANCE.register("activation")
class Activation(_OutputStat):
    """Mean |activation| of each channel on the calibration data."""

    name = "activation"


@IMPORTANCE.register("apoz")
class APoZ(_OutputStat):
    """Fraction of positions where the channel is active (1 - APoZ)."""

    name = "apoz"

    def stat(self, flat: torch.Tensor) -> torch.Tensor:
        return (flat > 0).double()


def input_sq_norms(
    model: nn.Module, names: set[str], batches: Sequence[tuple[Any, Any]], criterion: str = "wanda"
) -> dict[str, torch.Tensor]:
    """Sum over batches of the squared input per input channel, for each named layer."""
    store: dict[str, list[torch.Tensor]] = {}
    collect = _per_position(lambda f: f * f)
    observe(model, names, batches, lambda n, m, t: collect(store, n, m, t), inputs=True, criterion=criterion)
    return {n: v[0] for n, v in store.items()}


@IMPORTANCE.register("wanda")
class Wanda:
    """|W| * ||X|| over the weights that consume each channel."""

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], ctx: Context
    ) -> dict[str, torch.Tensor]:
        batches = ctx.batches("wanda")
        consumers = {g.name: consumer_slots(model, g) for g in groups}
        norms = input_sq_norms(model, {c[0] for cs in consumers.values() for c in cs}, batches)
        params = dict(model.named_parameters(remove_duplicate=False))
        out = {}
        for g in groups:
            values = []
            for mod, tensor, dim, owner in consumers[g.name]:
                if mod not in norms or norms[mod].numel() != owner.numel():
                    continue
                w = params[tensor].detach().abs().movedim(dim, 0)
                w = w.reshape(w.shape[0], -1).double().cpu().sum(1)
                values.append((w * norms[mod].sqrt(), owner))
            out[g.name] = per_channel(g, values) if values else group_sums(model, g, 1.0)
        return out


def batch_loss(
    model: nn.Module, x: Any, y: Any, loss: Callable[[Any, Any], torch.Tensor], criterion: str, index: int
) -> torch.Tensor:
    """The loss of calibration batch ``index``: a finite scalar tensor, or an error naming the batch."""
    out = run_batch(model, x, criterion, index)
    try:
        value = loss(out, y)
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        raise batch_error(criterion, index, "the loss cannot take its targets", exc) from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
        raise ConfigError(
            f"importance={shown(criterion, 30)}: calibration batch {index}: the loss returned {describe(value)}; "
            "expected a scalar tensor computed from the model's output (differentiable)"
        )
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteError(
            f"importance={shown(criterion, 30)}: calibration batch {index}: the loss is {float(value)}; "
            "check the batch and the model's weights for NaN/inf"
        )
    return value.reshape(())


def taylor_elements(
    model: nn.Module, batches: Sequence[tuple[Any, Any]], loss: Callable[[Any, Any], torch.Tensor],
    criterion: str = "taylor",
) -> dict[str, torch.Tensor]:
    """|w * dL/dw| per weight, summed over batches, for every parameter (by name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
    flags = [p.requires_grad for _, p in named]
    acc = {n: torch.zeros_like(p, dtype=torch.float64, device="cpu") for n, p in named}
    try:
        for _, p in named:
            p.requires_grad_(True)
        with _eval(model), torch.enable_grad():
            for i, (x, y) in enumerate(batches):
                value = batch_loss(model, x, y, loss, criterion, i)
                grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
                for (n, p), g in zip(named, grads):
                    if g is not None:
                        acc[n] += (p.detach() * g).abs().double().cpu()
    finally:
        for (_, p), f in zip(named, flags):
            p.requires_grad_(f)
    return acc


@IMPORTANCE.register("taylor")
class Taylor:
    """First-order Taylor importance, |w * dL/dw|, accumulated over the calibration batches."""

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], ctx: Context
    ) -> dict[str, torch.Tensor]:
        elements = taylor_elements(model, ctx.batches("taylor"), ctx.loss)
        out = {}
        for g in groups:
            values = []
            for slot, owner in zip(g.slots, g.channel_of):
                if slot.tensor in elements:
                    e = elements[slot.tensor].movedim(slot.dim, 0)
                    values.append((e.reshape(e.shape[0], -1).sum(1), owner))
            out[g.name] = per_channel(g, values)
        return out


__all__ = ["consumer_slots", "input_sq_norms", "producer_slots", "slot_rows", "taylor_elements"]
