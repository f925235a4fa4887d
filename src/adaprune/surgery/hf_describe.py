"""Per-layer sizes in words, for the messages of :mod:`adaprune.surgery.hf_config` (pure, bounded).

``describe({"model.layers.0.mlp": {"ffn": 64}, "model.layers.1.mlp": {"ffn": 96}}, "ffn")`` is
``"layer 0: 64 FFN neurons, layer 1: 96 FFN neurons"``; layers sharing a value are grouped
(``"layers 0, 2-5: 9 heads; layer 1: 10 heads"``). A message names a few and counts the rest
(``listing(..., budget)``: ``"...; and 9 more"``), so it stays one short line for any depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NOUNS = {"hidden": ("hidden width", "hidden width"), "heads": ("head", "heads"), "kv_heads": ("KV head", "KV heads"),
         "head_dim": ("head size", "head size"), "ffn": ("FFN neuron", "FFN neurons")}

Entry = tuple[str, bool]
"""One value and the layers that have it (``"layers 0, 2-5: 9 heads"``), and whether it names one layer."""


def _layer(name: str) -> tuple[str, int] | None:
    """``("model.layers", 3)`` for ``"model.layers.3.self_attn"``: the prefix and the first index."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def _ranges(ids: list[int], limit: int = 4) -> str:
    """``"0, 2-5, 7"``: runs of consecutive ids, at most ``limit`` of them, then ``"..."``."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def entries(sizes: Mapping[str, Mapping[str, int]], kind: str) -> list[Entry]:
    """One :data:`Entry` per value of ``kind``, in first-seen order; layers are numbered when all modules
    sit in one numbered list (``model.layers.N``), else named by module (two, then ``...``)."""
    found = [(n, s[kind]) for n, s in sizes.items() if kind in s]
    keys = [_layer(n) for n, _ in found]
    prefixes = {k[0] for k in keys if k is not None}
    same = None not in keys and len(prefixes) == 1
    by_value: dict[int, list[Any]] = {}
    for (name, v), key in zip(found, keys):
        label: Any = key[1] if same and key is not None else name
        if label not in by_value.setdefault(v, []):
            by_value[v].append(label)
    out = []
    for v, labels in by_value.items():
        noun = NOUNS[kind][v != 1]
        if same:
            text = f"layer{'s' if len(labels) > 1 else ''} {_ranges(sorted(labels))}: {v} {noun}"
        else:
            text = f"{', '.join(map(str, labels[:2]))}{' ...' if len(labels) > 2 else ''}: {v} {noun}"
        out.append((text, len(labels) == 1))
    return out


def listing(items: list[Entry], budget: int | None = None) -> str:
    """The entries joined (by ``", "`` when each names one layer, else ``"; "``) as far as ``budget``
    characters allow, then ``"and N more"``; the first is always there (clipped to ``budget``)."""
    if not items:
        return ""
    sep = ", " if all(single for _, single in items) else "; "
    first = items[0][0]
    out = first if budget is None or len(first) <= budget else first[: budget - 3] + "..."
    for i, (text, _) in enumerate(items[1:], 1):
        if budget is not None and len(out) + len(sep) + len(text) > budget:
            return f"{out}{sep}and {len(items) - i} more"
        out += sep + text
    return out


def describe(sizes: Mapping[str, Mapping[str, int]], kind: str, budget: int | None = None) -> str:
    """Which layers have which ``kind``, in words (at most about ``budget`` characters)."""
    return listing(entries(sizes, kind), budget)
