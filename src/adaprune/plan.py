"""The plan: which channels to remove, as plain data keyed by tensor names; JSON round trip.

A plan records, for every parameter and buffer it touches, the indices removed along each dim
(``removals``), plus the per-group view it came from (``groups``, for reports). Replaying a plan
needs no tracing: it slices the named tensors of a fresh copy of the model and updates the modules'
size attributes, so the same plan gives the same weights on any copy of the same architecture.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ArgumentTypeError, PlanError, PlanMismatchError, shown

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupCut:
    """The channels removed from one group."""

    name: str
    size: int
    removed: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """Indices to remove, per tensor (FQN) and dim, plus the per-group summary."""

    removals: Mapping[str, Mapping[int, tuple[int, ...]]] = field(default_factory=dict)
    groups: tuple[GroupCut, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not any(idx for dims in self.removals.values() for idx in dims.values())

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "removals": {
                name: {str(d): list(idx) for d, idx in sorted(dims.items())}
                for name, dims in sorted(self.removals.items())
            },
            "groups": [
                {"name": g.name, "size": g.size, "removed": list(g.removed)} for g in self.groups
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """A plan from its JSON object; anything else is one :class:`PlanError` naming the field."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if type(version) is not int or version != PLAN_VERSION:
            raise PlanError(
                f"plan version {shown(version)} is not supported (this adaprune reads version {PLAN_VERSION})"
            )
        raw = data.get("removals")
        if not isinstance(raw, dict):
            raise PlanError("plan field 'removals' must be an object {tensor: {dim: [indices]}}")
        removals: dict[str, dict[int, tuple[int, ...]]] = {}
        for name, dims in raw.items():
            if not isinstance(name, str):
                raise PlanError(f"plan removals: tensor name {shown(name)} is not a string")
            if not isinstance(dims, dict):
                raise PlanError(f"plan removals[{shown(name)}] must be an object {{dim: [indices]}}")
            removals[name] = {}
            for d, idx in dims.items():
                dim = _dim(d)
                if dim is None or dim in removals[name]:
                    raise PlanError(
                        f"plan removals[{shown(name)}] has a dim {shown(d)} that is not a non-negative "
                        "integer (written once, without signs or leading zeros)"
                    )
                removals[name][dim] = _indices(idx, f"plan removals[{shown(name)}][{shown(d)}]")
        groups = data.get("groups", [])
        if not isinstance(groups, list):
            raise PlanError(f"plan field 'groups' must be a list of {{name, size, removed}}, got {shown(groups)}")
        return cls(removals, tuple(_group(g) for g in groups))

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        if not isinstance(text, (str, bytes, bytearray)):
            raise ArgumentTypeError(
                f"Plan.from_json reads JSON text (str or bytes), got a {type(text).__name__}; for a dict use "
                "Plan.from_dict"
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bytes that are not UTF-8
            raise PlanError(f"the plan is not valid JSON ({shown(str(exc), 120)})") from None
        return cls.from_dict(data)

    # -- checks and predictions ----------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise :class:`PlanMismatchError` unless every entry fits ``model``."""
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        for name, dims in self.removals.items():
            if name not in tensors:
                raise PlanMismatchError(
                    f"the plan removes channels of {name!r}, which the model does not have; "
                    "was the plan made for another architecture (or for an already pruned copy)?"
                )
            t = tensors[name]
            for d, idx in dims.items():
                if not 0 <= d < t.dim():
                    raise PlanMismatchError(f"the plan cuts dim {d} of {name!r}, which has {t.dim()} dims")
                if idx and idx[-1] >= t.shape[d]:
                    raise PlanMismatchError(
                        f"the plan removes index {idx[-1]} of dim {d} of {name!r}, whose size is "
                        f"{t.shape[d]}; the plan was made for a different (or already pruned) model"
                    )
                if len(idx) >= t.shape[d] > 0:
                    raise PlanMismatchError(
                        f"the plan removes all {t.shape[d]} entries of dim {d} of {name!r}"
                    )

    def _sizes(self, named: Any) -> tuple[int, int]:
        count, nbytes, seen = 0, 0, set()
        for name, t in named:
            if id(t) in seen:
                continue
            seen.add(id(t))
            cut = self.removals.get(name, {})
            n = math.prod(s - len(cut.get(d, ())) for d, s in enumerate(t.shape))
            count += n
            nbytes += n * t.element_size()
        return count, nbytes

    def predicted_params(self, model: nn.Module) -> int:
        """Parameter count of ``model`` after this plan is applied (tied weights counted once)."""
        return self._sizes(model.named_parameters(remove_duplicate=False))[0]

    def predicted_bytes(self, model: nn.Module) -> int:
        """Bytes of parameters and buffers of ``model`` after this plan is applied."""
        named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
        named += list(model.named_buffers(remove_duplicate=False))
        return self._sizes(named)[1]


# -- reading -------------------------------------------------------------------------------------
_DIM = re.compile(r"0|[1-9][0-9]{0,5}")


def _dim(d: Any) -> int | None:
    """A dim key: an int, or its decimal string as JSON writes it; None if it is neither."""
    if type(d) is int:
        return d if d >= 0 else None
    if isinstance(d, str) and _DIM.fullmatch(d):
        return int(d)
    return None


def _is_index(i: Any) -> bool:
    return type(i) is int and i >= 0


def _indices(idx: Any, where: str) -> tuple[int, ...]:
    if not isinstance(idx, list) or not all(_is_index(i) for i in idx):
        raise PlanError(f"{where} must be a list of non-negative integers, got {shown(idx)}")
    out = tuple(sorted(idx))
    if len(set(out)) != len(out):
        raise PlanError(f"{where} repeats an index")
    return out


def _group(g: Any) -> GroupCut:
    """A ``groups`` entry: ``{name: str, size: int >= 0, removed: [indices below size]}``."""
    ok = (
        isinstance(g, dict)
        and isinstance(g.get("name"), str)
        and _is_index(g.get("size"))
        and isinstance(g.get("removed"), list)
        and all(_is_index(i) and i < g["size"] for i in g["removed"])
    )
    if not ok:
        raise PlanError(
            f"plan group entry {shown(g)} is malformed: it needs name (a string), size (an integer >= 0) "
            "and removed (a list of indices below size)"
        )
    return GroupCut(g["name"], g["size"], tuple(g["removed"]))
