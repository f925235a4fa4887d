"""Noise-aware acceptance: the metric's drop with a confidence interval from per-example values.

A validation metric measured on n examples is itself noisy: on 200 retrieval pairs, recall@1 moves by
several points between equally good models. Judging a step by the point drop alone accepts steps whose
true drop is well past the tolerance. When the task returns per-example values
(:meth:`adaprune.task.Task.evaluate_examples`: 0/1 correctness, a reciprocal rank, a per-example
score; their mean is the metric), the controller compares the pruned model with the original
*example by example*: the paired differences ``d_i = sign * (original_i - pruned_i)`` have mean
``drop`` and standard error ``se = sd(d) / sqrt(n)``, and the two-sided ``confidence`` interval
``drop ± z * se`` (``z`` the normal quantile) bounds the true drop. A step is accepted only when the
interval's upper end is within the tolerance, so no accepted step's interval includes a drop larger
than the tolerance. Pairing is what makes this usable: a pruned model gets most examples right or
wrong exactly as the original does, so its differences are mostly 0 and their standard error is far
smaller than the metric's own sampling error.

Whether the validation set can resolve the tolerance at all is checked before the first step
(:func:`resolvable`): a step that truly loses half the tolerance, all of it in one direction (the least
noisy way to lose it), is accepted only if ``tolerance / 2 + z * sqrt(tolerance / 2 * spread / n)`` is
within the tolerance, i.e. ``n >= 2 * z**2 * spread / tolerance`` where ``spread`` is the range of the
per-example values (1 for 0/1 correctness). With fewer examples the controller warns
(:class:`SmallValidationWarning`): only steps that lose less than half the tolerance can be accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from ..errors import ConfigError, shown


class SmallValidationWarning(UserWarning):
    """The validation set is too small for the tolerance: a step that loses half of it cannot be told
    from one that loses all of it (:func:`adaprune.adapt.noise.resolvable`)."""


@dataclass(frozen=True)
class Interval:
    """The drop of the metric (original minus pruned, in the metric's direction) with its interval."""

    drop: float
    low: float
    high: float
    se: float
    n: int

    def describe(self) -> str:
        return f"{self.drop:.4f} [{self.low:.4f}, {self.high:.4f}] over {self.n} examples"


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (1.645 for 0.9)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def paired_interval(original: torch.Tensor, pruned: torch.Tensor, sign: float, confidence: float) -> Interval:
    """The paired interval of the metric's drop (module doc)."""
    d = sign * (original.double() - pruned.double())
    n = d.numel()
    drop = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    half = z_value(confidence) * se
    return Interval(drop, drop - half, drop + half, se, n)


def needed_examples(tolerance: float, spread: float, confidence: float) -> int:
    """The fewest validation examples that resolve ``tolerance`` (module doc); 0 for a zero tolerance
    or constant values (nothing to resolve)."""
    if tolerance <= 0 or spread <= 0:
        return 0
    return math.ceil(2 * z_value(confidence) ** 2 * spread / tolerance)


def resolvable(values: torch.Tensor, tolerance: float, confidence: float) -> str:
    """``""`` when ``values`` (the original model's per-example values) are enough examples to resolve
    ``tolerance``; else the warning's text, naming the numbers and the fix."""
    spread = float(values.max() - values.min()) if values.numel() else 0.0
    need = needed_examples(tolerance, spread, confidence)
    if values.numel() >= need:
        return ""
    return (
        f"the validation set has {values.numel()} examples, too few to resolve tolerance={tolerance:g} at "
        f"confidence={confidence:g}: a step that loses half the tolerance is not accepted with fewer than "
        f"{need}. Use more validation examples, a larger tolerance, or a lower confidence"
    )


def check_examples(values: object, metric: float, name: str, expected: int | None) -> torch.Tensor | None:
    """``task.evaluate_examples``' per-example values checked: None, or a finite 1-D tensor of
    ``expected`` values (the original model's count) whose mean is the metric ``name``."""
    if values is None:
        return None
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.numel():
        raise ConfigError(
            f"task.evaluate_examples returned per-example values {shown(values)}; expected a non-empty 1-D "
            "tensor with one value per validation example (or None)"
        )
    out = values.detach().double().cpu()
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(f"task.evaluate_examples returned non-finite per-example values for {name!r}")
    if expected is not None and out.numel() != expected:
        raise ConfigError(
            f"task.evaluate_examples returned {out.numel()} per-example values, the original model had "
            f"{expected}: every call must score the same validation examples, in the same order"
        )
    mean = float(out.mean())
    if abs(mean - metric) > 1e-6 * max(1.0, abs(metric)):
        raise ConfigError(
            f"task.evaluate_examples: the mean of the per-example values ({mean:.6g}) is not the metric "
            f"{name!r} ({metric:.6g}); the values must be the metric's per-example terms"
        )
    return out


__all__ = ["Interval", "SmallValidationWarning", "check_examples", "needed_examples", "paired_interval",
           "resolvable", "z_value"]
