"""Groups: the classes of atoms left after tracing, gathered by the tensor slices they cover."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tracer import Frozen, TraceState


@dataclass(frozen=True)
class Slot:
    """One prunable dim of one parameter or buffer."""

    tensor: str
    dim: int
    size: int
    is_param: bool

    @property
    def module(self) -> str:
        return self.tensor.rpartition(".")[0]


@dataclass
class Group:
    """Channels that cover the same slots and are removed as units.

    ``channel_of[i][p]`` is the channel (index into this group) that position ``p`` of slot ``i``
    belongs to, or ``-1`` when the position belongs to another group or cannot be removed.
    """

    name: str
    slots: tuple[Slot, ...]
    channel_of: tuple[torch.Tensor, ...]
    size: int
    exact: bool

    def positions(self, channel: int) -> dict[tuple[str, int], list[int]]:
        """Which positions of which ``(tensor, dim)`` removing ``channel`` removes."""
        out = {}
        for slot, owner in zip(self.slots, self.channel_of):
            pos = (owner == channel).nonzero().flatten().tolist()
            if pos:
                out[(slot.tensor, slot.dim)] = pos
        return out

    def removals(self, channels: list[int]) -> dict[str, dict[int, list[int]]]:
        """Positions to remove per tensor and dim when ``channels`` of this group go."""
        chosen = torch.zeros(self.size + 1, dtype=torch.bool)
        chosen[torch.tensor(channels, dtype=torch.long)] = True
        out: dict[str, dict[int, list[int]]] = {}
        for slot, owner in zip(self.slots, self.channel_of):
            hit = chosen[owner].logical_and(owner >= 0)
            pos = hit.nonzero().flatten().tolist()
            if pos:
                out.setdefault(slot.tensor, {})[slot.dim] = pos
        return out


@dataclass
class Graph:
    """What tracing found: the prunable groups, and what is frozen and why."""

    groups: list[Group]
    frozen: list[Frozen] = field(default_factory=list)
    frozen_slots: dict[str, list[str]] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")


def build_groups(state: TraceState, param_names: set[str]) -> Graph:
    atoms = state.atoms
    slot_list: list[Slot] = []
    slot_roots: list[torch.Tensor] = []
    members: dict[int, dict[int, int]] = {}  # root -> slot index -> first position
    frozen_slots: dict[str, list[str]] = {}
    pinned: dict[int, list[str]] = {}
    for (name, dim), ids in state.slots.items():
        slot_root = atoms.roots(ids)
        idx = len(slot_list)
        slot_list.append(Slot(name, dim, ids.numel(), name in param_names))
        slot_roots.append(slot_root)
        order = torch.argsort(slot_root, stable=True)
        uniq, counts = torch.unique_consecutive(slot_root[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        first_pos = order[starts].tolist()
        for r, start in zip(uniq.tolist(), first_pos):
            if r not in pinned:
                pinned[r] = atoms.pinned(r)
            if pinned[r]:
                frozen_slots.setdefault(f"{name}:{dim}", sorted(set(pinned[r]))[:3])
                continue
            members.setdefault(r, {})[idx] = start
    by_signature: dict[tuple[int, ...], list[int]] = {}
    for r, where in members.items():
        by_signature.setdefault(tuple(sorted(where)), []).append(r)
    groups: list[Group] = []
    first: list[int] = []
    used: set[str] = set()
    for sig, roots in by_signature.items():
        roots.sort(key=lambda r: members[r][sig[0]])
        keys = torch.tensor(sorted(roots), dtype=torch.long)
        rank = {r: c for c, r in enumerate(roots)}
        values = torch.tensor([rank[int(k)] for k in keys], dtype=torch.long)
        channel_of = []
        for i in sig:
            rr = slot_roots[i]
            pos = torch.searchsorted(keys, rr).clamp(max=keys.numel() - 1)
            channel_of.append(torch.where(keys[pos] == rr, values[pos], torch.full_like(rr, -1)))
        slots = tuple(slot_list[i] for i in sig)
        name = _group_name(slots, used)
        exact = not any(atoms.spanned(r) for r in roots)
        groups.append(Group(name, slots, tuple(channel_of), len(roots), exact))
        first.append(min(sig))
    groups = [g for _, g in sorted(zip(first, groups), key=lambda t: t[0])]
    return Graph(groups, list(state.frozen), frozen_slots)


def _group_name(slots: tuple[Slot, ...], used: set[str]) -> str:
    producers = [s for s in slots if s.dim == 0 and s.is_param and s.tensor.endswith("weight")]
    base = (producers or list(slots))[0].module or slots[0].tensor
    name, k = base, 2
    while name in used:
        name, k = f"{base}#{k}", k + 1
    used.add(name)
    return name
