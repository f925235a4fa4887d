"""Filling the slack: the last step lands on the budget, not below it.

The allocator scales per-unit ratios until the step's discrete plan meets its target; whole channels
and whole attention heads make that plan undershoot the target (a BERT head is 1/12 of a layer's
attention), so a run ended by such a step would land several percent under the budget, paying accuracy
for cost nobody asked to save. :func:`fill` gives channels back, most important first, while the plan
still meets the target:

1. one common fraction of every cut group's removed channels is restored, bisected (the allocation's
   shape is kept);
2. then, group by group from the finest (the least cost per channel) to the coarsest, as many more of
   its removed channels as still fit (bisected per group): fine-grained groups (FFN neurons, conv
   channels) take up what coarse ones (heads) leave.

It only gives back what the plan removed: a last step that cut only coarse groups (one head per layer,
no FFN neurons) cannot trade a head for neurons, and may still land under the budget by up to a head.
``value(plan)`` is the plan's exact cost in the binding field (a meta-copy count), assumed to rise as
channels are restored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..allocate.search import bisect
from ..graph import Graph
from ..plan import Plan, plan_from_choice


def fill(plan: Plan, graph: Graph, scores: dict[str, torch.Tensor], target: float,
         value: Callable[[Plan], float], round_to: int = 1, tied: list[list[str]] | None = None) -> Plan:
    """``plan`` with as many of its removed channels given back as keep ``value(plan) <= target``,
    in multiples of ``round_to`` per group (so widths stay the multiples the plan kept). ``tied``: lists
    of groups that get back equally many (``uniform_layers``: their widths stay equal)."""
    removed = {g.name: list(g.removed) for g in plan.groups if g.removed}
    if not removed or value(plan) > target:
        return plan
    ties = [[n for n in t if n in removed] for t in (tied or [])]
    ties = [t for t in ties if t] + [[n] for n in removed if not any(n in t for t in (tied or []))]
    order = {n: sorted(idx, key=lambda i: -float(scores[n].reshape(-1)[i])) for n, idx in removed.items()}

    def build(back: dict[str, int]) -> Plan:
        return plan_from_choice(graph, {n: order[n][back.get(n, 0):] for n in order})

    def common(fraction: float) -> dict[str, int]:
        return {n: int(fraction * len(idx)) // round_to * round_to for n, idx in order.items()}

    # 1. one fraction for every group: the largest that fits (the least 1 - fraction, bisected)
    _, back = bisect(lambda x: common(1.0 - x), lambda b: value(build(b)) <= target, 0.0, 1.0, common(0.0), 12)
    back = dict(back)
    # 2. unit by unit (a group, or the groups tied together), finest first
    base = value(build(back))

    def more(unit: list[str], count: int) -> dict[str, int]:  # every member of unit at count channels back
        return {**back, **dict.fromkeys(unit, count)}

    per_channel: dict[int, float] = {}
    for u, unit in enumerate(ties):
        if max(back[n] for n in unit) + round_to <= min(len(order[n]) for n in unit):
            per_channel[u] = value(build(more(unit, max(back[n] for n in unit) + round_to))) - base
    for u in sorted(per_channel, key=lambda k: per_channel[k]):
        unit = ties[u]
        lo, hi = max(back[n] for n in unit) // round_to, min(len(order[n]) for n in unit) // round_to
        slack = target - value(build(back))  # (a cached count: the last plan that fitted)
        if per_channel[u] > 0:  # a group's cost is close to linear in its width: search only what may fit
            if per_channel[u] > slack:
                continue
            hi = min(hi, lo + int(slack / per_channel[u]) + 1)
        while lo < hi:  # the most channels of the unit that still fit
            mid = (lo + hi + 1) // 2
            if value(build(more(unit, mid * round_to))) <= target:
                lo = mid
            else:
                hi = mid - 1
        back = more(unit, lo * round_to)
    return build(back)


__all__ = ["fill"]
