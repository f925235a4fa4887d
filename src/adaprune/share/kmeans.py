"""One-dimensional k-means codebooks for a weight tensor (Han et al., 2016, "Deep Compression").

Each codebook is fitted by scikit-learn's ``KMeans`` on the weight values (optionally weighted by
their importance), starting from centroids spaced linearly between the smallest and the largest
value: Deep Compression found linear initialisation best, since it keeps centroids on the rare large
weights that matter most. The fit is deterministic (``random_state=seed``, one initialisation, given
explicitly). Every weight is then assigned to its nearest centroid. A group with no more distinct
values than centroids keeps them exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

#: the most values one k-means fit sees; a larger tensor is fitted on a seeded sample of this many
#: (then every weight is assigned to its nearest centroid): 1-D k-means converges on far fewer.
MAX_FIT = 131_072
MAX_ITER = 100


def kmeans_class() -> Any:
    """scikit-learn's ``KMeans``, or a :class:`ConfigError` naming the extra to install."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise ConfigError(
            "ap.share fits its codebooks with scikit-learn's KMeans, which is not installed: "
            "pip install 'adaprune[share]' (or pip install scikit-learn)"
        ) from exc
    return KMeans


def index_dtype(bits: int) -> torch.dtype:
    """The smallest integer dtype that holds indices of ``bits`` bits."""
    if bits <= 8:
        return torch.uint8
    if bits <= 15:
        return torch.int16
    return torch.int32


@dataclass
class Codebooks:
    """Codebooks for one tensor: ``codebook`` (groups, 2**bits) and ``indices`` (groups, values per
    group), so that ``codebook.gather(1, indices)`` is the shared tensor (flattened per group)."""

    codebook: torch.Tensor  # float64
    indices: torch.Tensor  # int64
    exact: list[bool]  # per group: kept its values exactly (no more distinct values than centroids)


def nearest(values: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centers`` for every value (a tie goes to the lower one)."""
    mids = (centers[1:] + centers[:-1]) / 2.0
    return np.searchsorted(mids, values, side="left")


def fit_group(
    values: np.ndarray, weights: np.ndarray | None, k: int, seed: int, kmeans: Any
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(sorted centers (k,), labels, exact) for one group of values (float64, 1-D)."""
    distinct = np.unique(values)
    if distinct.size <= k:
        centers = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
        return centers, np.searchsorted(distinct, values), True
    x, w = values, weights
    if values.size > MAX_FIT:
        pick = np.sort(np.random.default_rng(seed).choice(values.size, MAX_FIT, replace=False))
        x = values[pick]
        w = None if weights is None else weights[pick]
    if w is not None and not (np.isfinite(w).all() and w.sum() > 0):
        w = None  # no usable importance (all zero): an unweighted fit rather than a degenerate one
    init = np.linspace(float(values.min()), float(values.max()), k).reshape(-1, 1)
    km = kmeans(n_clusters=k, init=init, n_init=1, max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (ConvergenceWarning: fewer distinct clusters than k)
        km.fit(x.reshape(-1, 1), sample_weight=w)
    centers = np.sort(np.asarray(km.cluster_centers_, dtype=np.float64).ravel())
    return centers, nearest(values, centers), False


def fit_tensor(
    weight: torch.Tensor, bits: int, per_channel: bool, importance: torch.Tensor | None, seed: int
) -> Codebooks:
    """k-means codebooks of ``2**bits`` centroids for ``weight``: one, or one per output channel
    (dim 0) when ``per_channel``; ``importance`` (same shape) weights each value's squared error."""
    kmeans = kmeans_class()
    k = 2**bits
    groups = weight.shape[0] if per_channel else 1
    values = weight.detach().to("cpu", torch.float64).reshape(groups, -1).numpy()
    imp = None
    if importance is not None:
        imp = importance.detach().to("cpu", torch.float64).reshape(groups, -1).numpy()
    books, labels, exact = [], [], []
    for g in range(groups):
        c, lab, ex = fit_group(values[g], None if imp is None else imp[g], k, seed, kmeans)
        books.append(c)
        labels.append(lab)
        exact.append(ex)
    return Codebooks(
        torch.from_numpy(np.stack(books)), torch.from_numpy(np.stack(labels).astype(np.int64)), exact
    )


def storage_bits(numel: int, groups: int, bits: int) -> int:
    """Bits to store a shared tensor: its indices packed at ``bits`` bits and float32 codebooks."""
    return numel * bits + groups * (2**bits) * 32


__all__ = ["MAX_FIT", "Codebooks", "fit_group", "fit_tensor", "index_dtype", "kmeans_class", "nearest", "storage_bits"]
