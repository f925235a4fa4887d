"""The plan: which channels to remove, as plain data keyed by tensor names; JSON round trip.

A plan records, for every parameter and buffer it touches, the indices removed along each dim
(``removals``), plus the per-group view it came from (``groups``, for reports). Replaying a plan
needs no tracing: it slices the named tensors of a fresh copy of the model and updates the modules'
size attributes, so the same plan gives the same weights on any copy of the same architecture.
"""

from __future__ import annotations

import array
import json
import math
import numbers
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import ArgumentTypeError, PlanError, PlanMismatchError, shown

if TYPE_CHECKING:
    from .graph import Graph

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupCut:
    """The channels removed from one group: ``removed`` are distinct indices below ``size``, stored as a
    sorted tuple of ``int`` (NumPy integers, a list, a 1-D integer array or tensor are converted).
    Anything else raises :class:`~adaprune.errors.PlanError`."""

    name: str
    size: int
    removed: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise PlanError(f"GroupCut(name={shown(self.name)}): the group name must be a string")
        size = _whole(self.size)
        if size is None:
            raise PlanError(f"GroupCut {shown(self.name)}: size={shown(self.size)} is not an integer >= 0")
        removed = _index_tuple(self.removed, lambda: f"GroupCut {shown(self.name)}: removed", "a sequence")
        if removed and removed[-1] >= size:
            raise PlanError(
                f"GroupCut {shown(self.name)}: removed index {removed[-1]} is not below the group's size {size}"
            )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "removed", removed)


