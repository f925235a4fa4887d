"""Nested widths over one set of weights: every rung keeps a prefix of every group.

Two pieces, both plain tensor bookkeeping over a traced :class:`~adaprune.graph.Graph`:

- :func:`order_channels` permutes each group's channels in place so that channel 0 is the most
  important and the last the least. Every tensor the group spans (a conv's filters, the next conv's
  inputs, the norm's scale, shift and statistics, an attention layer's head blocks) is permuted the
  same way, so the model computes exactly what it computed before.
- :class:`NestedWidths` switches the live model between widths in place. Rung ``k`` keeps the first
  ``widths[k][group]`` channels of every group; since the channels are ordered, a prefix keeps the
  most important ones, and a smaller rung's channels are a subset of every larger rung's (the widths
  never grow as rungs get smaller: checked). A rung's tensors are *views* of the full ones (``narrow``:
  no copy) wherever its kept positions are contiguous, which is every tensor of every group whose
  channels occupy contiguous blocks (convs, linears, norms, attention heads); only interleaved layouts
  need an ``index_select`` (counted in :attr:`NestedWidths.copied`). Module attributes (``out_channels``,
  ``groups``, ``num_heads`` ...) are set by the same fixers physical removal uses
  (:func:`adaprune.layers.fix_module`), from the full model's attributes and the rung's cuts.

Physical removal of the same channels (:meth:`NestedWidths.export`) gives a standalone model with the same
outputs as the in-place rung.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PlanMismatchError, shown
from ..graph import Graph, Group
from ..layers import CUTS, fix_module
from ..plan import Plan, plan_from_choice
from ..surgery.remove import _ancestors, _owners, remove


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name (tied ones under each of their names)."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out


def norm_buffers(model: nn.Module) -> list[str]:
    """Names of the running statistics of every BatchNorm layer that tracks them (what a rung may hold
    its own values of)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            out += [f"{name}.{b}" if name else b for b in ("running_mean", "running_var")]
    return out


# ---------------------------------------------------------------------------------------- ordering
def _blocks(group: Group, owner: torch.Tensor) -> torch.Tensor | None:
    """``table[c, t]``: the position of channel ``c``'s ``t``-th element in one slot, or ``None`` when the
    group's channels do not hold the same number of positions there (such a slot cannot be permuted)."""
    held = (owner >= 0).nonzero().flatten()
    counts = torch.bincount(owner[held], minlength=group.size)
    if held.numel() == 0 or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        return None
    order = torch.argsort(owner[held] * (owner.numel() + 1) + held)  # by channel, then by position
    return held[order].view(group.size, int(counts[0]))


def orderable(group: Group) -> bool:
    """Whether every slot of ``group`` gives each channel the same number of positions (the group can
    be permuted, and so take part in nested widths)."""
    return all(_blocks(group, owner) is not None for owner in group.channel_of)


