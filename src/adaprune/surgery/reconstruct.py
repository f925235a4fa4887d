"""Least-squares reconstruction: refit the layers that lost inputs so they reproduce the original outputs.

After channels are removed, a layer that consumed them (a ``Linear`` or an ungrouped ``Conv1d``/
``Conv2d``) sees fewer, and also changed, inputs. Its new weights and bias are the ridge solution of

    min_W  || X_pruned W - Y_original ||^2 + lam ||W||^2

over calibration batches, where ``X_pruned`` is the layer's input in the pruned model (unfolded into
patches for a convolution) and ``Y_original`` is the original layer's output on the same batches,
restricted to the output channels it keeps. Layers are refit in the order the forward pass reaches
them, each after the ones before it, so later layers see already-corrected inputs (the idea of
ThiNet and of He et al.'s channel pruning, done in closed form). The original's outputs are captured
for every refit layer in one forward pass; the pruned model's input to each layer in a pass that stops
at that layer (so ``k`` refit layers cost one pass of the original and ``k`` partial passes of the
pruned model, not ``2k`` full ones). The normal equations are built from the captures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._check import as_float, as_int, check_batches, check_instance, check_module
from ..calls import call_model
from ..errors import ConfigError, NonFiniteError, shown
from ..layers import Refit, refit_of
from ..plan import Plan


@dataclass
class Reconstruction:
    """What :func:`reconstruct` did: the layers refit, with the relative output error before and after,
    and the layers skipped with the reason."""

    refit: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{n}: relative error {a:.3f} -> {b:.3f}" for n, (a, b) in self.refit.items()]
        lines += [f"{n}: skipped ({why})" for n, why in self.skipped.items()]
        return "\n".join(lines) or "nothing to reconstruct"


def _why_not(layer: Any, fit: Refit, before: nn.Module | None, max_features: int) -> str | None:
    if before is None or not isinstance(before, type(layer)):
        return "no layer of the same kind under this name in the original model"
    if parametrize.is_parametrized(layer) or parametrize.is_parametrized(before):
        return "parametrized (masked) weight"
    why = fit.why_not(layer)
    if why:
        return why
    if layer.weight[0].numel() + 1 > max_features:
        return f"fan-in {layer.weight[0].numel()} above max_features={max_features}"
    return None


class _Reached(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward pass is not run."""


