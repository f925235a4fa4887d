"""Atoms and their union-find.

An *atom* is one slice of one prunable tensor dimension (row ``i`` of a conv weight, entry ``i`` of a
BatchNorm bias ...). Tracing unions atoms that must be removed together; each resulting class is one
*channel*. A class is *pinned* when it touches something whose size the code fixes (the model's
input or output, a literal size, an op the graph does not understand); pinned classes are never
removed. A class is *spanned* when a normalisation or reduction mixes it with its neighbours, so that
zeroing it (mask) and removing it (remove) give different outputs.

``-1`` stands for "no atom": a position whose size is fixed and which nothing may remove. A union of
an atom with ``-1`` pins the atom.
"""

from __future__ import annotations

import torch

NO_ATOM = -1


class Atoms:
    """Union-find over integer atom ids, with pin reasons and a 'spanned' flag per class."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._pins: dict[int, list[str]] = {}
        self._spanned: set[int] = set()

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, n: int) -> torch.Tensor:
        """Create ``n`` fresh atoms; return their ids."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        parent = self._parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        if a == NO_ATOM and b == NO_ATOM:
            return NO_ATOM
        if a == NO_ATOM or b == NO_ATOM:
            root = self.find(b if a == NO_ATOM else a)
            self._pins.setdefault(root, []).append("its size is fixed by a tensor that cannot shrink")
            return root
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra > rb:
            ra, rb = rb, ra
        self._parent[rb] = ra
        if rb in self._pins:
            self._pins.setdefault(ra, []).extend(self._pins.pop(rb))
        if rb in self._spanned:
            self._spanned.discard(rb)
            self._spanned.add(ra)
        return ra

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ``a[i]`` with ``b[i]`` for every element of the (broadcast) label tensors."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        keep = a != b
        if not bool(keep.any()):
            return
        n = len(self._parent) + 2  # encode each pair as one integer (ids are >= -1)
        keys = torch.unique((a[keep] + 1) * n + (b[keep] + 1))
        for x, y in zip(((keys // n) - 1).tolist(), ((keys % n) - 1).tolist()):
            self.union(x, y)

    def union_all(self, labels: torch.Tensor) -> None:
        """Union every atom in ``labels`` into one class (a ``-1`` among them pins it)."""
        values = torch.unique(labels).tolist()
        for v in values[1:]:
            self.union(values[0], v)

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        """Map every atom id in ``labels`` to its class root (``-1`` stays ``-1``)."""
        if labels.numel() == 0:
            return labels
        uniq, inverse = torch.unique(labels, return_inverse=True)
        mapped = torch.tensor(
            [self.find(u) if u != NO_ATOM else NO_ATOM for u in uniq.tolist()], dtype=torch.long
        )
        return mapped[inverse]

    def pin(self, labels: torch.Tensor, reason: str) -> None:
        for u in torch.unique(labels).tolist():
            if u != NO_ATOM:
                self._pins.setdefault(self.find(u), []).append(reason)

    def span(self, labels: torch.Tensor) -> None:
        for u in torch.unique(labels).tolist():
            if u != NO_ATOM:
                self._spanned.add(self.find(u))

    def pinned(self, root: int) -> list[str]:
        """Reasons the class of ``root`` is pinned (empty when it is free)."""
        return self._pins.get(self.find(root), [])

    def spanned(self, root: int) -> bool:
        return self.find(root) in self._spanned
