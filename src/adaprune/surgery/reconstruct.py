"""Least-squares reconstruction: refit the layers that lost inputs so they reproduce the original outputs.

After channels are removed, a layer that consumed them (a ``Linear`` or an ungrouped ``Conv1d``/
``Conv2d``) sees fewer, and also changed, inputs. Its new weights and bias are the ridge solution of

    min_W  || X_pruned W - Y_original ||^2 + lam ||W||^2

over calibration batches, where ``X_pruned`` is the layer's input in the pruned model (unfolded into
patches for a convolution) and ``Y_original`` is the original layer's output on the same batches,
restricted to the output channels it keeps. Layers are refit in the order the forward pass reaches
them, each after the ones before it, so later layers see already-corrected inputs (the idea of
ThiNet and of He et al.'s channel pruning, done in closed form). Only the normal equations are kept:
memory is ``(fan_in + 1)^2`` per layer, whatever the number of calibration rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..graph import call_model

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


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


def _inputs(layer: nn.Module) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (one per output position) of its receptive field, flattened."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
        args = [(1, a[0]) for a in (layer.kernel_size, layer.dilation, layer.stride)]
        pad = (0, layer.padding[0])
    else:
        args = [layer.kernel_size, layer.dilation, layer.stride]
        pad = layer.padding
    cols = nn.functional.unfold(x, args[0], dilation=args[1], padding=pad, stride=args[2])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _out_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _why_not(name: str, layer: nn.Module, before: nn.Module | None, max_features: int) -> str | None:
    if before is None or not isinstance(before, type(layer)):
        return "no layer of the same kind under this name in the original model"
    if parametrize.is_parametrized(layer) or parametrize.is_parametrized(before):
        return "parametrized (masked) weight"
    if not isinstance(layer, nn.Linear):
        if layer.groups != 1:
            return "grouped convolution"
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return "padding mode other than explicit zeros"
    if layer.weight[0].numel() + 1 > max_features:
        return f"fan-in {layer.weight[0].numel()} above max_features={max_features}"
    return None


def _capture(model: nn.Module, layer: nn.Module, batches: list[Any], output: bool) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        got.append((out if output else args[0]).detach())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                call_model(model, x)
    finally:
        handle.remove()
    return got


def _execution_order(model: nn.Module, names: list[str], batch: Any) -> list[str]:
    seen: list[str] = []
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen else None)
               for n in names]
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


def reconstruct(
    pruned: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    removals: Mapping[str, Mapping[int, Iterable[int]]] | None = None,
    *,
    ridge: float = 0.01,
    max_features: int = 8192,
) -> Reconstruction:
    """Refit, in place, every layer of ``pruned`` whose input width shrank, to match ``original``.

    Args:
        pruned: the model after :func:`remove` (changed in place).
        original: the model before that removal (same module names; not changed).
        batches: calibration batches: ``(inputs, targets)`` pairs or bare inputs.
        removals: the plan's removals (``plan.removals``), to know which output channels of a refit
            layer were removed; without it, a layer whose output width also changed is skipped.
        ridge: Tikhonov weight, relative to the mean diagonal of ``X^T X`` (keeps the solution small
            where the calibration data does not pin it down).
        max_features: layers with a larger fan-in (``in * kernel``) are skipped (the normal equations
            take ``max_features^2`` floats).

    Both models are run in eval mode (BatchNorm uses its running statistics); their modes are restored.
    """
    if ridge < 0:
        raise ConfigError(f"ridge={ridge} must be >= 0")
    inputs = [b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b for b in batches]
    if not inputs:
        raise ConfigError("reconstruct needs at least one calibration batch")
    report = Reconstruction()
    before = dict(original.named_modules())
    candidates = []
    for name, layer in pruned.named_modules():
        old = before.get(name)
        if not isinstance(layer, _LAYERS) or (isinstance(old, _LAYERS) and _inputs(old) == _inputs(layer)):
            continue
        why = _why_not(name, layer, old, max_features)
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
    try:
        layers = dict(pruned.named_modules())
        for name in _execution_order(pruned, candidates, inputs[0]):
            report.refit[name] = _refit(layers[name], before[name], name, pruned, original, inputs, removals, ridge)
    finally:
        for m, flag in modes.items():
            m.training = flag
    return report


def _refit(layer: nn.Module, old: nn.Module, name: str, pruned: nn.Module, original: nn.Module,
           inputs: list[Any], removals: Mapping[str, Mapping[int, Iterable[int]]] | None,
           ridge: float) -> tuple[float, float]:
    xs = _capture(pruned, layer, inputs, output=False)
    ys = _capture(original, old, inputs, output=True)
    gone = set(removals.get(f"{name}.weight", {}).get(0, ())) if removals else set()
    keep = torch.tensor([i for i in range(old.weight.shape[0]) if i not in gone], dtype=torch.long)
    d = layer.weight[0].numel()
    dev = layer.weight.device
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev)
    xty = torch.zeros(d + 1, len(keep), dtype=torch.float64, device=dev)
    yty = torch.zeros((), dtype=torch.float64, device=dev)
    for x, y in zip(xs, ys, strict=True):
        rows = _rows(layer, x.to(torch.float64))
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
        target = _out_rows(old, y)[:, keep.to(y.device)].to(torch.float64)
        xtx += rows.T @ rows
        xty += rows.T @ target
        yty += (target * target).sum()
    w_now = torch.cat([layer.weight.detach().reshape(len(keep), d).T.to(torch.float64),
                       (layer.bias.detach() if layer.bias is not None else torch.zeros(len(keep), device=dev))
                       .to(torch.float64)[None]], 0)
    reg = ridge * xtx.diagonal()[:-1].mean().clamp_min(1e-12) * torch.eye(d + 1, dtype=torch.float64, device=dev)
    reg[-1, -1] = 0.0
    if layer.bias is None:  # no bias to fit: pin its row to zero
        xtx, xty, reg, w_now = xtx[:-1, :-1], xty[:-1], reg[:-1, :-1], w_now[:-1]
    w = torch.linalg.lstsq(xtx + reg, xty).solution

    def error(wm: torch.Tensor) -> float:  # || X W - Y ||^2 / || Y ||^2 from the normal equations
        sq = (wm * (xtx @ wm)).sum() - 2 * (wm * xty).sum() + yty
        return float((sq.clamp_min(0) / yty.clamp_min(1e-30)).sqrt())

    err_before, err_after = error(w_now), error(w)
    if not err_after < err_before or not torch.isfinite(w).all():
        return err_before, err_before  # keep the sliced weights: the fit is no better
    with torch.no_grad():
        layer.weight.copy_(w[:d].T.reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(w[d].to(layer.bias.dtype))
    return err_before, err_after
