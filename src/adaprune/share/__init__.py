"""Weight sharing: k-means codebooks over the weights of each Linear / Conv1d / Conv2d / Embedding layer.

``ap.share(model, bits=4)`` replaces every such weight by ``codebook[indices]``: ``2**bits``
centroids per layer (``scope="layer"``) or per output channel (``scope="channel"``), fitted by
k-means from a linear initialisation (Han et al., 2016, "Deep Compression"), optionally weighted by
each weight's first-order Taylor importance on calibration batches, and optionally fine-tuned (the
codebooks only). The model stays an ordinary ``nn.Module``: each shared weight is a
``torch.nn.utils.parametrize`` parametrization, removable (:meth:`ShareResult.undo`) or baked into
plain weights (:meth:`ShareResult.bake`). Biases, normalisation layers and ignored modules are not
shared. A failed or interrupted call leaves the model as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from .._check import as_int, check_choice, check_module
from ..graph import ignore_names
from .kmeans import Codebooks, fit_tensor, index_dtype, kmeans_class
from .result import LayerShare, SharedWeight, ShareResult, Sharing
from .tune import check_finetune, finetune_codebooks, importance

SCOPES = ("layer", "channel")
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _targets(model: nn.Module, ignored: list[str]) -> tuple[list[str], dict[str, str]]:
    """The names of the layers to share, and the layers left alone with why."""
    skipped: dict[str, str] = {}
    names: list[str] = []
    seen: dict[int, str] = {}
    counts: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None) if isinstance(mod, LAYERS) else None
        if isinstance(w, torch.Tensor):
            counts[id(w)] = counts.get(id(w), 0) + 1
    for name, mod in model.named_modules():
        if not isinstance(mod, LAYERS):
            continue
        if any(name == n or name.startswith(f"{n}.") or n == "" for n in ignored):
            skipped[name] = "ignored"
        elif parametrize.is_parametrized(mod, "weight"):
            skipped[name] = "its weight is already parametrized (undo or bake that first)"
        elif not isinstance(mod.weight, nn.Parameter) or isinstance(mod.weight, UninitializedParameter):
            skipped[name] = "its weight is not an initialised parameter"
        elif not mod.weight.is_floating_point():
            skipped[name] = f"its weight is {mod.weight.dtype}, not floating point"
        elif counts.get(id(mod.weight), 0) > 1 or id(mod.weight) in seen:
            skipped[name] = "its weight is tied to another layer's"
        else:
            seen[id(mod.weight)] = name
            names.append(name)
    return names, skipped


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight
    assert isinstance(w, torch.Tensor)
    return w


def _original(model: nn.Module, name: str) -> torch.Tensor:
    """The unshared weight kept under a shared layer's parametrization."""
    lists = model.get_submodule(name).parametrizations
    assert isinstance(lists, nn.ModuleDict)
    original = lists["weight"].original
    assert isinstance(original, torch.Tensor)
    return original


def _stats(w: torch.Tensor, shared: torch.Tensor, imp: torch.Tensor | None) -> tuple[float, float | None]:
    w, shared = w.detach().double(), shared.detach().double()
    sq = (w - shared).pow(2)
    error = float(sq.sum().sqrt() / w.pow(2).sum().sqrt().clamp_min(1e-300))
    if imp is None:
        return error, None
    imp = imp.to(w.device, torch.float64)
    weighted = float((imp * sq).sum().sqrt() / (imp * w.pow(2)).sum().sqrt().clamp_min(1e-300))
    return error, weighted


def share(
    model: nn.Module,
    bits: int = 4,
    scope: str = "layer",
    *,
    calibration: Any = None,
    ignore: Any = None,
    finetune: Any = None,
    seed: int = 0,
) -> ShareResult:
    """Share the weights of ``model``'s Linear / Conv1d / Conv2d / Embedding layers through k-means codebooks, in place.

    Args:
        model: the ``nn.Module`` to share (changed in place; see :meth:`ShareResult.undo`).
        bits: index width, 1..8: each codebook holds ``2**bits`` centroids.
        scope: ``"layer"`` (one codebook per layer) or ``"channel"`` (one per output channel).
        calibration: optional batches (``(inputs, targets)`` pairs, or inputs alone, scored against the
            model's own predictions): each weight's squared error is weighted in the k-means by its
            importance ``|w * dL/dw|`` summed over them.
        ignore: modules (or names) whose weights are not shared, e.g. ``[model.fc]``; a module's
            submodules are ignored with it.
        finetune: ``(batches, steps, lr)`` to fine-tune the codebooks (Adam, the default
            cross-entropy loss, the model in eval mode), or a callable ``fn(model, codebooks)``.
        seed: the k-means ``random_state`` (and the sample drawn from a tensor too large to fit whole).

    Layers with no more distinct weight values than ``2**bits`` are left exact (not shared);
    with ``scope="channel"`` such a channel keeps its values exactly in its codebook.

    Returns:
        The :class:`ShareResult`: per layer the bits, centroids used, the reconstruction error and the
        storage estimate; ``undo()``, ``bake()`` and ``summary()``.
    """
    check_module(model)
    bits = as_int(bits, "bits", low=1, high=8, hint="each codebook holds 2**bits centroids, e.g. bits=4 (16)")
    scope = check_choice(scope, "scope", SCOPES)
    seed = as_int(seed, "seed", low=0, high=2**32 - 1)
    spec = check_finetune(finetune)
    kmeans_class()  # a missing scikit-learn is reported before any work
    names, skipped = _targets(model, ignore_names(model, ignore))
    imp = importance(model, calibration, names) if calibration is not None and names else {}

    fits: dict[str, Codebooks] = {}
    for name in names:
        w = _weight(model, name)
        fit = fit_tensor(w, bits, scope == "channel", imp.get(name), seed)
        if all(fit.exact):
            skipped[name] = f"no more than {2**bits} distinct values: left exact"
            continue
        fits[name] = fit

    parts = {}
    for name, fit in fits.items():
        w = _weight(model, name)
        parts[name] = SharedWeight(
            fit.codebook.to(w.device, w.dtype), fit.indices.reshape(w.shape).to(w.device, index_dtype(bits))
        )
    sharing = Sharing(model, parts)
    try:
        if spec is not None:
            finetune_codebooks(model, [p.codebook for p in parts.values()], spec)
        layers = {}
        for name, fit in fits.items():
            original = _original(model, name)
            with torch.no_grad():
                error, weighted = _stats(original, _weight(model, name), imp.get(name))
            part = parts[name]
            groups = part.codebook.shape[0]
            used = max(int(torch.unique(row).numel()) for row in part.indices.reshape(groups, -1))
            layers[name] = LayerShare(
                name, tuple(original.shape), bits, groups, used, sum(fit.exact), error, weighted,
                original.numel() * original.element_size() * 8,
            )
    except BaseException:  # a failed or interrupted fine-tuning: the model as it was
        sharing.undo()
        raise
    return ShareResult(bits, scope, layers, skipped, sharing, finetuned=spec is not None)


__all__ = ["LayerShare", "ShareResult", "SharedWeight", "share"]
