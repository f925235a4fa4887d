"""Why a plan removes nothing, in words, from what tracing recorded (pins, frozen ops, groups)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .atoms import FIXED
from .groups import Graph
from .tracer import IGNORED, OUTPUT, Frozen

SURGERY_CHECK = "surgery check"
"""The op name of groups kept whole because cutting them broke the model (``surgery.check.find_broken``)."""

_IGNORED_MODULE = re.compile(r"module '(.*?)' " + re.escape(IGNORED))


def _listed(items: Sequence[str], limit: int = 4) -> str:
    items = list(dict.fromkeys(items))
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def nothing_removed_reason(graph: Graph, frozen: Sequence[Frozen], ratio: float) -> str:
    """Why a plan for ``graph`` removes no channel (one sentence).

    Args:
        graph: the traced graph.
        frozen: its frozen notes plus those of the check after surgery (``PruneResult.frozen``).
        ratio: the ratio the allocator was given.
    """
    checked = [f for f in frozen if f.op == SURGERY_CHECK]
    broken = {f.module for f in checked}
    usable = [g for g in graph.groups if g.name not in broken]
    if graph.groups and not usable:
        first = f" (group {checked[0].module}: {checked[0].reason})" if len(checked) == 1 else ""
        return (
            "every prunable group breaks the model when cut (surgery check: sizes written in the code); "
            f"groups {_listed([g.name for g in graph.groups])}{first}"
        )
    if usable:
        if ratio <= 0:
            return "the limits: ratio=0 removes no channel"
        largest = max(g.size for g in usable)
        return (
            f"the limits: at ratio={ratio:g} the per-group limits (max_ratio, min_channels, round_to) keep "
            f"every group whole ({len(usable)} group(s), the largest of {largest} channel(s))"
        )
    return "every channel is pinned: " + "; ".join(_pin_causes(graph))


def _pin_causes(graph: Graph) -> list[str]:
    reasons = [r for rs in graph.frozen_slots.values() for r in rs]
    causes = []
    if any(r.startswith(OUTPUT) for r in reasons):
        causes.append("by the model's output (a width that leaves the model keeps its size)")
    ignored = [m.group(1) for r in reasons for m in [_IGNORED_MODULE.search(r)] if m]
    if ignored:
        causes.append(f"by `ignore` (the outputs of {_listed([repr(n) for n in ignored])})")
    if graph.unsupported:
        ops = [f"{f.op!r} in {f.module}" for f in graph.unsupported]
        causes.append(f"by ops the graph does not understand ({_listed(ops)})")
    unsupported = set(graph.unsupported)
    fixed = [f"{f.op!r} in {f.module}" for f in graph.frozen if f not in unsupported and f.op != SURGERY_CHECK]
    if fixed:
        causes.append(f"by sizes fixed in the code ({_listed(fixed)})")
    if any(r.startswith(FIXED) for r in reasons):
        causes.append("by the model's inputs or other tensors of fixed size")
    return causes or ["the model has no layer with prunable weights"]
