"""Map a plan made for one model onto another (an update of it): by tensor name, through the new model's groups.

A plan names tensors and the indices it removes along their dims. On an updated model (retrained, a
resized head, a layer added or removed) :func:`map_plan` keeps what still means the same thing and
reports the rest, never guessing:

- a tensor the model no longer has, a dim whose size changed since the plan was made (``Plan.sizes``),
  an index beyond the dim: not mapped, one line each in ``MappedPlan.dropped``;
- then, per group of the traced model, the channels the plan removes in each slot it names: mapped
  when every named slot removes the same whole channels; slots disagreeing (the update couples tensors
  the plan cut differently) or cutting part of a channel leave the group uncut, reported;
- a slot of a mapped group that the plan does not name (a tensor the update added, coupled to a cut
  one) is cut with its group and listed in ``MappedPlan.extended``;
- removals on channels the model cannot remove (pinned by an ignored module, an op without a rule)
  are reported as dropped.

A plan none of whose tensors the model has is a :class:`~adaprune.errors.PlanMismatchError`: it was
made for another model, and nothing of it can be mapped. (Below ``adapt``, which warm-starts from it;
``adaprune.updates`` re-exports it.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ArgumentTypeError, ConfigError, PlanMismatchError, shown
from .graph import Graph, Group, trace
from .plan import Plan, plan_from_choice


@dataclass
class MappedPlan:
    """A plan mapped onto a model: ``plan`` (with one :class:`~adaprune.plan.GroupCut` per group of the
    model), the channels it removes per group (``removed``), what did not map (``dropped``, one line per
    module or group), the groups a mapped cut also extends to slots the plan did not name (``extended``)
    and what the mapping could not check (``notes``: a plan without recorded sizes)."""

    plan: Plan
    removed: dict[str, tuple[int, ...]]
    dropped: list[str] = field(default_factory=list)
    extended: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether everything the plan removes was mapped."""
        return not self.dropped

    def report(self) -> str:
        """What was mapped and what was not, in words (one line per finding)."""
        n = sum(len(c) for c in self.removed.values())
        lines = [f"mapped {n} channels in {_count(len(self.removed), 'group')}"
                 + ("" if self.complete else f"; {_count(len(self.dropped), 'part')} of the plan did not map")]
        lines += [f"not mapped: {d}" for d in self.dropped]
        lines += [f"also cut: {e}" for e in self.extended]
        lines += [f"note: {x}" for x in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"removed": {g: list(c) for g, c in self.removed.items()}, "dropped": list(self.dropped),
                "extended": list(self.extended), "notes": list(self.notes)}


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def map_plan(plan: Plan, model: nn.Module, example_inputs: Any = None, *, ignore: Iterable[Any] | None = None,
             graph: Graph | None = None) -> MappedPlan:
    """``plan`` (made for an earlier version of ``model``) mapped onto ``model``: the module doc.

    ``graph`` is ``model``'s traced graph (traced from ``example_inputs`` with ``ignore`` when not given).
    Raises :class:`~adaprune.errors.PlanMismatchError` when nothing of a plan that removes channels maps
    (the model has none of its tensors, or every part of it was dropped).
    """
    if not isinstance(plan, Plan):
        raise ArgumentTypeError(f"map_plan: plan must be an adaprune.Plan, got {type(plan).__name__}")
    shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    shapes.update({n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)})
    cut = {t: {d: idx for d, idx in dims.items() if idx} for t, dims in plan.removals.items()}
    cut = {t: dims for t, dims in cut.items() if dims}
    if not cut:
        return MappedPlan(Plan(), {})
    if not any(t in shapes for t in cut):
        raise PlanMismatchError(
            f"the plan cuts {len(cut)} tensors ({shown(sorted(cut)[:3], 120)} ...) and the model has none of them "
            f"(its tensors are named like {shown(list(shapes)[:3], 120)}): the plan was made for a different model"
        )
    dropped: list[str] = []
    missing: dict[str, list[str]] = {}  # module -> its tensors the model no longer has
    refused: set[tuple[str, int]] = set()  # named slots that did not map: their groups are not cut
    usable: dict[tuple[str, int], torch.Tensor] = {}
    unsized = 0
    for t, dims in sorted(cut.items()):
        if t not in shapes:
            missing.setdefault(t.rpartition(".")[0], []).append(t.rpartition(".")[2])
            continue
        for d, idx in sorted(dims.items()):
            where = f"{t!r} dim {d} ({len(idx)} removed)"
            made = plan.size_of(t, d)
            unsized += made is None
            if d >= len(shapes[t]):
                dropped.append(f"{where}: {t!r} now has {len(shapes[t])} dims")
            elif made is not None and made != shapes[t][d]:
                dropped.append(f"{where}: its size changed from {made} to {shapes[t][d]}")
            elif idx[-1] >= shapes[t][d]:
                dropped.append(f"{where}: index {idx[-1]} is beyond its size {shapes[t][d]}")
            else:
                usable[(t, d)] = torch.tensor(idx, dtype=torch.long)
                continue
            refused.add((t, d))
    for module, names in sorted(missing.items()):
        dropped.insert(0, f"module {module or '(root)'!r} ({_count(len(names), 'tensor')}: {', '.join(names[:4])}"
                          f"{' ...' if len(names) > 4 else ''}): not in the updated model")
    notes = ([(f"the plan records no sizes for {_count(unsized, 'cut dim')} (a plan written by hand, or "
              "by an adaprune that did not record them): a layer resized by the update cannot be told from a kept one there")] if unsized else [])
    if graph is None:
        if example_inputs is None:
            raise ConfigError("map_plan needs example_inputs (to trace the model's groups) or graph=")
        graph = trace(model, example_inputs, ignore=ignore)
    removed: dict[str, tuple[int, ...]] = {}
    extended: list[str] = []
    reported: set[tuple[str, int]] = set(refused)  # slots already said
    for g in graph.groups:
        gone = [s for s in g.slots if (s.tensor, s.dim) in refused]
        found = _group_cut(g, usable)
        if found is None:
            continue
        channels, problem, unnamed = found
        if gone and not problem:
            problem = f"{_count(len(gone), 'slot')} of it did not map ({gone[0].tensor!r} dim {gone[0].dim}, above)"
        if problem:
            dropped.append(f"group {g.name!r}: {problem}; the group is not cut")
            reported.update((s.tensor, s.dim) for s in g.slots)
        elif channels:
            removed[g.name] = channels
            if unnamed:
                names = [f"{s.tensor!r} dim {s.dim}" for s in unnamed]
                extended.append(f"group {g.name!r} also cuts {_count(len(names), 'slot')} the plan does not name "
                                f"(coupled to it in the updated model): {', '.join(names[:4])}"
                                + (" ..." if len(names) > 4 else ""))
    mapped = plan_from_choice(graph, removed)
    kept_whole: dict[str, int] = {}
    for (t, d), positions in sorted(usable.items()):
        left = set(positions.tolist()) - set(mapped.removals.get(t, {}).get(d, ()))
        if left and (t, d) not in reported:
            kept_whole[t.rpartition(".")[0]] = kept_whole.get(t.rpartition(".")[0], 0) + len(left)
    dropped += [f"module {m!r}: {n} removed entries fall on channels the updated model keeps whole (the module or "
                "one it feeds is in ignore=, or an op adaprune does not know freezes them)" for m, n in kept_whole.items()]
    if not removed:
        raise PlanMismatchError(
            "nothing of the plan maps onto this model (" + "; ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else "")
            + "): it was made for another model, or the update resized every layer it cuts")
    return MappedPlan(mapped, removed, dropped, extended, notes)


