"""Groups: the classes of atoms left after tracing, gathered by the tensor slices they cover."""

from __future__ import annotations

from collections.abc import Collection
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
    unsupported: list[Frozen] = field(default_factory=list)  # the entries of ``frozen`` no rule understood

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    def without(self, names: Collection[str]) -> Graph:
        """This graph minus the named groups (kept whole: protected, or broken by the surgery check)."""
        return Graph([g for g in self.groups if g.name not in names], self.frozen, self.frozen_slots, self.unsupported)


def build_groups(state: TraceState, param_names: set[str]) -> Graph:
    """Gather the free classes of atoms by the set of slots they cover (whole tensors at a time)."""
    atoms = state.atoms
    slot_list = [Slot(name, dim, ids.numel(), name in param_names) for (name, dim), ids in state.slots.items()]
    if not slot_list:
        return Graph([], list(state.frozen), {}, list(state.unsupported))
    sizes = torch.tensor([s.size for s in slot_list], dtype=torch.long)
    roots = all_roots = atoms.roots(torch.cat([ids.reshape(-1) for ids in state.slots.values()]))
    slot = torch.repeat_interleave(torch.arange(len(slot_list)), sizes)
    pos = torch.arange(roots.numel()) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    pinned = atoms.is_pinned(roots)
    frozen_slots = _frozen_slots(state, slot_list, roots[pinned], slot[pinned])
    # one entry per (class, slot) it covers, with its first position there; sorted by class, then slot
    free = ~pinned
    roots, slot, pos = roots[free], slot[free], pos[free]
    key, inverse = torch.unique(roots * len(slot_list) + slot, return_inverse=True)
    first = torch.full((key.numel(),), roots.numel(), dtype=torch.long).scatter_reduce_(0, inverse, pos, "amin")
    pair_root, pair_slot = key // len(slot_list), key % len(slot_list)
    class_roots, counts = torch.unique_consecutive(pair_root, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # a class's signature is the tuple of its slots; its channel order is its position in its first slot
    by_signature = _by_signature(pair_slot, starts, counts)
    order_key = first[starts].tolist()
    class_list = class_roots.tolist()
    spanned = atoms.is_spanned(class_roots).tolist() if class_roots.numel() else []
    # classes are met in the order (first slot, root): groups are named and listed in that order
    signatures = sorted(by_signature, key=lambda sig: (sig[0], class_list[by_signature[sig][0]]))
    members = [sorted(by_signature[sig], key=order_key.__getitem__) for sig in signatures]
    # every class's group and rank, then each (group, slot) pair's channel map cut from one tensor
    n = len(atoms)
    group_of, rank_of = torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    flat = [k for m in members for k in m]
    member_roots = class_roots[torch.tensor(flat, dtype=torch.long)] if flat else class_roots
    group_of[member_roots] = torch.repeat_interleave(
        torch.arange(len(members)), torch.tensor([len(m) for m in members], dtype=torch.long)
    )
    rank_of[member_roots] = torch.cat([torch.arange(len(m)) for m in members]) if members else member_roots
    pair_group = [g for g, sig in enumerate(signatures) for _ in sig]
    pair_slot = torch.tensor([i for sig in signatures for i in sig], dtype=torch.long)
    pair_sizes = sizes[pair_slot]
    offsets = torch.cumsum(sizes, 0) - sizes
    shift = torch.repeat_interleave(offsets[pair_slot] - (torch.cumsum(pair_sizes, 0) - pair_sizes), pair_sizes)
    at = shift + torch.arange(int(pair_sizes.sum()))  # positions of every pair's slot in all_roots
    rr = all_roots[at]
    mine = group_of[rr] == torch.repeat_interleave(torch.tensor(pair_group, dtype=torch.long), pair_sizes)
    maps = torch.where(mine, rank_of[rr], torch.full_like(rr, -1)).split(pair_sizes.tolist())
    groups: list[Group] = []
    used: set[str] = set()
    k = 0
    for gid, sig in enumerate(signatures):
        slots = tuple(slot_list[i] for i in sig)
        exact = not any(map(spanned.__getitem__, members[gid]))
        groups.append(Group(_group_name(slots, used), slots, maps[k : k + len(sig)], len(members[gid]), exact))
        k += len(sig)
    return Graph(groups, list(state.frozen), frozen_slots, list(state.unsupported))


def _by_signature(pair_slot: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> dict[tuple[int, ...], list[int]]:
    """Classes (by index) by their signature, the tuple of the slots they cover (``pair_slot[starts[k] :
    starts[k] + counts[k]]`` for class ``k``), each list ascending. Classes of one slot count at a time,
    as rows of a matrix that ``torch.unique`` groups: no Python loop over classes (a deep MLP has one
    class per hidden unit, tens of thousands)."""
    out: dict[tuple[int, ...], list[int]] = {}
    for c in torch.unique(counts).tolist():
        classes = (counts == c).nonzero().flatten()
        rows = pair_slot[starts[classes].unsqueeze(1) + torch.arange(c)]
        sigs, inverse = _unique_rows(rows)
        order = torch.argsort(inverse, stable=True)
        for sig, ks in zip(sigs.tolist(), classes[order].split(torch.bincount(inverse, minlength=len(sigs)).tolist())):
            out[tuple(sig)] = ks.tolist()
    return out


_PRIME = (1 << 61) - 1


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of ``rows`` and each row's index among them (as ``torch.unique(rows, dim=0,
    return_inverse=True)``, in another order), through a 1-D key per row: a polynomial hash, checked
    (rows whose keys agree must be equal, else the exact 2-D unique is used)."""
    key = torch.zeros(rows.shape[0], dtype=torch.long)
    for j in range(rows.shape[1]):
        key = (key * 1_000_003 + rows[:, j] + 1) % _PRIME
    keys, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((keys.numel(),), rows.shape[0], dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(rows.shape[0]), "amin"
    )
    sigs = rows[first]
    if not torch.equal(sigs[inverse], rows):  # a collision: the exact way
        return torch.unique(rows, dim=0, return_inverse=True)
    return sigs, inverse


def _frozen_slots(
    state: TraceState, slot_list: list[Slot], roots: torch.Tensor, slot: torch.Tensor
) -> dict[str, list[str]]:
    """For each slot with pinned positions: up to three reasons, those of its smallest pinned class."""
    if roots.numel() == 0:
        return {}
    least = torch.full((len(slot_list),), len(state.atoms), dtype=torch.long).scatter_reduce_(0, slot, roots, "amin")
    hit = [(i, r) for i, r in enumerate(least.tolist()) if r < len(state.atoms)]
    reasons = state.atoms.reasons([r for _, r in hit])
    return {f"{slot_list[i].tensor}:{slot_list[i].dim}": sorted(set(reasons[r]))[:3] for i, r in hit}


def _group_name(slots: tuple[Slot, ...], used: set[str]) -> str:
    producers = [s for s in slots if s.dim == 0 and s.is_param and s.tensor.endswith("weight")]
    base = (producers or list(slots))[0].module or slots[0].tensor
    name, k = base, 2
    while name in used:
        name, k = f"{base}#{k}", k + 1
    used.add(name)
    return name
