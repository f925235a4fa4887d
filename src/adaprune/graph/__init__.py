"""Trace a model on example inputs and find its groups of coupled channels."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._check import a_type, as_bool, brief, check_inputs, check_module, describe
from ..calls import call_model
from ..errors import ArgumentTypeError, ConfigError, TraceError, shown
from .groups import Graph, Group, Slot, build_groups
from .tracer import GROUPED, Frozen, Grouped, UnsupportedOpWarning, run_traced, unused_parameters

__all__ = ["Frozen", "Graph", "Group", "Grouped", "Slot", "UnsupportedOpWarning", "call_model", "trace"]


def ignore_items(ignore: Any) -> list[Any]:
    """``ignore`` as a list of items: ``None`` is none, a str one name, a module that module, else its
    items (read once: a generator can be passed on as the list)."""
    if ignore is None:
        return []
    if isinstance(ignore, (str, nn.Module)):
        return [ignore]
    if isinstance(ignore, (bytes, bytearray, Mapping)) or not isinstance(ignore, Iterable):
        raise ArgumentTypeError(
            f"ignore={brief(ignore)} is {a_type(ignore)}; expected a module of the model, a module "
            "name, or a list of them (e.g. ignore=[model.fc] or ignore='fc')"
        )
    return list(ignore)


def resolve_ignore(model: nn.Module, ignore: Iterable[nn.Module | str] | nn.Module | str | None) -> set[int]:
    """Module ids for ``ignore`` (a module or name, or an iterable of them); anything not in ``model`` raises."""
    ids: set[int] = set()
    names = dict(model.named_modules())
    by_id = {id(m) for m in names.values()}
    for item in ignore_items(ignore):
        if isinstance(item, str):
            if item not in names:
                raise ConfigError(
                    f"ignore: no module named {shown(item)} in the model; pass a module of the model "
                    "or one of the names from model.named_modules()"
                )
            ids.add(id(names[item]))
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ConfigError(
                    f"ignore: the {type(item).__name__} passed is not a submodule of the model "
                    "being pruned (a copy of the model has different modules); pass the model's own module"
                )
            ids.add(id(item))
        else:
            raise ArgumentTypeError(
                f"ignore: an item is {describe(item)}; expected modules of the model "
                "or module names"
            )
    return ids


def ignore_names(model: nn.Module, ignore: Any) -> list[str]:
    """The names (in ``model.named_modules()`` order) of the modules ``ignore`` resolves to (checked as by
    :func:`resolve_ignore`)."""
    ids = resolve_ignore(model, ignore)
    return [n for n, m in model.named_modules() if id(m) in ids]


def trace(
    model: nn.Module,
    example_inputs: Any,
    ignore: Iterable[nn.Module | str] | nn.Module | str | None = None,
    *,
    on_meta: bool = True,
    grouped: Grouped = "inside",
) -> Graph:
    """Run ``model`` once on ``example_inputs`` (in eval mode, without gradients) and group its channels.

    The run happens on a weightless copy on the meta device when the model allows it (no compute,
    no memory for activations); models whose forward needs real values (data-dependent control
    flow, tensors kept outside parameters and buffers) are traced for real.

    Args:
        model: any ``nn.Module`` that runs eagerly; Python control flow is fine.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ignore: modules (or names) whose outputs must keep their width, e.g. the classifier: a
            module, a name, or an iterable of them.
        on_meta: try the meta-device run first (set False to always run the real model).
        grouped: how grouped convolutions (``groups > 1``, not depthwise) are pruned. ``"inside"``
            (default): the same positions inside every group, so ``groups`` stays and each group gets
            narrower (the weight's per-group input dim is shared by all groups, so its positions
            must be the same in every group). ``"whole"``: whole groups (their inputs and outputs)
            are removed and ``groups`` shrinks. Depthwise convs (one input per group) always lose
            whole groups; transposed convs too.

    Returns:
        The :class:`Graph`: prunable groups, plus what was frozen and why.
    """
    check_module(model)
    check_inputs(example_inputs)
    on_meta = as_bool(on_meta, "on_meta")
    grouped = check_grouped(grouped)
    ignored = resolve_ignore(model, ignore)  # (reads ignore once)
    with _collector_paused():
        return _trace(model, example_inputs, ignored, on_meta, grouped)


def check_grouped(grouped: Any) -> Grouped:
    """``grouped`` checked: one of :data:`GROUPED` (``"inside"``, ``"whole"``)."""
    if not isinstance(grouped, str):
        raise ArgumentTypeError(
            f"grouped={brief(grouped)} is {a_type(grouped)}; expected one of {', '.join(map(repr, GROUPED))}"
        )
    for g in GROUPED:
        if grouped == g:
            return g
    raise ConfigError(
        f"grouped={shown(grouped)} is not a way to prune grouped convolutions; use 'inside' (narrower "
        "groups, the same number of groups) or 'whole' (fewer groups)"
    )


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while tracing. Tracing allocates many short-lived objects
    (the meta copy of the model, labels, records); with the collector on they get promoted and can
    set off a full collection over every object of the process (0.2 s with torch and a model
    loaded) in the middle of a trace. Freed by reference counting, they never need it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _trace(model: nn.Module, example_inputs: Any, ignored: set[int], on_meta: bool, grouped: Grouped) -> Graph:
    state = _trace_on_meta(model, example_inputs, ignored, grouped) if on_meta else None
    if state is not None:
        param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        return build_groups(state, param_names)
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            state, _ = run_traced(model, lambda: call_model(model, example_inputs), ignored, grouped=grouped)
            if unused_parameters(model, state):
                _train_pass(model, example_inputs, ignored, state)
    except (TraceError, Warning):
        raise
    except Exception as exc:
        raise TraceError.model_failed(exc) from exc
    finally:
        for m, flag in was_training.items():
            m.training = flag
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return build_groups(state, param_names)


def _trace_on_meta(model: nn.Module, example_inputs: Any, ignored: set[int], grouped: Grouped) -> Any:
    """The trace state from a meta-device copy, or None when the model cannot run on meta tensors."""
    from ..meta import meta_copy, to_meta

    try:
        clone = meta_copy(model).eval()
        names = {n for n, m in model.named_modules() if id(m) in ignored}
        ids = {id(m) for n, m in clone.named_modules() if n in names}
        inputs = to_meta(example_inputs)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            state, _ = run_traced(clone, lambda: call_model(clone, inputs), ids, grouped=grouped)
            if unused_parameters(clone, state):  # train-only branches (auxiliary heads): trace them too
                clone.train()
                run_traced(clone, lambda: call_model(clone, inputs), ids, state)
    except Exception:  # noqa: BLE001  (anything a meta run cannot do: the real run will tell)
        return None
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    return state


def _train_pass(model: nn.Module, example_inputs: Any, ignored: set[int], state: Any) -> None:
    """Trace the real model in train mode too (for train-only branches), then undo its side effects:
    running statistics and the random number generator are restored."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    model.train()
    try:
        run_traced(model, lambda: call_model(model, example_inputs), ignored, state)
    finally:
        model.eval()
        torch.set_rng_state(rng)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
