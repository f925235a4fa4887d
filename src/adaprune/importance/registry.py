"""The importance registry and what every criterion shares: the calibration context, per-group
helpers and the checks on what a criterion returns. The criteria themselves live in ``data.py`` and
``magnitude.py``; they register here, so neither imports the package back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .._check import a_type, brief, check_batches, check_name, clip, describe
from .._registry import Registry
from ..errors import AdapruneError, ArgumentTypeError, ConfigError, NonFiniteError, shown
from ..graph import Group


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the model's logits (``output``, ``output.logits`` or ``output[0]``).

    ``targets`` are class indices (``-100``: ignored position), one per row of the logits; others
    raise ``ValueError`` (checked here, so that a CUDA kernel never sees an out-of-range index).
    A Hugging Face output that carries its own scalar ``loss`` (the model was given ``labels`` in its
    inputs) is that loss, whatever ``targets`` are.
    """
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor) and own.dim() == 0 and own.is_floating_point():
        return own
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() == 0:
        raise ValueError(
            f"the model's output is a {type(output).__name__}; the default loss needs logits (a tensor, "
            "`.logits` or the first element): pass loss=fn(output, targets) -> scalar that reads this output"
        )
    rows, classes = logits.numel() // max(logits.shape[-1], 1), logits.shape[-1]
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool or targets.numel() != rows:
        got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor) else f"({a_type(targets)})"
        raise ValueError(
            f"targets {got} do not fit logits {tuple(logits.shape)}: the default loss needs {rows} integer "
            "class indices (pass loss= for other targets)"
        )
    flat = targets.reshape(-1)
    if flat.numel() and not bool((((flat >= 0) & (flat < classes)) | (flat == -100)).all()):
        raise ValueError(f"targets hold class indices outside [0, {classes}) (the logits have {classes} classes)")
    return nn.functional.cross_entropy(logits.reshape(-1, classes), flat)


@dataclass
class Context:
    """What data-driven criteria may use: calibration batches and a loss."""

    calibration: Iterable[tuple[Any, Any]] | None = None
    loss: Callable[[Any, Any], torch.Tensor] = default_loss

    def batches(self, criterion: str) -> list[tuple[Any, Any]]:
        """The calibration batches as a list of ``(inputs, targets)``; errors name ``criterion``."""
        label = f"importance={shown(criterion, 40)}"
        if self.calibration is None:
            raise ConfigError(
                f"{label} measures the model on data: pass calibration= an iterable "
                "of (inputs, targets) batches (a DataLoader works), or pick a weight-only criterion "
                "such as 'l2'"
            )
        try:
            check_batches(self.calibration, "calibration")
        except ArgumentTypeError as exc:
            raise ArgumentTypeError(f"{label}: {exc}") from None
        batches = list(self.calibration)
        if not batches:
            raise ConfigError(f"{label}: calibration= yielded no batches")
        for i, b in enumerate(batches):
            if not isinstance(b, (tuple, list)) or len(b) != 2:
                raise ConfigError(
                    f"{label}: calibration batch {i} is {describe(b)}; "
                    "each batch must be an (inputs, targets) pair"
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


def check_scores(out: Any, groups: Sequence[Group], label: str) -> dict[str, torch.Tensor]:
    """``out`` when it maps every group's name to one finite real score per channel, else an error
    naming the criterion (``label``) and the group."""
    where = f"importance criterion {label}"
    if not isinstance(out, Mapping):
        raise ArgumentTypeError(
            f"{where} returned {describe(out)}; expected a dict {{group name: tensor of "
            "one score per channel}"
        )
    for g in groups:
        if g.name not in out:
            raise ConfigError(
                f"{where} returned no scores for group {shown(g.name, 40)} ({len(out)} entries for "
                f"{len(groups)} groups); it must score every group it is given"
            )
        s = out[g.name]
        if not isinstance(s, torch.Tensor):
            raise ArgumentTypeError(
                f"{where} returned {a_type(s)} for group {shown(g.name, 40)}; expected a tensor of "
                f"{g.size} scores"
            )
        if s.dtype.is_complex or s.dtype == torch.bool or s.is_quantized:
            raise ArgumentTypeError(f"{where}: scores of group {shown(g.name, 40)} have dtype {s.dtype}; expected real numbers")
        if tuple(s.shape) != (g.size,):
            raise ConfigError(
                f"{where}: group {shown(g.name, 40)} has {g.size} channels: expected {g.size} scores, got "
                f"{s.numel()} (shape {tuple(s.shape)})"
            )
        bad = int((~torch.isfinite(s)).sum())
        if bad:
            raise NonFiniteError(
                f"{where} gave {bad} NaN/inf scores of {g.size} for group {shown(g.name, 40)}; scores must be "
                "finite (use a large finite value to keep a channel)"
            )
    return dict(out)


class CheckedImportance:
    """A criterion whose output :func:`check_scores` checks on every call (what :func:`get_importance` returns).

    The criterion itself is ``__wrapped__``; its other attributes are reachable through the wrapper.
    """

    def __init__(self, criterion: Importance, label: str, user: bool = False) -> None:
        self.__wrapped__ = criterion
        self.label = label
        self.user = user

    def __call__(self, model: nn.Module, groups: Sequence[Group], ctx: Context) -> dict[str, torch.Tensor]:
        try:
            scores = self.__wrapped__(model, groups, ctx)
        except AdapruneError:
            raise
        except Exception as exc:
            if not self.user:
                raise
            raise ConfigError(  # the caller's own criterion failed: say so in one line, keep the cause
                f"importance: the criterion {self.label} raised {type(exc).__name__}: {clip(str(exc))}; "
                "a criterion is called as criterion(model, groups, ctx) -> {group.name: scores}"
            ) from exc
        return check_scores(scores, groups, self.label)

    def __getattr__(self, name: str) -> Any:  # only for attributes the wrapper lacks (score, seed ...)
        wrapped = self.__dict__.get("__wrapped__")
        if wrapped is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(wrapped, name)


def get_importance(name: str | Importance) -> CheckedImportance:
    """The criterion registered as ``name`` (or ``name`` itself when callable), with its output checked."""
    if isinstance(name, CheckedImportance):
        return name
    if isinstance(name, str):
        check_name(name, IMPORTANCE.names(), "importance", "importance criterion")
        return CheckedImportance(IMPORTANCE.get(name)(), repr(name))
    if callable(name):
        label = getattr(name, "__qualname__", None) or type(name).__qualname__
        return CheckedImportance(name, shown(label, 60) if isinstance(label, str) else type(name).__name__, user=True)
    raise ArgumentTypeError(
        f"importance={brief(name)} is {a_type(name)}; expected a criterion name "
        f"({', '.join(IMPORTANCE.names())}) or a callable criterion(model, groups, ctx)"
    )
