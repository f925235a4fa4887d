"""One-shot sparsity layer after layer, in the model's order, with each layer's weights changed as it is done.

The layers come in units: the whole model (one unit), or, block by block (:mod:`.blockwise`), the layers before
the decoder stack, each block's layers, and the layers after it. Within a unit:

- ``magnitude`` needs no data;
- ``wanda`` measures the input norms of all the unit's layers in one pass (on the unit's inputs: with the
  blocks before it already pruned, as the Wanda authors' code does block by block), then prunes them;
- ``sparsegpt`` measures each layer's input Hessian after the layers before it were pruned and updated
  (shared-input layers from one pass: :func:`.sparsegpt.hessians`).

Every weight is changed in place as its layer is done. Its original is kept first: in memory, or with
``inplace=True`` in a temporary directory on disk (safetensors, one file per layer, deleted at the end), so
that peak memory stays the model plus one layer's work. A failure or an interrupt puts every original back.
Then, unless ``inplace``, the originals go back into the parameters and the change is put on as a
parametrization (masks, and SparseGPT's updates as shifts: :class:`.mask.ShiftedMask`), which ``undo()`` removes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


class Applied:
    """The handle :func:`adaprune.sparsify` returns with ``inplace=True``: the zeros are already in the weights."""

    def materialize(self) -> None:
        """Nothing to do: the weights were changed in place."""

    def undo(self) -> None:
        raise ConfigError("sparsify(inplace=True) changed the weights in place and kept no copy: reload the model "
                          "(or call sparsify without inplace=True to be able to undo)")


class Originals:
    """The weights as they were before this call changed them: in memory, or in files (``spill``)."""

    def __init__(self, spill: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="adaprune-originals-")) if spill else None
        self.memory: dict[str, torch.Tensor] = {}
        self.names: dict[str, int] = {}  # name -> its file's number, in the order kept

    def keep(self, name: str, weight: torch.Tensor) -> None:
        if self.dir is not None:
            from safetensors.torch import save_file

            save_file({"weight": weight.detach().cpu().contiguous()}, str(self.dir / f"{len(self.names)}.safetensors"))
        else:
            self.memory[name] = weight.detach().clone()
        self.names[name] = len(self.names)

    def get(self, name: str) -> torch.Tensor:
        if self.dir is None:
            return self.memory[name]
        from safetensors.torch import load_file

        return load_file(str(self.dir / f"{self.names[name]}.safetensors"))["weight"]

    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.names:
                weights[name].copy_(self.get(name))

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def units(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], blockwise: bool | None,
          criterion: str) -> Iterator[tuple[nn.Module, list[Any], dict[str, str]]]:
    """``(module to run, its batches, {layer name in it: layer name in the model})`` in order; block by block
    when asked (``True``) or when the model has a decoder stack (``None``)."""
    from .blockwise import BlockRunner, capture, chain_problem, find_stack

    whole = (model, batches, {n: n for n in layers})
    if not batches or blockwise is False:
        yield whole
        return
    found = find_stack(model)
    problem = "no nn.ModuleList of repeated blocks" if found is None or not found[0] else ""
    if not problem:
        assert found is not None
        problem = chain_problem(model, found[1], batches[0][0])
        problem = problem and f"{found[0]}: {problem}"
    if problem:
        if blockwise:
            raise ConfigError(f"sparsify(blockwise=True): the model has no decoder stack to run block by block "
                              f"({problem}): pass blockwise=False")
        yield whole
        return
    assert found is not None
    name, stack = found
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    inside = [n for n in layers if n.startswith(name + ".")]
    before = [n for n in layers if n not in inside and position[n] < position[name]]
    after = [n for n in layers if n not in inside and n not in before]
    if before:
        yield model, batches, {n: n for n in before}
    runner = BlockRunner(stack[0], capture(model, stack[0], batches, criterion))
    for i in range(len(stack)):
        prefix = f"{name}.{i}."
        mine = {"block." + n[len(prefix):]: n for n in inside if n.startswith(prefix)}
        if mine:
            yield runner, runner.batches(), mine
        if i + 1 < len(stack):
            runner.advance(stack[i + 1])
    del runner
    if after:
        yield model, batches, {n: n for n in after}


def weight_of(mod: nn.Module) -> torch.Tensor:
    """A layer's ``weight`` tensor."""
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w


