"""Atoms and their union-find.

An *atom* is one slice of one prunable tensor dimension (row ``i`` of a conv weight, entry ``i`` of a
BatchNorm bias ...). Tracing unions atoms that must be removed together; each resulting class is one
*channel*. A class is *pinned* when it touches something whose size the code fixes (the model's
input or output, a literal size, an op the graph does not understand); pinned classes are never
removed. A class is *spanned* when a normalisation or reduction mixes it with its neighbours, so that
zeroing it (mask) and removing it (remove) give different outputs.

``-1`` stands for "no atom": a position whose size is fixed and which nothing may remove. A union of
an atom with ``-1`` pins the atom.

The union-find lives in tensors (parent pointers, and a pinned / spanned flag kept at each root), so
that rules work on whole label tensors at once: a layer of width 4096 is one call, not 4096. The
root of a class is always its smallest atom id (a union hooks the larger root under the smaller).
Pin reasons are kept as (atoms, reason) records and gathered only when asked for.
"""

from __future__ import annotations

import torch

NO_ATOM = -1

FIXED = "its size is fixed by a tensor that cannot shrink"


class Atoms:
    """Union-find over integer atom ids, with pin reasons and a 'spanned' flag per class."""

    def __init__(self) -> None:
        self._n = 0
        self._parent = torch.empty(0, dtype=torch.long)
        self._pinned = torch.empty(0, dtype=torch.bool)  # valid at roots
        self._spanned = torch.empty(0, dtype=torch.bool)  # valid at roots
        self._reasons: list[tuple[torch.Tensor, str]] = []

    def __len__(self) -> int:
        return self._n

    def new(self, n: int) -> torch.Tensor:
        """Create ``n`` fresh atoms; return their ids."""
        start, end = self._n, self._n + n
        if end > self._parent.numel():
            cap = max(2 * self._parent.numel(), end, 1024)
            grow = cap - self._parent.numel()
            self._parent = torch.cat([self._parent, torch.empty(grow, dtype=torch.long)])
            self._pinned = torch.cat([self._pinned, torch.zeros(grow, dtype=torch.bool)])
            self._spanned = torch.cat([self._spanned, torch.zeros(grow, dtype=torch.bool)])
        ids = torch.arange(start, end, dtype=torch.long)
        self._parent[start:end] = ids
        self._n = end
        return ids

    def _find(self, ids: torch.Tensor) -> torch.Tensor:
        """Roots of ``ids`` (a 1-D tensor of valid atoms); the paths walked are compressed."""
        parent = self._parent
        roots = parent[ids]
        up = parent[roots]
        if torch.equal(up, roots):  # the common case: every id is a root or a root's child
            return roots
        while not torch.equal(up, roots):
            roots, up = up, parent[up]
        parent[ids] = roots
        return roots

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        """Map every atom id in ``labels`` to its class root (``-1`` stays ``-1``)."""
        if labels.numel() == 0:
            return labels
        flat = labels.reshape(-1)
        valid = flat >= 0
        if bool(valid.all()):
            out = self._find(flat)
        else:
            out = flat.clone()
            out[valid] = self._find(flat[valid])
        return out.reshape(labels.shape)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ``a[i]`` with ``b[i]`` for every element of the (broadcast) label tensors."""
        if a.shape != b.shape:
            a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        if a.numel() == 0:
            return
        if bool((torch.minimum(a, b) < 0).any()):  # with -1: pinned (a pair of two -1 is nothing)
            fixed_a, fixed_b = a < 0, b < 0
            self.pin(torch.where(fixed_a, b, a)[fixed_a ^ fixed_b], FIXED)
            both = ~(fixed_a | fixed_b)
            a, b = a[both], b[both]
            if a.numel() == 0:
                return
        n = a.numel()
        ends = torch.cat([a, b])
        r = self._find(ends)
        before = r
        while True:  # hook the larger root of each pair under the smaller, until every pair agrees
            ra, rb = r[:n], r[n:]
            if torch.equal(ra, rb):
                break
            self._parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), reduce="amin")
            r = self._find(ends)
        flags = self._pinned[before] | self._spanned[before]
        if bool(flags.any()):  # a merged class keeps the flags of its parts
            hit = before[flags]
            after = self._find(hit)
            for flag in (self._pinned, self._spanned):
                on = flag[hit]
                flag[after[on]] = True

    def union(self, a: int, b: int) -> int:
        self.union_pairs(torch.tensor([a]), torch.tensor([b]))
        return NO_ATOM if a == NO_ATOM and b == NO_ATOM else self.find(b if a == NO_ATOM else a)

    def find(self, a: int) -> int:
        return int(self._find(torch.tensor([a]))[0])

    def union_all(self, labels: torch.Tensor) -> None:
        """Union every atom in ``labels`` into one class (a ``-1`` among them pins it)."""
        values = torch.unique(labels)
        if values.numel() > 1:
            self.union_pairs(values[:1], values[1:])

    def _valid(self, labels: torch.Tensor) -> torch.Tensor:
        ids = labels.reshape(-1)
        return torch.unique(ids[ids >= 0])

    def pin(self, labels: torch.Tensor, reason: str) -> None:
        ids = self._valid(labels)
        if ids.numel():
            self._pinned[self._find(ids)] = True
            self._reasons.append((ids, reason))

    def span(self, labels: torch.Tensor) -> None:
        ids = self._valid(labels)
        if ids.numel():
            self._spanned[self._find(ids)] = True

    def is_pinned(self, labels: torch.Tensor) -> torch.Tensor:
        """Per element of ``labels`` (valid atoms): whether its class is pinned."""
        return self._pinned[self._find(labels.reshape(-1))].reshape(labels.shape)

    def is_spanned(self, labels: torch.Tensor) -> torch.Tensor:
        """Per element of ``labels`` (valid atoms): whether its class is spanned."""
        return self._spanned[self._find(labels.reshape(-1))].reshape(labels.shape)

    def reasons(self, roots: list[int]) -> dict[int, list[str]]:
        """Why each class in ``roots`` is pinned (empty lists for free classes)."""
        out: dict[int, list[str]] = {r: [] for r in roots}
        if not roots:
            return out
        wanted = torch.tensor(sorted(set(roots)), dtype=torch.long)
        for ids, reason in self._reasons:
            hit = self._find(ids)
            hit = torch.unique(hit[torch.isin(hit, wanted)])
            for r in hit.tolist():
                out[r].append(reason)
        return out

    def pinned(self, root: int) -> list[str]:
        """Reasons the class of ``root`` is pinned (empty when it is free)."""
        r = self.find(root)
        return self.reasons([r])[r] if bool(self._pinned[r]) else []

    def spanned(self, root: int) -> bool:
        return bool(self._spanned[self.find(root)])
