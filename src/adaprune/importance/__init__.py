"""Importance criteria: one score per channel of a group (higher = keep).

Criteria are classes registered by name in :data:`IMPORTANCE` and looked up with
:func:`get_importance`. An instance is called as ``criterion(model, groups, ctx)`` and returns
``{group.name: scores}`` with one score per channel. Weight-only criteria ignore ``ctx``;
data-driven ones (``taylor``, ``activation``, ``apoz``, ``wanda``) read ``ctx.calibration`` (an
iterable of ``(inputs, targets)`` batches) and ``ctx.loss``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .._registry import Registry
from ..errors import ConfigError
from ..graph import Group


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the model's logits (``output``, ``output.logits`` or ``output[0]``)."""
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class Context:
    """What data-driven criteria may use: calibration batches and a loss."""

    calibration: Iterable[tuple[Any, Any]] | None = None
    loss: Callable[[Any, Any], torch.Tensor] = default_loss

    def batches(self, criterion: str) -> list[tuple[Any, Any]]:
        if self.calibration is None:
            raise ConfigError(
                f"importance={criterion!r} measures the model on data: pass calibration= an iterable "
                "of (inputs, targets) batches (a DataLoader works), or pick a weight-only criterion "
                "such as 'l2'"
            )
        batches = list(self.calibration)
        if not batches:
            raise ConfigError(f"importance={criterion!r}: calibration= yielded no batches")
        for b in batches:
            if not isinstance(b, (tuple, list)) or len(b) != 2:
                raise ConfigError(
                    f"importance={criterion!r}: each calibration batch must be (inputs, targets), "
                    f"got {type(b).__name__}"
                )
        return batches


class Importance(Protocol):
    """Scores the channels of every group of a model."""

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], ctx: Context
    ) -> dict[str, torch.Tensor]: ...


Params = dict[str, nn.Parameter]


class ParamIndex(dict):  # type: ignore[type-arg]
    """A model's named parameters, with per-dim sums of |w|^p computed once per tensor and power.

    Given the groups to score, only the dims that are slots of some group are summed (a token
    embedding's rows, for instance, are never prunable: no sums along them).
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group] | None = None) -> None:
        super().__init__(model.named_parameters(remove_duplicate=False))
        self._sums: dict[tuple[str, float, int], torch.Tensor] = {}
        self._dims: dict[str, set[int]] | None = None
        if groups is not None:
            self._dims = {}
            for g in groups:
                for slot in g.slots:
                    self._dims.setdefault(slot.tensor, set()).add(slot.dim)

    def sums(self, name: str, power: float, dim: int) -> torch.Tensor:
        """sum over every dim but ``dim`` of |w|^power, float64 on the CPU."""
        key = (name, power, dim)
        if key not in self._sums:
            w = self[name].detach()
            copied = w.dtype != torch.float32  # .float() made a copy: it may be changed in place
            w = w.float()
            if power == 2.0:  # |w|^2 is w*w exactly: no abs pass
                w = w.square_() if copied else w.square()
            else:
                w = w.abs_() if copied else w.abs()
                if power != 1.0:
                    w = w.pow_(power)
            dims = range(w.dim())
            wanted = set(dims) if self._dims is None else (self._dims.get(name, set()) | {dim})
            for d in wanted:
                # (an empty dim list would reduce everything: a 1-D tensor is its own per-position sum)
                total = w.sum(dim=[e for e in dims if e != d]) if w.dim() > 1 else w
                self._sums[(name, power, d)] = total.double().cpu()
        return self._sums[key]


class PerGroup(ABC):
    """Base for criteria that score each group on its own from the weights."""

    @abstractmethod
    def score(self, model: nn.Module, group: Group, params: Params | None = None) -> torch.Tensor:
        """One score per channel of ``group`` (``params``: the model's named parameters, if at hand)."""

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], ctx: Context
    ) -> dict[str, torch.Tensor]:
        params = ParamIndex(model, groups)
        return {g.name: self.score(model, g, params) for g in groups}


IMPORTANCE: Registry[type] = Registry("importance criterion")


def get_importance(name: str | Importance) -> Importance:
    """An instance of the criterion registered as ``name`` (or ``name`` itself when callable)."""
    if callable(name) and not isinstance(name, str):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"importance must be a name or a callable, got {type(name).__name__}")
    return IMPORTANCE.get(name)()  # type: ignore[no-any-return]


from . import data, magnitude  # noqa: F401  (registers the criteria)

__all__ = ["IMPORTANCE", "Context", "Importance", "PerGroup", "default_loss", "get_importance"]
