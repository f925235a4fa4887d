"""Physical removal: slice the planned tensors, update module attributes, check, or roll back."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .._check import as_bool, check_callable, check_module, check_plan
from ..errors import ArgumentTypeError, SurgeryError, shown
from ..layers import CUTS, fix_module
from ..plan import Plan
from .hf_config import update_configs


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """For each parameter/buffer object: every (module, attribute, is_param) that holds it."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, name, True))
        for name, b in mod._buffers.items():
            if b is not None:
                out.setdefault(id(b), []).append((mod, name, False))
    return out


class _Positions:
    """Kept and removed positions as index tensors, made once per (size, removed, device): the tensors of
    one channel group (a filter, its norm's scale, shift and statistics ...) share them."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, tuple[int, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, size: int, removed: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (size, tuple(removed), device)
        if key not in self._cache:
            kept = torch.ones(size, dtype=torch.bool)
            kept[list(removed)] = False
            self._cache[key] = (kept.nonzero().flatten().to(device), (~kept).nonzero().flatten().to(device))
        return self._cache[key]


class _Cut:
    """One planned tensor cut in two: the kept part (the new tensor) and what rebuilds the old one.

    For each sliced dim: the kept and removed positions, and the removed slice. Together with the kept
    part they restore the old tensor bit-exactly, at the memory cost of the removed part only, so a
    parameter's old storage can be released while the rollback stays possible.
    """

    def __init__(
        self, t: torch.Tensor, dims: dict[int, tuple[int, ...]], rebuildable: bool, positions: _Positions
    ) -> None:
        out = t.detach()
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        for d, idx in dims.items():
            if not idx:
                continue
            keep, gone = positions(out.shape[d], idx, t.device)
            self.steps.append((d, keep, gone, out.index_select(d, gone) if rebuildable else None))
            out = out.index_select(d, keep)
        self.kept = out if self.steps else out.clone()  # index_select already copied

    def joined(self) -> torch.Tensor:
        """The old tensor, from its kept part and the removed slices."""
        out = self.kept.detach()
        for d, keep, gone, removed in reversed(self.steps):
            shape = list(out.shape)
            shape[d] = keep.numel() + gone.numel()
            full = out.new_empty(shape)
            full.index_copy_(d, keep, out)
            full.index_copy_(d, gone, removed)  # type: ignore[arg-type]
            out = full
        return out


RELEASE_BYTES = 1 << 30
"""Planned parameters of at least this many bytes in all are released as they are cut (``remove``)."""


def _planned_bytes(tensors: dict[str, torch.Tensor], plan: Plan) -> int:
    """Bytes of the (distinct, non-meta) parameters the plan cuts. (A helper, so that no reference to
    the old parameters outlives it: they must be free to go once cut.)"""
    planned = {id(t): t for n, t in tensors.items() if n in plan.removals and isinstance(t, nn.Parameter)}
    return sum(t.numel() * t.element_size() for t in planned.values() if not t.is_meta)


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def shapes_agree(got: list[tuple[int, ...]], expected: list[tuple[int, ...]]) -> bool:
    """Whether a pruned model's output shapes are the original's: the same tensors, each with the same
    dims, except the first, which may change: a detector's detections per image depend on its weights,
    not only on its widths (channels live after the first dim of any batched output)."""
    return len(got) == len(expected) and all(
        len(g) == len(e) and g[1:] == e[1:] for g, e in zip(got, expected))


def remove(
    model: nn.Module,
    plan: Plan,
    check: Callable[[], Any] | None = None,
    expected_shapes: list[tuple[int, ...]] | None = None,
    commit: bool = True,
    release: bool | None = None,
) -> None:
    """Apply ``plan`` physically to ``model`` in place.

    Args:
        model: the model (changed in place).
        plan: what to remove.
        check: optional ``() -> output``; run after surgery, its output shapes must equal
            ``expected_shapes``. On any failure the model is restored exactly and
            :class:`SurgeryError` is raised (an interrupt, ``KeyboardInterrupt``, restores it too
            and propagates as it is).
        expected_shapes: output shapes the model must keep.
        commit: with ``False`` the model is restored after a successful check (a dry run).
        release: free each old parameter's storage as soon as it is cut, keeping only the removed
            slices for the rollback: the model is never held twice in memory (peak: the model plus
            its largest tensor), at the cost of copying the removed slices. ``False`` keeps the old
            tensors whole until the end (faster; peak: the model plus the pruned model). ``None``
            (default): release when the planned parameters total at least :data:`RELEASE_BYTES`.
    """
    commit = as_bool(commit, "commit")
    with removal(model, plan, check, expected_shapes, release) as cut:
        if not commit:
            cut.rollback()


class Removal:
    """A removal in progress (see :func:`removal`): :meth:`rollback` puts the model back as it was."""

    def __init__(self, undo: Callable[[], None] | None) -> None:
        self._undo = undo

    def rollback(self) -> None:
        """Restore the model exactly (same parameter objects, same values); a second call does nothing."""
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


@contextmanager
def removal(
    model: nn.Module,
    plan: Plan,
    check: Callable[[], Any] | None = None,
    expected_shapes: list[tuple[int, ...]] | None = None,
    release: bool | None = None,
) -> Iterator[Removal]:
    """Apply ``plan`` (as :func:`remove` does) and run the ``with`` body on the cut model as part of the
    same transaction: if the body raises anything (``KeyboardInterrupt`` included), the model is
    restored exactly before the exception propagates; if it returns, the cut is committed.

    The body must not change the cut tensors in place (assign ``param.data = ...`` instead of
    ``param.copy_``): with ``release`` the rollback rebuilds the old tensors from the kept parts.
    """
    check_module(model)
    check_plan(plan)
    if check is not None:
        check_callable(check, "check", "a callable () -> output (the model's forward on example inputs)")
    if expected_shapes is not None and not (
        isinstance(expected_shapes, list) and all(isinstance(s, tuple) for s in expected_shapes)
    ):
        raise ArgumentTypeError(
            f"expected_shapes={shown(expected_shapes)}: expected a list of shape tuples (or None)"
        )
    if release is not None:
        release = as_bool(release, "release")
    plan.check(model)
    if plan.is_empty:
        yield Removal(None)
        return
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    if release is None:
        release = _planned_bytes(tensors, plan) >= RELEASE_BYTES
    owners = _owners(model)
    touched: dict[int, nn.Module] = {}
    for name in plan.removals:
        for mod, _, _ in owners[id(tensors[name])]:
            touched[id(mod)] = mod
    parents = _ancestors(model, touched)
    sized = _sized_by_input(model, touched, parents)
    parents += sized
    if check is None:  # no forward pass here to read their widths from: they read it on the next one
        for m in sized:
            if _take_width not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_take_width)
        sized = []
    saved = {
        k: (dict(m.__dict__), dict(m._parameters), dict(m._buffers))
        for k, m in [*touched.items(), *((id(p), p) for p in parents)]
    }
    # With `release`, parameters whose old storage was released: (old Parameter, what rebuilds the
    # old values). The old objects stay (the rollback puts the very same objects back); only their
    # data goes, so the model is never held twice in memory. Buffers always keep their old tensors
    # (a forward pass may update buffers in place, so the old values are kept whole).
    released: list[tuple[nn.Parameter, _Cut]] = []
    state = Removal(functools.partial(_restore, touched, saved, parents, released))
    done: dict[int, dict[int, tuple[int, ...]]] = {}
    cuts: dict[int, dict[str, dict[int, tuple[int, ...]]]] = {}  # per module: what left its own tensors
    positions = _Positions()
    try:
        for name, dims in plan.removals.items():
            old = tensors[name]
            if id(old) in done:  # the same (tied) tensor under another name
                if done[id(old)] != dict(dims):
                    raise SurgeryError(f"the plan cuts the tied tensor {name!r} differently under its names")
                continue
            done[id(old)] = dict(dims)
            freed = release and isinstance(old, nn.Parameter)
            cut = _Cut(old, dict(dims), freed, positions)
            new: torch.Tensor = cut.kept
            if isinstance(old, nn.Parameter):  # one new Parameter shared by all owners keeps ties
                new = nn.Parameter(new, requires_grad=old.requires_grad)
                if freed and cut.steps:
                    old.data = old.data.new_empty(0)
                    released.append((old, cut))
            for mod, attr, is_param in owners[id(old)]:
                store: dict[str, Any] = mod._parameters if is_param else mod._buffers
                store[attr] = new
                cuts.setdefault(id(mod), {})[attr] = dict(dims)
        del old, new, cut
        for k, mod in touched.items():
            fix_module(mod, {**saved[k][0], CUTS: cuts.get(k, {})})
        for mod in parents:  # containers whose attributes mirror their children's sizes
            fix_module(mod, saved[id(mod)][0])
        if check is not None:
            hooks = [m.register_forward_pre_hook(_take_width) for m in sized]
            try:
                with torch.no_grad():
                    got = output_shapes(check())
            finally:
                for h in hooks:
                    h.remove()
            if expected_shapes is not None and not shapes_agree(got, expected_shapes):
                raise SurgeryError(
                    f"after surgery the output shapes are {got}, expected {expected_shapes}"
                )
    except BaseException as exc:
        state.rollback()
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: restored, then as they are
            raise
        if isinstance(exc, SurgeryError):
            raise SurgeryError(f"{exc}; the model was restored unchanged") from exc
        raise SurgeryError(
            f"applying the plan failed ({type(exc).__name__}: {shown(str(exc), 300)}); the model was "
            "restored unchanged. If the model computes sizes from constants (e.g. view(B, 512, -1)), "
            "add the module that does so to `ignore`, or register a fixer for its class with "
            "adaprune.surgery.register_fixer"
        ) from exc
    try:
        yield state
    except BaseException:
        state.rollback()
        raise
    if state._undo is None:  # rolled back by the body (a dry run)
        return
    # Committed: the old parameters left the model. One that something else still holds (an
    # optimizer, the caller) gets its values back, as if its storage had never been released.
    state._undo = None
    update_configs(model, plan)  # transformers configs state the new sizes (or refuse save_pretrained)
    refs = [(weakref.ref(old), cut) for old, cut in released]
    del released, saved, tensors, state
    for ref, cut in refs:
        still_held = ref()
        if still_held is not None:
            still_held.data = cut.joined()


def _sized_by_input(model: nn.Module, touched: dict[int, nn.Module], parents: list[nn.Module]) -> list[nn.Module]:
    """Instance norms without weights or running statistics (MONAI's default norm): nothing of theirs is
    cut, but ``num_features`` states their width (torch warns when the input disagrees); the check's
    forward pass sets it from what reaches them. Without a check (the adaptive controller's steps), a
    forward pre-hook sets it on every call (registered once: picklable, and right after a rollback)."""
    skip = set(touched) | {id(m) for m in parents}
    return [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm) and id(m) not in skip
            and m.weight is None and m.running_mean is None]


def _take_width(mod: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        batched = x.dim() != mod._get_no_batch_dim()  # type: ignore[operator]
        setattr(mod, "num_features", int(x.shape[1 if batched else 0]))  # noqa: B010 (nn.Module typing)


def _ancestors(model: nn.Module, touched: dict[int, nn.Module]) -> list[nn.Module]:
    """Modules containing a touched module (not touched themselves), deepest first."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    found: dict[str, None] = {}
    for k in touched:
        parts = names.get(k, "").split(".") if names.get(k) else []
        for i in range(len(parts) - 1, -1, -1):
            found[".".join(parts[:i])] = None
    mods = [(n, model.get_submodule(n)) for n in found]
    mods = [(n, m) for n, m in mods if id(m) not in touched]
    mods.sort(key=lambda nm: -nm[0].count(".") - (1 if nm[0] else 0))
    return [m for _, m in mods]


def _restore(
    touched: dict[int, nn.Module],
    saved: dict[int, tuple[dict, dict, dict]],
    parents: list[nn.Module],
    released: list[tuple[nn.Parameter, _Cut]],
) -> None:
    """Put back every module's attributes, parameters and buffers, and the released parameters' values."""
    for mod in [*touched.values(), *parents]:
        d, params, bufs = saved[id(mod)]
        mod.__dict__.clear()
        mod.__dict__.update(d)
        mod._parameters = params
        mod._buffers = bufs
    while released:  # one parameter at a time: the new one and the removed slices go as it is rebuilt
        old, cut = released.pop()
        old.data = cut.joined()
