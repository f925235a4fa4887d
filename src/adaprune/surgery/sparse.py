"""Unstructured and N:M sparsity: zero individual weights, chosen by the same importance measures.

Scores per weight: ``magnitude`` (|w|), ``wanda`` (|w| * ||x|| of the layer's input channel: Sun et
al., 2023) or ``taylor`` (|w * dL/dw|). ``sparsegpt`` (Frantar & Alistarh, 2023;
:mod:`adaprune.surgery.sparsegpt`) chooses by second-order saliency on calibration data and also
updates the weights it keeps to make up for the ones it zeroes (per layer only). ``sparsity=0.5`` zeroes the lowest half of every layer (or of
all layers together with ``scope="global"``); ``pattern=NM(2, 4)`` keeps the 2 largest of every 4
consecutive weights along the layer's reduction dim (Mishra et al., 2021; the layout NVIDIA's sparse
tensor cores run).

This is masking, not removal: the zeros are stored densely, so **on CPU (eager PyTorch or ONNX
Runtime) a sparse model runs exactly as fast as the dense one**. Real speed-ups need structured
pruning (``adaprune.prune``) or, for 2:4, a GPU with sparse tensor cores (:func:`to_semi_structured`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._check import as_float, check_batches, check_callable, check_choice, check_instance, check_module
from ..errors import ConfigError, shown
from ..graph import ignore_items, resolve_ignore
from ..importance import Context, default_loss
from .mask import Masking
from .sequential import Applied, lowest_mask, nm_mask, prune_sequential, wanda_score, weight_of

CPU_NOTE = (
    "Unstructured and N:M sparsity keep dense tensors with zeros: on CPU they save no time "
    "(and no memory unless the weights are compressed). Use structured pruning for CPU speed-ups; "
    "2:4 runs faster only on GPUs with sparse tensor cores."
)


@dataclass(frozen=True)
class NM:
    """An N:M pattern: ``n`` non-zeros in every ``m`` consecutive weights (``NM(2, 4)`` is 2:4)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ConfigError(f"NM(n={self.n!r}, m={self.m!r}): need integers with 0 < n < m, e.g. NM(2, 4)")

    @classmethod
    def parse(cls, text: str) -> NM:
        try:
            n, m = (int(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError(f"pattern {text!r} is not N:M (write e.g. '2:4')") from None
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass
class SparseResult:
    """The masks, the sparsity reached per layer, and what was skipped and why."""

    masking: Masking | Applied
    sparsity: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    note: str = CPU_NOTE
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        """Fraction of all masked layers' weights that are zero."""
        total = sum(self.sizes.get(n, 1) for n in self.sparsity)
        return sum(s * self.sizes.get(n, 1) for n, s in self.sparsity.items()) / max(total, 1)


def _targets(model: nn.Module, ignore: set[int]) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if id(mod) in ignore:
            continue
        if isinstance(mod, nn.Linear) or (
            isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed
        ):
            out[name] = mod
    return out


def element_scores(
    model: nn.Module, layers: dict[str, nn.Module], importance: str, ctx: Context
) -> dict[str, torch.Tensor]:
    """A score per weight of each layer (higher = keep)."""
    from ..importance.data import input_sq_norms, taylor_elements

    if importance == "magnitude":
        return {n: weight_of(m).detach().abs().double().cpu() for n, m in layers.items()}
    if importance == "wanda":
        norms = input_sq_norms(model, set(layers), ctx.batches("wanda"))
        return {n: wanda_score(m, norms.get(n)) for n, m in layers.items()}
    if importance == "taylor":
        elems = taylor_elements(model, ctx.batches("taylor"), ctx.loss)
        return {n: elems[f"{n}.weight" if n else "weight"] for n in layers}
    raise ConfigError(
        f"importance={importance!r} is not an element-level criterion; use 'magnitude', 'wanda' or 'taylor'"
    )


OWL_THRESHOLD = 5.0
"""OWL: a weight is an outlier when its Wanda score exceeds this many times its block's mean score."""
OWL_SPREAD = 0.08
"""OWL: the blocks' sparsities span at most the target +- this (Yin et al.'s lambda)."""


def owl_units(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """The units OWL gives one sparsity each: the layers inside each block of the model's repeated stack (a
    decoder or encoder layer: :func:`~adaprune.surgery.blockwise.find_stack`) together, as Yin et al. weigh a
    transformer layer by all its linear layers' scores; every other layer alone."""
    from .blockwise import find_stack

    found = find_stack(model)
    units: dict[str, list[str]] = {}
    for name in layers:
        unit = name
        if found is not None:
            prefix = f"{found[0]}." if found[0] else ""
            if name.startswith(prefix):
                head = name[len(prefix):].split(".", 1)[0]
                if head.isdigit() and int(head) < len(found[1]):
                    unit = f"{prefix}{head}"
        units.setdefault(unit, []).append(name)
    return units


def owl_sparsities(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, sparsity: float) -> dict[str, float]:
    """Outlier-weighted layerwise sparsity (OWL, Yin et al., 2024): each unit's (a block of the model's repeated
    stack with all its layers, else one layer: :func:`owl_units`) fraction of outlier weights (Wanda score
    |w| * ||x|| above ``OWL_THRESHOLD`` times the unit's mean score) sets the sparsity of all its layers,
    linearly between ``sparsity + OWL_SPREAD`` (fewest outliers) and ``sparsity - OWL_SPREAD`` (most), shifted so
    that the layers' weights together are ``sparsity`` sparse; clipped to [0, 0.99]."""
    if ctx.calibration is None:
        raise ConfigError("scope='owl' weighs each layer by its outlier weights on data: pass calibration= an iterable "
                          "of (inputs, targets) batches, or use scope='layer'")
    from ..importance.data import input_sq_norms

    norms = input_sq_norms(model, set(layers), ctx.batches("wanda"))

    def measured(n: str) -> bool:  # the batches reached it (else wanda_score falls back to |w|, another scale)
        found, w = norms.get(n), weight_of(layers[n])
        return found is not None and found.numel() == w.shape[1] * getattr(layers[n], "groups", 1)

    def score(n: str) -> torch.Tensor:
        return wanda_score(layers[n], norms.get(n))

    units: dict[str, list[str]] = {}
    for unit, names in owl_units(model, layers).items():  # a layer the batches missed is a unit of its own
        reached = [n for n in names if measured(n)]
        if reached:
            units[unit] = reached
        units.update({n: [n] for n in names if n not in reached})
    ratio, sizes = {}, {}
    for unit, names in units.items():  # one layer's scores at a time (each scored twice): memory stays one layer's
        sizes[unit] = sum(weight_of(layers[n]).numel() for n in names)
        bar = OWL_THRESHOLD * sum(float(score(n).sum()) for n in names) / max(sizes[unit], 1)
        ratio[unit] = sum(int((score(n) > bar).sum()) for n in names) / max(sizes[unit], 1)
    if not ratio:
        return {}
    low, high = min(ratio.values()), max(ratio.values())
    spread = {u: (r - low) / (high - low) if high > low else 0.5 for u, r in ratio.items()}
    shift = sum(sizes[u] * spread[u] for u in spread) / sum(sizes.values())  # the size-weighted mean lands on sparsity
    return {n: min(max(sparsity + 2 * OWL_SPREAD * (shift - spread[u]), 0.0), 0.99)
            for u, names in units.items() for n in names}


def sparsify(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    pattern: NM | str | None = None,
    importance: str = "magnitude",
    scope: str = "layer",
    ignore: Iterable[nn.Module | str] | None = None,
    calibration: Iterable[tuple[Any, Any]] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    blockwise: bool | None = None,
    inplace: bool = False,
) -> SparseResult:
    """Mask individual weights of every Linear/Conv layer (reversibly, with parametrize).

    Give ``sparsity`` (fraction of weights zeroed, per layer or with ``scope="global"`` over all
    layers) or ``pattern`` (``NM(2, 4)`` or ``"2:4"``), not both. ``scope="owl"`` gives each block of the model's
    repeated stack (a transformer layer, all its linear layers together; any other layer alone) its own
    fraction from its share of outlier weights (:func:`owl_sparsities`; needs calibration), the layers
    together at ``sparsity``.

    ``blockwise``: with data-driven ``wanda`` or ``sparsegpt`` (scope ``"layer"`` or ``"owl"``), run the
    calibration through one decoder block at a time (:mod:`adaprune.surgery.blockwise`): ``None`` (default)
    does so when the model has a stack of repeated blocks that chain, ``True`` insists, ``False`` runs the whole
    model for each measurement. ``inplace=True`` writes the zeros (and SparseGPT's updates) into the weights and
    keeps the originals only on disk until the call has succeeded, so that memory stays the model's own plus one
    layer's work; the result's ``masking.undo()`` then has nothing to undo. Either way a failure leaves the
    model as it was.
    """
    check_module(model)
    for flag, value in (("blockwise", blockwise), ("inplace", inplace)):
        if not (isinstance(value, bool) or (flag == "blockwise" and value is None)):
            raise ConfigError(f"{flag}={shown(value)} must be True or False" + (" (or None: automatic)"
                                                                               if flag == "blockwise" else ""))
    if sparsity is not None:
        sparsity = as_float(sparsity, "sparsity", low=0.0, high=1.0, high_open=True,
                            hint="the fraction of each layer's weights zeroed, e.g. 0.5")
    if isinstance(pattern, str) and not re.fullmatch(r"\d{1,6}:\d{1,6}", pattern):
        raise ConfigError(f"pattern={shown(pattern)} is not N:M; write e.g. pattern='2:4' or NM(2, 4)")
    if pattern is not None and not isinstance(pattern, str):
        check_instance(pattern, NM, "pattern", "an N:M pattern", "write e.g. pattern='2:4' or NM(2, 4)")
    check_choice(importance, "importance", ("magnitude", "wanda", "taylor", "sparsegpt"))
    if importance == "sparsegpt" and scope == "global":
        raise ConfigError("importance='sparsegpt' chooses and compensates each layer on its own: use scope='layer' "
                          "(or 'owl' for per-block fractions)")
    check_choice(scope, "scope", ("layer", "global", "owl"))
    if scope == "owl" and pattern is not None:
        raise ConfigError("scope='owl' spreads a sparsity= fraction unevenly over the layers; an N:M pattern is the "
                          "same in every layer: give sparsity= with scope='owl', or pattern= with scope='layer'")
    ignore = ignore_items(ignore)  # a generator is read once, here
    resolve_ignore(model, ignore)
    if calibration is not None:
        check_batches(calibration, "calibration")
    if loss is not None:
        check_callable(loss, "loss", "a callable loss(output, targets) -> scalar tensor")
    if (sparsity is None) == (pattern is None):
        raise ConfigError("give exactly one of sparsity= (e.g. 0.5) or pattern= (e.g. '2:4')")
    if isinstance(pattern, str):
        pattern = NM.parse(pattern)
    if sparsity is not None and (isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0):
        raise ConfigError(f"sparsity={sparsity!r} must be a fraction in [0, 1)")
    layers = _targets(model, resolve_ignore(model, ignore))
    ctx = Context(calibration, loss or default_loss)
    fractions = (owl_sparsities(model, layers, ctx, float(sparsity or 0.0)) if scope == "owl"
                 else dict.fromkeys(layers, float(sparsity or 0.0)))
    if importance != "taylor" and scope != "global":
        from .sparsegpt import supported

        skipped: dict[str, str] = {}
        for name, mod in layers.items():
            why = supported(mod) if importance == "sparsegpt" else ""
            cols = weight_of(mod)[0].numel()
            if not why and pattern is not None and cols % pattern.m:
                why = f"reduction size {cols} is not a multiple of {pattern.m}"
            if why:
                skipped[name] = why
        batches = ctx.batches(importance) if importance != "magnitude" else []
        put, shifts, achieved, sizes = prune_sequential(model, layers, importance, batches, fractions, pattern,
                                                        skipped, blockwise, inplace)
        handle = Applied() if put is None else Masking(model, put, shifts)
        return SparseResult(handle, achieved, skipped, sizes=sizes)
    if blockwise:
        raise ConfigError(f"blockwise=True runs calibration block by block for 'magnitude', 'wanda' and 'sparsegpt' "
                          f"per layer; importance={importance!r} with scope={scope!r} needs the whole model at once: "
                          "pass blockwise=False")
    scores = element_scores(model, layers, importance, ctx)
    masks: dict[str, torch.Tensor] = {}
    skipped = {}
    if pattern is not None:
        for n, s in scores.items():
            per_row = s[0].numel()
            if per_row % pattern.m:
                skipped[n] = f"reduction size {per_row} is not a multiple of {pattern.m}"
                continue
            masks[n] = nm_mask(s, pattern)
    elif scope == "global" and scores:
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = lowest_mask(flat, float(sparsity or 0.0))
        start = 0
        for n, s in scores.items():
            masks[n] = keep[start : start + s.numel()].view(s.shape)
            start += s.numel()
    else:
        masks = {n: lowest_mask(s, fractions[n]) for n, s in scores.items()}
    device_masks = {
        (f"{n}.weight" if n else "weight"): m.to(weight_of(layers[n]).device, weight_of(layers[n]).dtype)
        for n, m in masks.items()
    }
    masking = Masking(model, device_masks)
    if inplace:
        masking.materialize()
    achieved = {n: 1.0 - float(m.mean()) for n, m in masks.items()}
    sizes = {n: m.numel() for n, m in masks.items()}
    return SparseResult(Applied() if inplace else masking, achieved, skipped, sizes=sizes)


def to_semi_structured(model: nn.Module, result: SparseResult) -> nn.Module:
    """Bake a 2:4 mask in and store the weights as torch semi-structured sparse tensors (CUDA only)."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "semi-structured (2:4) sparse tensors need a CUDA GPU with sparse tensor cores; on CPU use "
            "result.masking.materialize() to store the zeros densely"
        )
    from torch.sparse import to_sparse_semi_structured

    result.masking.materialize()
    for name in result.sparsity:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
    return model
