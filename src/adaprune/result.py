"""What :func:`adaprune.prune` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .cost import Cost
from .cost.registry import COSTS
from .graph import Frozen, Graph
from .graph.reasons import nothing_removed_reason
from .plan import Plan
from .surgery import Reconstruction


@dataclass
class PruneResult:
    """What :func:`prune` did: the (same, now smaller) model, the plan, costs before and after.

    When the plan removes nothing, :attr:`reason` says why (also in :meth:`summary`).
    """

    model: nn.Module
    plan: Plan
    before: Cost
    after: Cost
    graph: Graph
    frozen: list[Frozen] = field(default_factory=list)
    ratio: float = 0.0
    reconstruction: Reconstruction | None = None

    @property
    def reason(self) -> str:
        """Why nothing was pruned ("" when something was): every channel pinned by the model's output,
        by ``ignore``, by ops the graph does not understand (named) or by sizes fixed in the code; every
        group broken by the check after surgery; or the limits (ratio, max_ratio, min_channels, round_to)."""
        if not self.plan.is_empty:
            return ""
        return nothing_removed_reason(self.graph, self.frozen, self.ratio)

    def summary(self) -> str:
        """The headline costs (the cost registry's entries with ``headline``: MACs and params) before ->
        after, e.g. ``MACs 1,000 -> 500 (50.0%), params 20 -> 10 (50.0%)``; and why nothing was pruned."""
        parts = []
        for entry in COSTS.static():
            if entry.headline:
                b, a = entry.value(self.before), entry.value(self.after)
                show = (lambda v: f"{v:,}") if isinstance(b, int) and isinstance(a, int) else entry.show
                parts.append(f"{entry.label} {show(b)} -> {show(a)} ({a / b if b else 1.0:.1%})")
        text = ", ".join(parts)
        return f"{text}; nothing was pruned: {self.reason}" if self.plan.is_empty else text