def wanda_score(mod: nn.Module, norms: torch.Tensor | None) -> torch.Tensor:
    """|w| * ||x|| of the input channel each weight reads (|w| where the norms do not fit the layer)."""
    w = weight_of(mod).detach().abs().double().cpu()
    groups = getattr(mod, "groups", 1)
    if norms is None or norms.numel() != w.shape[1] * groups:
        return w
    rows = torch.arange(w.shape[0]) // (w.shape[0] // groups)
    xn = norms.sqrt().view(groups, w.shape[1])[rows]  # (out, in per group): each row's inputs
    return w * xn.view(*xn.shape, *([1] * (w.dim() - 2)))


def nm_mask(scores: torch.Tensor, pattern: Any) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the flattened reduction dim."""
    rows = scores.reshape(scores.shape[0], -1)
    blocks = rows.reshape(rows.shape[0], -1, pattern.m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    top = blocks.topk(pattern.n, dim=-1).indices
    keep.scatter_(-1, top, True)
    return keep.reshape(scores.shape).float()


def lowest_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 everywhere but at the lowest ``fraction`` of ``scores`` (stable order)."""
    k = int(fraction * scores.numel())
    mask = torch.ones(scores.numel())
    if k > 0:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = 0.0
    return mask.view(scores.shape)


def prune_sequential(model: nn.Module, layers: dict[str, nn.Module], importance: str, batches: list[Any],
                     fractions: dict[str, float], pattern: Any, skipped: dict[str, str], blockwise: bool | None,
                     inplace: bool) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor],
                                             dict[str, float], dict[str, int]]:
    """Prune ``layers`` (those not in ``skipped``) unit by unit (the module doc): the masks and shifts to put on
    by parameter name (None with ``inplace``: the weights stay changed), the sparsity reached per layer and the
    layers' sizes."""
    from ..importance.data import input_sq_norms
    from .sparsegpt import hessians, prune_layer

    weights = {n: weight_of(m) for n, m in layers.items()}
    todo = {n: m for n, m in layers.items() if n not in skipped}
    kept = Originals(spill=inplace)
    masks: dict[str, torch.Tensor] = {}
    achieved: dict[str, float] = {}
    sizes: dict[str, int] = {}
    nm = None if pattern is None else (pattern.n, pattern.m)

    def apply(name: str, new: torch.Tensor, keep: torch.Tensor) -> None:
        w = weights[name]
        kept.keep(name, w)
        with torch.no_grad():
            w.copy_(new.view_as(w).to(w.device, w.dtype))
        achieved[name], sizes[name] = 1.0 - float(keep.double().mean()), keep.numel()
        if not inplace:
            masks[name] = keep.view(w.shape).to(torch.bool)

    def choose(name: str, scores: torch.Tensor) -> None:
        keep = nm_mask(scores, pattern) if pattern is not None else lowest_mask(scores, fractions[name])
        w = weights[name].detach()
        apply(name, w * keep.to(w.device, w.dtype), keep)

    try:
        for runner, rbatches, names in units(model, todo, batches, blockwise, importance):
            local = list(names)
            if importance == "magnitude":
                for r in local:
                    choose(names[r], weights[names[r]].detach().abs().double().cpu())
            elif importance == "wanda":
                norms = input_sq_norms(runner, set(local), rbatches)
                for r in local:
                    choose(names[r], wanda_score(todo[names[r]], norms.get(r)))
            else:
                ready: dict[str, torch.Tensor] = {}
                for i, r in enumerate(local):
                    if r not in ready:
                        ready.update(hessians(runner, r, local[i + 1:], rbatches))
                    w = weights[names[r]]
                    new, keep = prune_layer(w.detach().reshape(w.shape[0], -1), ready.pop(r),
                                            None if nm else fractions[names[r]], nm, consume=True)
                    apply(names[r], new, keep)
    except BaseException:
        kept.restore(weights)
        kept.close()
        raise
    if inplace:
        kept.close()
        return None, {}, achieved, sizes
    shifts = {}
    with torch.no_grad():
        for name in kept.names:
            w = weights[name]
            original = kept.get(name)
            if importance == "sparsegpt":
                shifts[f"{name}.weight" if name else "weight"] = w.detach() - original
            w.copy_(original)  # the parameter stays the original: the change lives in the parametrization
    kept.close()
    device_masks = {(f"{n}.weight" if n else "weight"): m.to(weights[n].device, weights[n].dtype)
                    for n, m in masks.items()}
    return device_masks, shifts, achieved, sizes


__all__ = ["Applied", "Originals", "lowest_mask", "nm_mask", "prune_sequential", "units", "wanda_score", "weight_of"]
