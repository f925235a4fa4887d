"""Importance criteria: one score per channel of a group (higher = keep).

Criteria are classes registered by name in :data:`IMPORTANCE` and looked up with
:func:`get_importance`. An instance is called as ``criterion(model, groups, ctx)`` and returns
``{group.name: scores}`` with one score per channel. Weight-only criteria ignore ``ctx``;
data-driven ones (``taylor``, ``activation``, ``apoz``, ``wanda``) read ``ctx.calibration`` (an
iterable of ``(inputs, targets)`` batches) and ``ctx.loss``.
"""

from __future__ import annotations

from . import data, magnitude  # noqa: F401  (registers the criteria)
from .registry import (
    IMPORTANCE,
    CheckedImportance,
    Context,
    Importance,
    ParamIndex,
    Params,
    PerGroup,
    check_scores,
    default_loss,
    get_importance,
)

__all__ = [
    "IMPORTANCE", "CheckedImportance", "Context", "Importance", "ParamIndex", "Params", "PerGroup", "check_scores", "default_loss",
    "get_importance",
]
