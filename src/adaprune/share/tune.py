"""Data for weight sharing: importance from calibration batches, and codebook fine-tuning."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._check import a_type, as_float, as_int, check_batches, describe, given
from ..errors import ArgumentTypeError, ConfigError
from ..importance.data import batch_loss, taylor_elements
from ..importance.registry import default_loss


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


def share_loss(output: Any, targets: Any) -> torch.Tensor:
    """:func:`~adaprune.importance.registry.default_loss`; batches without targets are scored against
    the model's own predictions (the cross-entropy of its argmax: what changes its decisions)."""
    if targets is None:
        targets = _logits(output).detach().argmax(-1)
    return default_loss(output, targets)


def as_pairs(value: Any, name: str, *, targets: bool) -> list[tuple[Any, Any]]:
    """Batches as a list of ``(inputs, targets)``: a 2-tuple/list is a pair, anything else inputs alone
    (``targets=None``), which only calibration accepts (``targets=False``)."""
    check_batches(value, name)
    batches = list(value)
    if not batches:
        raise ConfigError(f"{name}: the batches given yielded none; pass at least one batch")
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, (tuple, list)) and len(b) == 2:
            out.append((b[0], b[1]))
        elif targets:
            raise ConfigError(
                f"{name}: batch {i} is {describe(b)}; each batch must be an (inputs, targets) pair"
            )
        else:
            out.append((b, None))
    return out


def importance(model: nn.Module, calibration: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """|w * dL/dw| per weight of the named modules, summed over the calibration batches (first-order
    Taylor, Molchanov et al., 2019); the model's flags and ``.grad`` fields are left as they were."""
    batches = as_pairs(calibration, "calibration", targets=False)
    elements = taylor_elements(model, batches, share_loss, criterion="taylor")
    return {n: elements[f"{n}.weight" if n else "weight"] for n in names}


FinetuneFn = Callable[[nn.Module, list[nn.Parameter]], Any]


def check_finetune(value: Any) -> tuple[list[tuple[Any, Any]], int, float] | FinetuneFn | None:
    """``None``, a callable ``fn(model, codebooks)``, or ``(batches, steps, lr)`` checked."""
    if value is None or callable(value):
        return value
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ArgumentTypeError(
            f"{given('finetune', value)} is {a_type(value)}; expected (batches, steps, lr), e.g. "
            "finetune=(train_loader, 200, 1e-3), or a callable fn(model, codebooks)"
        )
    batches, steps, lr = value
    pairs = as_pairs(batches, "finetune batches", targets=True)
    steps = as_int(steps, "finetune steps", low=0)
    if not isinstance(lr, numbers.Real):
        raise ArgumentTypeError(f"{given('finetune lr', lr)} is {a_type(lr)}; expected a number > 0, e.g. 1e-3")
    return pairs, steps, as_float(lr, "finetune lr", low=0.0, low_open=True, hint="e.g. 1e-3")


def finetune_codebooks(
    model: nn.Module, codebooks: list[nn.Parameter], spec: tuple[list[tuple[Any, Any]], int, float] | FinetuneFn
) -> None:
    """Fine-tune the codebooks only: Adam on them, the default loss, ``steps`` steps cycling over the
    batches, the model in eval mode (normalisation statistics stay as they were). Autograd through
    ``codebook.gather(indices)`` sums each cluster's weight gradients into its centroid. No other
    parameter's value or ``.grad`` changes."""
    if callable(spec):
        spec(model, codebooks)
        return
    batches, steps, lr = spec
    if steps == 0 or not codebooks:
        return
    opt = torch.optim.Adam(codebooks, lr=lr)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            for step, (x, y) in zip(range(steps), itertools.cycle(batches)):
                loss = batch_loss(model, x, y, default_loss, "finetune", step % len(batches))
                grads = torch.autograd.grad(loss, codebooks, allow_unused=True)
                for cb, g in zip(codebooks, grads):
                    cb.grad = g
                opt.step()
    finally:
        for cb in codebooks:
            cb.grad = None
        for m, f in flags.items():
            m.training = f


__all__ = ["as_pairs", "check_finetune", "finetune_codebooks", "importance", "share_loss"]
