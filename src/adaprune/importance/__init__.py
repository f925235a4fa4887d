"""Importance criteria: one score per channel of a group (higher = keep).

Criteria are registered by name (``IMPORTANCE.register``) and looked up by :func:`get_importance`.
Each is a class whose instances are called as ``criterion(model, group) -> Tensor[group.size]``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .._registry import Registry
from ..graph import Group


class Importance(Protocol):
    """Scores the channels of one group of a model."""

    def __call__(self, model: nn.Module, group: Group) -> torch.Tensor: ...


IMPORTANCE: Registry[type] = Registry("importance criterion")


def get_importance(name: str | Importance) -> Importance:
    """An instance of the criterion registered as ``name`` (or ``name`` itself when callable)."""
    if callable(name) and not isinstance(name, str):
        return name
    return IMPORTANCE.get(name)()


from . import magnitude  # noqa: F401  (registers the criteria)

__all__ = ["IMPORTANCE", "Importance", "get_importance"]