@dataclass(frozen=True)
class Plan:
    """Indices to remove, per tensor (FQN) and dim, plus the per-group summary.

    Checked when built: ``removals`` maps tensor names (``str``) to ``{dim: indices}`` with dims and
    indices non-negative integers, the indices distinct; they are stored as plain dicts of sorted
    tuples of ``int`` (NumPy integers, lists, 1-D integer arrays or tensors are converted). ``groups``
    is a tuple (or list) of :class:`GroupCut`. ``sizes`` (optional) records, per tensor and dim the plan
    cuts, that dim's size in the model the plan was made for: :meth:`check` then refuses a model whose
    size differs, and :func:`adaprune.updates.map_plan` tells a resized layer from a kept one. Anything
    else raises :class:`~adaprune.errors.PlanError` naming the tensor and the dim.
    """

    removals: Mapping[str, Mapping[int, tuple[int, ...]]] = field(default_factory=dict)
    groups: tuple[GroupCut, ...] = ()
    sizes: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        raw: Any = self.removals
        if not isinstance(raw, Mapping):
            raise PlanError(
                f"Plan(removals={shown(raw)}) is {type(raw).__name__}; expected a mapping "
                "{tensor name: {dim: indices}}"
            )
        removals: dict[str, dict[int, tuple[int, ...]]] = {}
        for name, dims in raw.items():
            if not isinstance(name, str):
                raise PlanError(f"Plan removals: tensor name {shown(name)} is not a string")
            if not isinstance(dims, Mapping):
                raise PlanError(f"Plan removals[{shown(name)}] is {shown(dims)}; expected a mapping {{dim: indices}}")
            removals[name] = {_dim_of(name, d): _index_tuple(idx, _where(name, d), "a sequence") for d, idx in dims.items()}
        groups: Any = self.groups
        if not isinstance(groups, (tuple, list)) or not all(isinstance(g, GroupCut) for g in groups):
            raise PlanError(f"Plan(groups={shown(groups)}): expected a tuple of GroupCut")
        object.__setattr__(self, "removals", removals)
        object.__setattr__(self, "groups", tuple(groups))
        object.__setattr__(self, "sizes", _sizes_of(self.sizes, removals))

    def size_of(self, tensor: str, dim: int) -> int | None:
        """The size of ``dim`` of ``tensor`` in the model the plan was made for, when recorded."""
        return self.sizes.get(tensor, {}).get(dim)

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
            **({"sizes": {name: {str(d): n for d, n in sorted(dims.items())} for name, dims in sorted(self.sizes.items())}}
               if self.sizes else {}),
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
        sizes = data.get("sizes", {})
        if not isinstance(sizes, dict) or not all(isinstance(v, dict) for v in sizes.values()):
            raise PlanError(f"plan field 'sizes' must be an object {{tensor: {{dim: size}}}}, got {shown(sizes)}")
        dims_of: dict[str, dict[int, Any]] = {}
        for name, dims in sizes.items():
            for d, n in dims.items():
                dim = _dim(d)
                if dim is None:
                    raise PlanError(f"plan sizes[{shown(name)}] has a dim {shown(d)} that is not a non-negative integer")
                dims_of.setdefault(str(name), {})[dim] = n
        return cls(removals, tuple(_group(g) for g in groups), dims_of)

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

    # -- composition ---------------------------------------------------------------------------
    def then(self, later: Plan, model: nn.Module | None = None) -> Plan:
        """The plan that cuts what this plan cuts and then what ``later`` cuts from the model this
        plan left, stated on the original model (what :func:`adaprune.save` replays).

        ``later``'s indices count the entries this plan kept; a tensor and dim this plan does not cut
        keeps ``later``'s indices as they are. The original size of a dim comes from this plan's
        recorded sizes, else from ``model`` (the original), else from ``later``'s sizes plus what this
        plan removed; a dim whose size is nowhere is a :class:`PlanError`."""
        if not isinstance(later, Plan):
            raise PlanError(f"Plan.then: later={shown(later)} is not a Plan")
        if model is not None and not isinstance(model, nn.Module):
            raise PlanError(f"Plan.then: model={shown(model)} is not an nn.Module (the original model)")
        originals: dict[str, torch.Tensor] = {}
        if model is not None:
            originals.update(dict(model.named_parameters(remove_duplicate=False)))
            originals.update(dict(model.named_buffers(remove_duplicate=False)))

        def original_size(name: str, d: int, first: tuple[int, ...]) -> int:
            size = self.size_of(name, d)
            if size is None and name in originals and d < originals[name].dim():
                size = int(originals[name].shape[d])
            if size is None and later.size_of(name, d) is not None:
                size = int(later.size_of(name, d) or 0) + len(first)
            if size is None:
                raise PlanError(f"Plan.then: the size of dim {d} of {shown(name)} is recorded nowhere; pass model= "
                                "(the original model) to compose the plans")
            return size

        def lift(first: tuple[int, ...], second: tuple[int, ...], size: int) -> tuple[int, ...]:
            cut = set(first)
            kept = [i for i in range(size) if i not in cut]
            if second and second[-1] >= len(kept):
                raise PlanError(f"Plan.then: the later plan removes index {second[-1]} of {len(kept)} kept entries")
            return tuple(sorted(cut | {kept[j] for j in second}))

        removals: dict[str, dict[int, tuple[int, ...]]] = {}
        sizes: dict[str, dict[int, int]] = {}
        for name in sorted(set(self.removals) | set(later.removals)):
            a, b = self.removals.get(name, {}), later.removals.get(name, {})
            for d in sorted(set(a) | set(b)):
                first, second = a.get(d, ()), b.get(d, ())
                if first:
                    size = original_size(name, d, first)
                    removals.setdefault(name, {})[d] = lift(first, second, size)
                    sizes.setdefault(name, {})[d] = size
                else:
                    removals.setdefault(name, {})[d] = second
                    recorded = later.size_of(name, d)
                    if recorded is not None:
                        sizes.setdefault(name, {})[d] = recorded
        groups = {g.name: g for g in self.groups}
        for g in later.groups:
            before = groups.get(g.name)
            if before is None:
                groups[g.name] = g
            else:
                groups[g.name] = GroupCut(g.name, before.size, lift(before.removed, g.removed, before.size))
        return Plan(removals, tuple(groups.values()), sizes)

    # -- checks and predictions ----------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise :class:`PlanMismatchError` unless every entry fits ``model``."""
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        for name, dims in self.removals.items():
            if name not in tensors:
                raise PlanMismatchError(
                    f"the plan removes channels of {shown(name)}, which the model does not have; "
                    "was the plan made for another architecture (or for an already pruned copy)?"
                )
            t = tensors[name]
            for d, idx in dims.items():
                if not 0 <= d < t.dim():
                    raise PlanMismatchError(f"the plan cuts dim {shown(d)} of {shown(name)}, which has {t.dim()} dims")
                made_for = self.size_of(name, d)
                if made_for is not None and made_for != t.shape[d]:
                    raise PlanMismatchError(
                        f"the plan was made for a model whose {shown(name)} has {made_for} entries along dim {d}; "
                        f"this one has {t.shape[d]} (another architecture, or an already pruned copy); "
                        "adaprune.updates.map_plan maps a plan onto an updated model and reports what does not map"
                    )
                if idx and idx[-1] >= t.shape[d]:
                    raise PlanMismatchError(
                        f"the plan removes index {shown(idx[-1])} of dim {d} of {shown(name)}, whose size is "
                        f"{t.shape[d]}; the plan was made for a different (or already pruned) model"
                    )
                if len(idx) >= t.shape[d] > 0:
                    raise PlanMismatchError(
                        f"the plan removes all {t.shape[d]} entries of dim {d} of {shown(name)}"
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


def _whole(value: Any) -> int | None:
    """``value`` as a non-negative ``int`` (a NumPy integer converted; a bool is not one), else None."""
    if type(value) is int:
        return value if value >= 0 else None
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value) if int(value) >= 0 else None
    return None


def _dim_of(name: str, d: Any) -> int:
    """The dim key ``d`` of ``removals[name]`` as an ``int`` (see :func:`_whole`), else a PlanError."""
    dim = _whole(d)
    if dim is None:
        raise PlanError(f"Plan removals[{shown(name)}] has a dim {shown(d)} that is not an integer >= 0")
    return dim