@torch.no_grad()
def order_channels(model: nn.Module, graph: Graph, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute every orderable group's channels in place, most important (highest score) first.

    Args:
        model: the model ``graph`` was traced from (changed in place; its function is unchanged).
        graph: its groups.
        scores: one importance score per channel of each group (groups without scores keep their order).

    Returns:
        ``{group: perm}`` for each permuted group: the new channel ``j`` is the old channel ``perm[j]``.

    Raises:
        PlanMismatchError: a slot names a tensor the model lacks or whose size differs (the graph is
            not the model's).
    """
    tensors = all_tensors(model)
    index: dict[tuple[int, int], torch.Tensor] = {}  # (id(tensor), dim) -> gather index over the whole dim
    named: dict[int, torch.Tensor] = {}
    perms: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        if g.name not in scores or not orderable(g):
            continue
        score = torch.as_tensor(scores[g.name], dtype=torch.float64).flatten()
        if score.numel() != g.size:
            raise ConfigError(f"scores[{g.name!r}] has {score.numel()} values for a group of {g.size} channels")
        perm = torch.argsort(-score, stable=True)
        perms[g.name] = perm
        for slot, owner in zip(g.slots, g.channel_of):
            t = tensors.get(slot.tensor)
            if t is None or t.dim() <= slot.dim or t.shape[slot.dim] != owner.numel():
                raise PlanMismatchError(f"the graph's slot {slot.tensor}[dim {slot.dim}] does not fit the model")
            table = _blocks(g, owner)
            assert table is not None  # orderable
            key = (id(t), slot.dim)
            gather = index.setdefault(key, torch.arange(owner.numel()))
            gather[table.flatten()] = table[perm].flatten()
            named[id(t)] = t
    for (tid, dim), gather in index.items():
        t = named[tid]
        t.data = t.data.index_select(dim, gather.to(t.device))
    return perms


# -------------------------------------------------------------------------------------------- rungs
@dataclass(frozen=True)
class _Slice:
    """How one tensor is cut for one rung: per dim, a ``narrow`` (start, length) or an index."""

    dims: tuple[tuple[int, int, int, torch.Tensor | None], ...]  # (dim, start, length, index or None)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        for d, start, length, idx in self.dims:
            t = t.narrow(d, start, length) if idx is None else t.index_select(d, idx)
        return t

    @property
    def is_view(self) -> bool:
        return all(idx is None for *_, idx in self.dims)


def _slice(size_of: Mapping[int, int], dims: Mapping[int, Sequence[int]]) -> _Slice:
    out: list[tuple[int, int, int, torch.Tensor | None]] = []
    for d, removed in sorted(dims.items()):
        gone = set(removed)
        kept = [p for p in range(size_of[d]) if p not in gone]
        if kept and kept == list(range(kept[0], kept[0] + len(kept))):
            out.append((d, kept[0], len(kept), None))
        else:
            out.append((d, 0, len(kept), torch.tensor(kept, dtype=torch.long)))
    return _Slice(tuple(out))


def nested_widths(graph: Graph, widths: Sequence[Mapping[str, int]]) -> list[dict[str, int]]:
    """Every rung's width of every group (a group a rung does not name keeps the previous rung's width),
    checked: rung 0 is the full model, widths are whole numbers in ``[1, size]`` and never grow.

    Raises:
        ConfigError: naming the rung, the group and the widths when a check fails.
    """
    sizes = {g.name: g.size for g in graph.groups}
    unknown = sorted({n for w in widths for n in w} - set(sizes))
    if unknown:
        raise ConfigError(f"widths name groups the graph lacks: {shown(unknown)}; known: {shown(sorted(sizes))}")
    out = [dict(sizes)]
    for k, w in enumerate(widths[1:] if widths and widths[0] == sizes else widths, start=1):
        rung = {**out[-1], **{n: int(v) for n, v in w.items()}}
        for n, v in rung.items():
            if not 1 <= v <= out[-1][n]:
                raise ConfigError(
                    f"rung {k}: group {n!r} width {v} must be in [1, {out[-1][n]}] (its width at rung {k - 1}): "
                    "widths never grow as rungs get smaller, and every group keeps a channel"
                )
        out.append(rung)
    return out


class NestedWidths:
    """Switches one model between nested widths in place (see the module doc).

    Args:
        model: the model, with its channels ordered (:func:`order_channels`) and at full width.
        graph: its groups (traced at full width).
        widths: per rung, the width of each group it narrows (rung 0, the full model, may be omitted).
        norms: per rung, normalisation statistics to use at that rung (``{buffer name: tensor}`` at the
            rung's width), e.g. BatchNorm running statistics recalibrated per rung; missing rungs and
            buffers use views of the full model's.
    """

    def __init__(self, model: nn.Module, graph: Graph, widths: Sequence[Mapping[str, int]],
                 norms: Sequence[Mapping[str, torch.Tensor]] | None = None) -> None:
        self.model, self.graph = model, graph
        self.widths = nested_widths(graph, widths)
        self.plans = [self.plan(k) for k in range(len(self.widths))]
        self.norms: list[dict[str, torch.Tensor]] = [dict(n) for n in (norms or [])]
        self.norms += [{} for _ in range(len(self.widths) - len(self.norms))]
        self._tensors = all_tensors(model)
        missing = sorted({t for p in self.plans for t in p.removals} - set(self._tensors))
        if missing:
            raise PlanMismatchError(f"the graph names tensors the model lacks: {shown(missing)}")
        self._owners = _owners(model)
        self._slices = [{t: _slice(dict(enumerate(self._tensors[t].shape)), dims) for t, dims in p.removals.items()}
                        for p in self.plans]
        unknown = sorted({n for rung in self.norms for n in rung} - set(self._tensors))
        if unknown:
            raise ConfigError(f"norms name buffers the model lacks: {shown(unknown)}")
        touched: dict[int, nn.Module] = {}
        names = {*(t for p in self.plans for t in p.removals), *norm_buffers(model)}
        for name in names | {n for rung in self.norms for n in rung}:
            for mod, _, _ in self._owners[id(self._tensors[name])]:
                touched[id(mod)] = mod
        self._touched = touched
        self._parents = _ancestors(model, touched)
        self._modules = [*touched.values(), *self._parents]
        self._saved = {id(m): (dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in self._modules}
        self._norm_names = norm_buffers(model)
        self._states: dict[int, list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]] = {}
        self._states_key: tuple[int, ...] = ()
        self.current = 0

    def __len__(self) -> int:
        return len(self.widths)

    @property
    def copied(self) -> list[list[str]]:
        """Per rung, the tensors that are copies (``index_select``), not views of the full ones."""
        return [sorted(t for t, s in slices.items() if not s.is_view) for slices in self._slices]

    def plan(self, k: int) -> Plan:
        """The plan that removes what rung ``k`` leaves out (the last channels of every group it narrows)."""
        w = self.widths[self._index(k)]
        return plan_from_choice(self.graph, {g.name: list(range(w[g.name], g.size))
                                             for g in self.graph.groups if w[g.name] < g.size})

    def _index(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not -len(self.widths) <= k < len(self.widths):
            raise ConfigError(f"rung {shown(k)}: expected an int in [0, {len(self.widths) - 1}]")
        return k % len(self.widths)

    def _restore(self) -> None:
        for mod in [*self._touched.values(), *self._parents]:
            training = mod.training
            d, params, bufs = self._saved[id(mod)]
            mod.__dict__.clear()
            mod.__dict__.update(d)
            mod._parameters, mod._buffers = dict(params), dict(bufs)
            mod.training = training

    def set_norms(self, k: int, stats: Mapping[str, torch.Tensor]) -> None:
        """Give rung ``k`` its own normalisation statistics (``{buffer name: tensor}`` at its width)."""
        k = self._index(k)
        unknown = sorted(set(stats) - set(self._norm_names))
        if unknown:
            raise ConfigError(f"set_norms: {shown(unknown)} are not BatchNorm statistics of the model")
        self.norms[k] = dict(stats)
        self._states.pop(k, None)

    def _key(self) -> tuple[int, ...]:
        """Where the full tensors' storage is: a rung's cached views are valid while it is unchanged."""
        return tuple(t.data_ptr() for t in self._tensors.values())

    def use(self, k: int, grad: bool = False) -> nn.Module:
        """Switch the model to rung ``k`` in place (0: the full model) and return it.

        The rung's parameters are views of the full ones (no copy where positions are contiguous) and
        share their ``requires_grad``; its normalisation statistics are the rung's own when given.
        Each rung's module states are built once and then swapped in (a dict update per module), so a
        switch costs no slicing and no fixer calls; they are rebuilt when the full tensors moved.
        With ``grad``, the rung's tensors are differentiable views of the full parameters instead of
        Parameters of their own, so a backward pass through the rung accumulates gradients in the full
        parameters (joint training of all rungs with one optimizer); call ``use(k)`` after training."""
        k = self._index(k)
        if grad:
            self._build(k, grad=True)
        else:
            key = self._key()
            if self._states_key != key:
                self._states, self._states_key = {}, key
            if k not in self._states:
                self._build(k, grad=False)
                self._states[k] = [(m, {a: v for a, v in m.__dict__.items() if a != "training"},
                                    dict(m._parameters), dict(m._buffers)) for m in self._modules]
            for mod, attrs, params, bufs in self._states[k]:
                training = mod.training
                d = mod.__dict__
                d.clear()
                d.update(attrs)
                d["_parameters"], d["_buffers"], d["training"] = dict(params), dict(bufs), training
        self.current = k
        return self.model

    def _build(self, k: int, grad: bool) -> None:
        """Put rung ``k`` in place the slow way: restore the full model, slice, run the fixers."""
        self._restore()
        cuts: dict[int, dict[str, Mapping[int, tuple[int, ...]]]] = {}
        done: dict[int, Any] = {}
        for name, cut in self._slices[k].items():
            old = self._tensors[name]
            if id(old) not in done:
                if grad and isinstance(old, nn.Parameter):
                    done[id(old)] = cut(old)
                else:
                    new: Any = cut(old.detach())
                    done[id(old)] = (nn.Parameter(new, requires_grad=old.requires_grad)
                                     if isinstance(old, nn.Parameter) else new)
            for mod, attr, is_param in self._owners[id(old)]:
                store: dict[str, Any] = mod._parameters if is_param else mod._buffers
                store[attr] = done[id(old)]
                cuts.setdefault(id(mod), {})[attr] = self.plans[k].removals[name]
        for name, stats in self.norms[k].items():
            for mod, attr, is_param in self._owners[id(self._tensors[name])]:
                held: dict[str, Any] = mod._parameters if is_param else mod._buffers
                held[attr] = stats
        if k:
            for key, mod in self._touched.items():
                if key in cuts:
                    fix_module(mod, {**self._saved[key][0], CUTS: cuts[key]})
            for mod in self._parents:
                fix_module(mod, self._saved[id(mod)][0])

    def export(self, k: int) -> nn.Module:
        """A standalone copy of rung ``k``, physically pruned (:func:`adaprune.remove`: smaller tensors, a
        transformers config stating the new sizes), with the rung's normalisation statistics; its
        outputs equal the in-place rung's. The live model stays at its rung."""
        k, current = self._index(k), self.current
        self.use(0)
        try:
            out = copy.deepcopy(self.model)
        finally:
            self.use(current)
        remove(out, self.plans[k])
        buffers = dict(out.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for name, stats in self.norms[k].items():
                buffers[name].copy_(stats)
        return out


__all__ = ["NestedWidths", "all_tensors", "nested_widths", "norm_buffers", "order_channels", "orderable"]
