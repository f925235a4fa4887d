"""``adaptive``: per-cluster ratios weighted by cost saved per metric lost, scaled to a target.

The adaptive controller (:mod:`adaprune.adapt.controller`) probes every cluster of isomorphic
groups: it masks a fixed fraction of the cluster's lowest-importance channels and records the cost
that saves (exact, per cost field) and the metric that loses (its *harm*). This module turns those
probes into the step's per-cluster removal ratios; it is plain math over plain data, so it is
tested without a model (``tests/test_adaptive_allocation.py``).

The weighting is resource-aware allocation by *cost saved per harm*: NetAdapt (Yang et al., 2018)
picks, each iteration, the layer proposal with the best accuracy kept per resource saved, and AMC
(He et al., 2018) allocates per-layer ratios under a resource constraint; here the same ratio
weighs every cluster at once:

1. ``cost per harm`` = cost saved by the probe / (harm + noise), where the noise floor is 5% of
   the median finite harm (plus 1e-6), so clusters whose probe did not measurably hurt are not
   told apart by noise. Negative harm counts as 0; NaN or inf harm is the most harm there is (the
   cluster gets no share); a negative or non-finite saving counts as 0.
2. ``share`` = (cost per harm / geometric mean over clusters with a positive one) ** SOFTEN.
   The square root softens the weighting: cheap clusters lose more, but no cluster takes the whole
   step and is left too thin for later steps to recover.
3. ``ratio(scale)`` = min(cap, width cap, scale * share) per cluster; ``scale`` in
   ``[0, top]`` is bisected (:func:`adaprune.allocate.search.bisect`, the helper the static
   budget search uses) for the least scale whose candidate meets the target. ``top`` is the
   scale at which every cluster with a positive share is at its limit (at least 1): a cluster
   whose share is small still gives way once the cheaper ones are at their caps, so a step never
   falls short of its target while some cluster could still be cut. Every candidate is judged by
   the caller's ``evaluate`` callback, which builds the discrete plan (whole channels) and returns
   its exact cost, so MACs, params, bytes and predicted latency stay exact.

When even ``scale = top`` misses the target, its candidate is returned: every cluster that may be
cut at its limit, the most the caps allow (the controller's next step aims again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .search import bisect

C = TypeVar("C")

SOFTEN = 0.5
"""Exponent applied to the normalised cost per harm (0 would be uniform: every cluster the same ratio)."""

STEPS = 14
"""Bisection steps per unit of scale (a tolerance of at most 2**-14 in the scale)."""

NOISE = 0.05
"""The harm noise floor, as a fraction of the median finite harm (plus 1e-6)."""


@dataclass(frozen=True)
class ClusterProbe:
    """What probing one cluster measured.

    Attributes:
        saved: cost saved at the probe ratio, per cost field (``"macs"``, ``"params"``, ``"bytes"`` ...).
        harm: metric lost at the probe ratio (>= 0; NaN or inf means the probe broke the metric).
    """

    saved: Mapping[str, float]
    harm: float


@dataclass(frozen=True)
class AdaptiveAllocation(Generic[C]):
    """The allocation the step takes.

    Attributes:
        ratios: fraction of each cluster's channels to remove (before rounding to whole channels).
        candidate: what ``evaluate`` built for these ratios (the controller's plan).
        value: the candidate's cost in the binding field, as ``evaluate`` returned it.
        scale: the bisected scale the ratios were taken at (the top scale, every cluster with a
            positive share at its limit, when the target was not reachable).
    """

    ratios: dict[str, float]
    candidate: C
    value: float
    scale: float


def probe_field(field: str) -> str:
    """The probe cost that weighs clusters when ``field`` binds: latency is not probed per cluster
    (slow and noisy), so clusters are weighed by the MACs they save and the callback judges latency."""
    return "macs" if field == "latency" else field


def _harm(value: float) -> float:
    return math.inf if math.isnan(value) else max(value, 0.0)


def _saving(value: float) -> float:
    return max(value, 0.0) if math.isfinite(value) else 0.0


def cost_per_harm(probes: Mapping[str, ClusterProbe], field: str) -> dict[str, float]:
    """Cost saved per metric lost for each cluster, with the noise floor (step 1 of the module doc).

    Args:
        probes: the probe of each cluster.
        field: the binding cost field (``"latency"`` is weighed by the MACs saved).

    Returns:
        ``{cluster: saving / (harm + noise)}``; 0 for a cluster that saves nothing or whose harm is
        NaN or inf.
    """
    key = probe_field(field)
    harms = {c: _harm(p.harm) for c, p in probes.items()}
    finite = sorted(h for h in harms.values() if math.isfinite(h))
    noise = NOISE * finite[len(finite) // 2] + 1e-6 if finite else 1e-6
    return {c: _saving(p.saved.get(key, 0.0)) / (harms[c] + noise) if math.isfinite(harms[c]) else 0.0
            for c, p in probes.items()}


def shares(raw: Mapping[str, float]) -> dict[str, float]:
    """Each cluster's share of the step: cost per harm over its geometric mean, softened (``** SOFTEN``).

    Clusters with no positive cost per harm get 0, and so does everyone when none has one.
    """
    positive = [v for v in raw.values() if v > 0]
    mean = torch.tensor(positive, dtype=torch.float64).log().mean().exp().item() if positive else 0.0
    return {c: (v / mean) ** SOFTEN if mean > 0 else 0.0 for c, v in raw.items()}


def ratios_at(scale: float, share: Mapping[str, float], limit: Mapping[str, float]) -> dict[str, float]:
    """Per-cluster ratios at ``scale``: ``scale * share``, never above the cluster's ``limit``."""
    return {c: max(0.0, min(limit[c], scale * s)) for c, s in share.items()}


def allocate_adaptive(
    probes: Mapping[str, ClusterProbe],
    field: str,
    target: float,
    evaluate: Callable[[dict[str, float]], tuple[C, float]],
    caps: Mapping[str, float] | None = None,
    width_caps: Mapping[str, float] | None = None,
    steps: int = STEPS,
) -> AdaptiveAllocation[C]:
    """Per-cluster ratios ∝ (cost saved per metric lost) ** SOFTEN, scaled to reach ``target``.

    Args:
        probes: the probe of each cluster (cost saved per field, harm).
        field: the binding cost field (``"macs"``, ``"params"``, ``"bytes"``, ``"energy"``, ``"latency"``).
        target: the value of ``field`` the step aims at (the step meets it when ``value <= target``).
        evaluate: ``ratios -> (candidate, value)``: builds the discrete candidate (whole channels) for
            the ratios and returns it with its exact cost in ``field``; assumed not to rise as ratios grow.
        caps: the most of each cluster the step may cut (e.g. ``max_group_ratio`` times the halvings
            after roll-backs); 1 when absent.
        width_caps: the most of each cluster the step may cut and keep every group's minimum width;
            1 when absent.
        steps: bisection steps per unit of scale (more when the top scale is above 1, so the
            tolerance stays ``2**-steps``).

    Returns:
        The least-cut allocation whose candidate meets ``target`` (within ``2**-steps`` of the
        scale), or, when even the top scale misses it, the allocation at the top scale.
    """
    caps, width_caps = caps or {}, width_caps or {}
    share = shares(cost_per_harm(probes, field))
    limit = {c: min(caps.get(c, 1.0), width_caps.get(c, 1.0)) for c in probes}

    def make(scale: float) -> AdaptiveAllocation[C]:
        ratios = ratios_at(scale, share, limit)
        candidate, value = evaluate(ratios)
        return AdaptiveAllocation(ratios, candidate, value, scale)

    top = top_scale(share, limit)
    full = make(top)
    if full.value > target:
        return full
    return bisect(make, lambda a: a.value <= target, 0.0, top, full, steps + math.ceil(math.log2(top)))[1]


def top_scale(share: Mapping[str, float], limit: Mapping[str, float]) -> float:
    """The least scale (at least 1) at which every cluster with a positive share is at its limit."""
    return max([1.0] + [limit[c] / s for c, s in share.items() if s > 0])


__all__ = [
    "SOFTEN", "STEPS", "AdaptiveAllocation", "ClusterProbe", "allocate_adaptive", "cost_per_harm",
    "probe_field", "ratios_at", "shares", "top_scale",
]