def _where(name: str, d: Any) -> Callable[[], str]:
    """Where an index tuple sits, for a message (formatted only when one is raised)."""
    return lambda: f"Plan removals[{shown(name)}][{_whole(d)}]"


def _increasing(t: tuple[int, ...]) -> bool:
    """Whether the ints ``t`` are strictly increasing (vectorised: plans of LLMs have ~10^5 indices)."""
    if len(t) < 2:
        return True
    try:
        a = np.frombuffer(array.array("q", t), dtype=np.int64)
    except OverflowError:  # beyond int64: compare them as Python ints
        return all(map(operator.lt, t, islice(t, 1, None)))
    return bool((a[1:] > a[:-1]).all())


def _index_tuple(idx: Any, where: Callable[[], str], kind: str) -> tuple[int, ...]:
    """``idx`` as a sorted tuple of distinct non-negative ``int``; else a PlanError naming ``where()``.

    A tuple of sorted ints is returned as it is (the common case, checked in a few vectorised passes);
    lists, ranges, 1-D integer arrays or tensors and NumPy integer scalars are converted."""
    items: Any = idx
    if isinstance(idx, (np.ndarray, torch.Tensor)):
        integer = (
            idx.dtype.kind in "iu" if isinstance(idx, np.ndarray)
            else not (idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool)
        )
        items = idx.tolist() if idx.ndim == 1 and integer else None
    elif not isinstance(idx, (tuple, list, range)):
        items = None
    if items is not None and not set(map(type, items)) <= {int}:  # NumPy integers, or no integers at all
        converted = [_whole(i) for i in items]
        items = None if None in converted else converted
    if items is None:
        raise PlanError(f"{where()} must be {kind} of non-negative integers, got {shown(idx)}")
    out: tuple[int, ...] = items if type(items) is tuple else tuple(items)
    repeats = False
    if not _increasing(out):
        out = tuple(sorted(out))
        repeats = not _increasing(out)
    if out and out[0] < 0:
        raise PlanError(f"{where()} must be {kind} of non-negative integers, got {shown(idx)}")
    if repeats:
        raise PlanError(f"{where()} repeats an index")
    return out


def _indices(idx: Any, where: str) -> tuple[int, ...]:
    if not isinstance(idx, list):
        raise PlanError(f"{where} must be a list of non-negative integers, got {shown(idx)}")
    return _index_tuple(idx, lambda: where, "a list")


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


def plan_from_choice(graph: Graph, chosen: Mapping[str, Sequence[int]]) -> Plan:
    """The :class:`Plan` removing ``chosen[group name]`` channels of each group."""
    removals: dict[str, dict[int, set[int]]] = {}
    cuts = []
    for g in graph.groups:
        channels = chosen.get(g.name, [])
        cuts.append(GroupCut(g.name, g.size, tuple(channels)))
        if channels:
            for tensor, dims in g.removals(list(channels)).items():
                for d, pos in dims.items():
                    removals.setdefault(tensor, {}).setdefault(d, set()).update(pos)
    frozen = {t: {d: tuple(sorted(p)) for d, p in dims.items()} for t, dims in removals.items()}
    sizes: dict[str, dict[int, int]] = {s.tensor: {} for g in graph.groups for s in g.slots if s.tensor in frozen}
    for g in graph.groups:
        for s in g.slots:
            if s.tensor in frozen and s.dim in frozen[s.tensor]:
                sizes[s.tensor][s.dim] = s.size
    return Plan(frozen, tuple(cuts), {t: d for t, d in sizes.items() if d})


def _sizes_of(raw: Any, removals: Mapping[str, Mapping[int, tuple[int, ...]]]) -> dict[str, dict[int, int]]:
    """``Plan.sizes`` checked: per tensor and dim a whole size >= 1, above every index the plan removes there."""
    if not isinstance(raw, Mapping):
        raise PlanError(f"Plan(sizes={shown(raw)}): expected a mapping {{tensor name: {{dim: size}}}}")
    out: dict[str, dict[int, int]] = {}
    for name, dims in raw.items():
        if not isinstance(name, str) or not isinstance(dims, Mapping):
            raise PlanError(f"Plan sizes: {shown(name)}: {shown(dims)} is not tensor name -> {{dim: size}}")
        for d, n in dims.items():
            dim, size = _dim_of(name, d), _whole(n)
            if size is None or size < 1:
                raise PlanError(f"Plan sizes[{shown(name)}][{dim}] = {shown(n)} is not a whole size >= 1")
            cut = removals.get(name, {}).get(dim, ())
            if cut and cut[-1] >= size:
                raise PlanError(f"Plan removes index {cut[-1]} of dim {dim} of {shown(name)}, whose recorded size is {size}")
            out.setdefault(name, {})[dim] = size
    return out