def _inputs(model: nn.Module, layer: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    """``layer``'s input on every batch; each forward pass stops at the layer."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i, x in enumerate(batches):
                _run(model, x, i)
    finally:
        handle.remove()
    return got


def _outputs(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any]) -> dict[str, list[torch.Tensor]]:
    """Every one of ``layers``' outputs on every batch, in one forward pass per batch."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: got[n].append(out.detach()))
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            for i, x in enumerate(batches):
                _run(model, x, i)
    finally:
        for h in handles:
            h.remove()
    return got


def _run(model: nn.Module, x: Any, index: int) -> None:
    try:
        call_model(model, x)
    except _Reached:  # a capture hook has what it needs: the rest of the forward pass is not wanted
        return
    except Exception as exc:
        raise ConfigError(
            f"calibration batch {index}: the model failed to run on its inputs ({type(exc).__name__}: "
            f"{shown(str(exc), 200)}); calibration batches must be (inputs, targets) pairs, or bare "
            "inputs, that the model accepts"
        ) from exc


def _finite(name: str, captured: list[torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the layer and the batches where ``captured`` is NaN or inf
    (the normal equations would be NaN, and the solver fails on them)."""
    bad = [i for i, t in enumerate(captured) if not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"reconstruct: layer {name!r} has NaN or inf values in its {what} on calibration batch"
            f"{'es' if len(bad) > 1 else ''} {listed} (of {len(captured)}); no layer was refit. Check "
            "those batches' inputs for NaN/inf, or leave them out"
        )


def _execution_order(model: nn.Module, names: list[str], batch: Any) -> list[str]:
    seen: list[str] = []
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen else None)
               for n in names]
    try:
        with torch.no_grad():
            _run(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


def reconstruct(
    pruned: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    removals: Mapping[str, Mapping[int, Iterable[int]]] | Plan | None = None,
    *,
    ridge: float | None = None,
    max_features: int = 8192,
) -> Reconstruction:
    """Refit, in place, every layer of ``pruned`` whose input width shrank, to match ``original``.

    Args:
        pruned: the model after :func:`remove` (changed in place).
        original: the model before that removal (same module names; not changed).
        batches: calibration batches: ``(inputs, targets)`` pairs or bare inputs.
        removals: the plan's removals (``plan.removals``, or the plan), to know which output channels of
            a refit layer were removed; without it, a layer whose output width also changed is skipped.
        ridge: Tikhonov weight, relative to the mean diagonal of ``X^T X`` (keeps the solution small
            where the calibration data does not pin it down). ``None`` (default): chosen per layer
            from 1e-4 ... 10 by two-fold cross-validation over the calibration samples, and a fit
            is applied only if it beats the sliced weights on held-out samples.
        max_features: layers with a larger fan-in (``in * kernel``) are skipped (the normal equations
            take ``max_features^2`` floats).

    Both models are run in eval mode (BatchNorm uses its running statistics); their modes are restored.
    If a layer cannot be refit (a calibration batch fails to run, or gives NaN/inf where a layer reads
    or writes), the layers already refit get their sliced weights back and the error propagates.

    Raises:
        ArgumentTypeError, ConfigError: an argument of the wrong type or out of range.
        PlanError: ``removals`` is not a plan's removals.
        NonFiniteError: a layer's input (pruned model) or output (original model) is NaN or infinite on
            some calibration batch (names the layer and the batches); raised before that layer is solved
            (with NaN inputs, that is the first layer refit), and ``pruned`` is left as it was.
    """
    check_module(pruned, "pruned")
    check_module(original, "original")
    check_batches(batches, "batches", "calibration batches ((inputs, targets) pairs or bare inputs)")
    if isinstance(removals, Plan):
        removals = removals.removals
    elif removals is not None:
        check_instance(removals, Mapping, "removals", "a plan's removals {tensor: {dim: indices}} or None",
                       "pass plan.removals")
        given: Any = removals
        removals = Plan(given).removals  # checked: tensor names, dims and indices
    if ridge is not None:
        ridge = as_float(ridge, "ridge", low=0.0, hint="a Tikhonov weight such as 0.01, or None to choose it")
    max_features = as_int(max_features, "max_features", low=2,
                          hint="the largest fan-in + 1 a refit layer may have (default 8192)")
    inputs = [b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b for b in batches]
    if not inputs:
        raise ConfigError("reconstruct needs at least one calibration batch")
    report = Reconstruction()
    before = dict(original.named_modules())
    candidates = []
    for name, layer in pruned.named_modules():
        old = before.get(name)
        fit = refit_of(layer)
        if fit is None or (old is not None and refit_of(old) is fit and fit.inputs(old) == fit.inputs(layer)):
            continue
        why = _why_not(layer, fit, old, max_features)
        if why is None and old is not None and old.weight.shape[0] != layer.weight.shape[0] and (
            removals is None or f"{name}.weight" not in removals
        ):
            why = "its output width changed and no plan says which channels were kept"
        if why:
            report.skipped[name] = why
        else:
            candidates.append(name)
    if not candidates:
        return report
    modes = {m: m.training for m in (*pruned.modules(), *original.modules())}
    pruned.eval()
    original.eval()
    layers = dict(pruned.named_modules())
    sliced = {n: (layers[n].weight.data, None if layers[n].bias is None else layers[n].bias.data) for n in candidates}
    try:
        targets = _outputs(original, {n: before[n] for n in candidates}, inputs)  # one pass of the original
        for name in _execution_order(pruned, candidates, inputs[0]):
            report.refit[name] = _refit(layers[name], before[name], name, pruned, targets.pop(name), inputs,
                                        removals, ridge)
    except BaseException:  # the layers refit so far get their sliced weights back
        for name, (weight, bias) in sliced.items():
            layers[name].weight.data = weight
            if bias is not None:
                layers[name].bias.data = bias
        raise
    finally:
        for m, flag in modes.items():
            m.training = flag
    return report


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class _Normal:
    """Normal equations ``XᵀX``, ``XᵀY``, ``YᵀY`` of one fold of calibration rows."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: torch.Tensor

    @classmethod
    def zeros(cls, d: int, k: int, dev: torch.device) -> _Normal:
        f64 = torch.float64
        return cls(torch.zeros(d, d, dtype=f64, device=dev), torch.zeros(d, k, dtype=f64, device=dev),
                   torch.zeros((), dtype=f64, device=dev))

    def add(self, rows: torch.Tensor, target: torch.Tensor) -> None:
        self.xtx += rows.T @ rows
        self.xty += rows.T @ target
        self.yty += (target * target).sum()

    def __add__(self, other: _Normal) -> _Normal:
        return _Normal(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty)

    def solve(self, ridge: float, bias: bool) -> torch.Tensor:
        n = self.xtx.shape[0] - int(bias)
        scale = self.xtx.diagonal()[:n].mean().clamp_min(1e-12)
        reg = torch.zeros_like(self.xtx)
        reg.diagonal()[:n] = ridge * scale  # the bias is not shrunk
        return torch.linalg.lstsq(self.xtx + reg, self.xty).solution

    def sq_error(self, w: torch.Tensor) -> torch.Tensor:  # || X W - Y ||^2
        return ((w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum() + self.yty).clamp_min(0)


def _refit(layer: Any, old: Any, name: str, pruned: nn.Module, ys: list[torch.Tensor],
           inputs: list[Any], removals: Mapping[str, Mapping[int, Iterable[int]]] | None,
           ridge: float | None) -> tuple[float, float]:
    """Refit one layer; returns its relative output error on the calibration data before and after.

    With ``ridge=None`` the ridge is chosen by two-fold cross-validation (each batch's samples split in
    halves): a layer with more inputs than calibration rows (a wide ``Linear`` after a flatten) gets the
    strong shrinkage it needs, a well-determined one a light one; and the fit is applied only if its
    held-out error beats the sliced weights'."""
    fit = refit_of(layer)
    assert fit is not None  # only refit-able layers get here
    xs = _inputs(pruned, layer, inputs)  # after the layers before it were refit: a pass that stops here
    _finite(name, xs, "input in the pruned model")
    _finite(name, ys, "output in the original model")
    gone = set(removals.get(f"{name}.weight", {}).get(0, ())) if removals else set()
    keep = torch.tensor([i for i in range(old.weight.shape[0]) if i not in gone], dtype=torch.long)
    bias = layer.bias is not None
    d = layer.weight[0].numel() + int(bias)
    dev = layer.weight.device
    folds = [_Normal.zeros(d, len(keep), dev), _Normal.zeros(d, len(keep), dev)]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        halves = [(x, y)] if len(x) < 2 else [(x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2:], y[len(y) // 2:])]
        for j, (xh, yh) in enumerate(halves):
            rows = fit.rows(layer, xh.to(torch.float64))
            if bias:
                rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
            folds[(i + j) % 2].add(rows, fit.out_rows(old, yh)[:, keep.to(yh.device)].to(torch.float64))
    both = folds[0] + folds[1]
    w_now = layer.weight.detach().reshape(len(keep), -1).T.to(torch.float64)
    if layer.bias is not None:
        w_now = torch.cat([w_now, layer.bias.detach().to(torch.float64)[None]], 0)

    def rel(err: torch.Tensor, total: torch.Tensor) -> float:
        return float((err / total.clamp_min(1e-30)).sqrt())

    err_before = rel(both.sq_error(w_now), both.yty)
    if ridge is None and all(f.yty > 0 for f in folds):
        held = {r: sum(float(folds[1 - k].sq_error(folds[k].solve(r, bias))) for k in (0, 1)) for r in RIDGES}
        ridge = min(held, key=held.__getitem__)
        if not held[ridge] < float(both.sq_error(w_now)):
            return err_before, err_before  # on held-out rows no fit beats the sliced weights
    w = both.solve(0.01 if ridge is None else ridge, bias)  # no cross-validation when a fold has no signal
    err_after = rel(both.sq_error(w), both.yty)
    if not err_after < err_before or not torch.isfinite(w).all():
        return err_before, err_before  # keep the sliced weights: the fit is no better
    # new storage, not an in-place copy: a removal's rollback rebuilds the old tensors from the kept parts
    layer.weight.data = w[: d - int(bias)].T.reshape(layer.weight.shape).to(layer.weight.dtype).contiguous()
    if layer.bias is not None:
        layer.bias.data = w[-1].to(layer.bias.dtype).clone()
    return err_before, err_after