def _group_cut(group: Group, usable: dict[tuple[str, int], torch.Tensor]
               ) -> tuple[tuple[int, ...], str, list[Any]] | None:
    """The channels of ``group`` the usable removals take out (``None``: the plan names none of its slots),
    what stops the mapping (``""`` when nothing does) and the slots the plan does not name."""
    named: list[tuple[Any, frozenset[int]]] = []
    unnamed = []
    for slot, owner in zip(group.slots, group.channel_of):
        idx = usable.get((slot.tensor, slot.dim))
        owned = owner >= 0
        if idx is None:
            if bool(owned.any()):
                unnamed.append((slot, owner))
            continue
        hit = owner[idx]
        hit = hit[hit >= 0]
        if not hit.numel():
            continue
        per_channel = torch.bincount(owner[owned], minlength=group.size)
        taken = torch.bincount(hit, minlength=group.size)
        partial = ((taken > 0) & (taken < per_channel)).nonzero().flatten().tolist()
        if partial:
            return (), (f"the plan removes part of channel {partial[0]} in {slot.tensor!r} dim {slot.dim} "
                        f"({int(taken[partial[0]])} of its {int(per_channel[partial[0]])} entries)"), []
        named.append((slot, frozenset((taken > 0).nonzero().flatten().tolist())))
    if not named:
        return None
    first_slot, first = named[0]
    for slot, channels in named[1:]:
        if channels != first:
            return (), (f"the plan removes {len(first)} channels of {first_slot.tensor!r} dim {first_slot.dim} but "
                        f"{len(channels)} others of {slot.tensor!r} dim {slot.dim}, which the updated model couples"), []
    if len(first) >= group.size:
        return (), f"the plan removes all {group.size} channels", []
    # a slot the plan does not name is cut with its group only where it owns a removed channel's positions
    chosen = torch.tensor(sorted(first), dtype=torch.long)
    extra = [s for s, owner in unnamed if bool(torch.isin(owner, chosen).any())]
    return tuple(sorted(first)), "", extra


__all__ = ["MappedPlan", "map_plan"]
