"""Block by block: calibration run through one repeated block (a decoder layer) at a time.

A language model is mostly a stack of identical blocks, each reading the previous one's output. Data-driven
one-shot methods need each layer's inputs; running the whole model once per layer costs a full forward pass
per layer, and collecting every layer's inputs at once costs memory in proportion to the model. Instead:

1. the calibration batches run through the model up to the first block, whose inputs (the hidden state and
   whatever keywords the model passes it: attention mask, rotary embeddings ...) are kept, and the pass stops;
2. each block in turn is run on those inputs alone (a :class:`BlockRunner`, which the statistics code treats
   as a model whose "batches" are the batch indices) to measure and prune its layers;
3. the pruned block's outputs replace its inputs and become the next block's.

Peak memory is the model plus one block's activations for the calibration batches. The stack is found as the
model's largest ``nn.ModuleList`` of two or more modules of one class, and used only after a pass of the first
batch shows it is a chain: each block called once, each reading the previous block's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

CACHE_KEYWORDS = ("past_key_value", "past_key_values", "layer_past", "cache")
"""A block's cache keywords: set to None when its inputs are kept (a cache would grow on every re-run), as is
any keyword whose value is a cache object (a class named ``...Cache`` or derived from one)."""


def _is_cache(value: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(value).__mro__)


class _Reached(BaseException):
    """Stops the model's forward pass at the first block (not an ``Exception``: nothing on the way catches it)."""


def find_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's largest ``nn.ModuleList`` (by parameters) of at least two modules of one class, or None."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size and (best is None or size > best[2]):
                best = (name, mod, size)
    return None if best is None else (best[0], best[1])


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def chain_problem(model: nn.Module, stack: nn.ModuleList, batch: Any) -> str:
    """Why ``stack`` is not a chain on ``batch`` ("" when every block runs once and reads the previous one's
    output as its first input)."""
    from ..calls import eval_call

    seen: list[list[Any]] = [[] for _ in stack]
    handles = []
    for i, block in enumerate(stack):
        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            seen[i].append(["in", _hidden(args, kwargs)])

        def post(m: nn.Module, args: Any, kwargs: Any, out: Any, i: int = i) -> None:
            seen[i][-1].append(_first(out))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        eval_call(model, batch)
    finally:
        for h in handles:
            h.remove()
    for i, calls in enumerate(seen):
        if len(calls) != 1:
            return f"block {i} ran {len(calls)} times in one forward pass"
        if i and calls[0][1] is not seen[i - 1][0][2]:
            return f"block {i} does not read block {i - 1}'s output"
    return ""


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def capture(model: nn.Module, block: nn.Module, batches: Sequence[tuple[Any, Any]],
            criterion: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs ``block`` receives on each calibration batch (the pass stops there); caches dropped."""
    from .. import calls
    from ..importance.data import batch_error

    kept: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = dict(kwargs)
        for k, v in kw.items():
            if k in CACHE_KEYWORDS or _is_cache(v):
                kw[k] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        if not isinstance(_hidden(args, kw), torch.Tensor):
            raise ConfigError(f"importance={criterion!r} block by block: the first block's hidden state is not a "
                              "tensor (neither its first argument nor hidden_states=): pass blockwise=False")
        kept.append((args, kw))
        raise _Reached

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(batches):
                try:
                    calls.call_model(model, x)
                except _Reached:
                    continue
                except ConfigError:
                    raise
                except Exception as exc:
                    raise batch_error(criterion, i, "the model cannot run its inputs", exc) from exc
                raise ConfigError(f"importance={criterion!r} block by block: calibration batch {i} never reached the "
                                  "first block: pass blockwise=False")
    finally:
        handle.remove()
        for m, f in flags.items():
            m.training = f
    return kept


class BlockRunner(nn.Module):
    """One block on kept inputs: ``runner(i)`` is ``block`` on batch ``i``'s inputs. Its layers are named
    ``block.<name in the block>``; :meth:`advance` makes the block's outputs the inputs of the next block."""

    def __init__(self, block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        super().__init__()
        self.block = block
        self.inputs = inputs

    def forward(self, i: int) -> Any:
        args, kwargs = self.inputs[i]
        return self.block(*args, **kwargs)

    def batches(self) -> list[tuple[int, None]]:
        """The "batches" the statistics code runs: one index per kept input."""
        return [(i, None) for i in range(len(self.inputs))]

    def advance(self, block: nn.Module) -> None:
        """Run this (pruned) block on every kept input and keep the outputs as ``block``'s inputs."""
        flags = {m: m.training for m in self.block.modules()}
        self.block.eval()
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.inputs):
                    self.inputs[i] = _with_hidden(args, kwargs, _first(self.block(*args, **kwargs)))
        finally:
            for m, f in flags.items():
                m.training = f
        self.block = block


__all__ = ["BlockRunner", "capture", "chain_problem", "find_stack"]
