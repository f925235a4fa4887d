"""The one bisection every search over a pruning scale uses.

Both searches that turn a budget into a cut bisect a single number: the static budget search
(:func:`search_budget`, over an allocator's ratio) and the adaptive allocation
(:func:`adaprune.allocate.adaptive.allocate_adaptive`, over the scale of the cost-per-harm
shares). Each candidate is built for real (a plan whose cost is exact), so the search keeps the
candidate it accepted rather than recomputing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ..cost.budget import static_values
from ..errors import BudgetUnreachableError

if TYPE_CHECKING:
    from ..cost import Cost
    from ..cost.budget import Budget
    from ..plan import Plan

C = TypeVar("C")


def bisect(
    make: Callable[[float], C], ok: Callable[[C], bool], lo: float, hi: float, at_hi: C, steps: int
) -> tuple[float, C]:
    """The least ``x`` in ``[lo, hi]`` whose candidate ``make(x)`` is ``ok``, and that candidate.

    ``ok(make(x))`` is assumed false below some point and true above it (more pruning, lower cost).
    The caller has already built ``at_hi = make(hi)`` and checked that it is ``ok`` (what to do
    when even ``hi`` is not differs: the static search raises, the adaptive step cuts what it can).
    After ``steps`` halvings the returned ``x`` is within ``(hi - lo) / 2**steps`` above the least
    ``ok`` point; the returned candidate is always one that was judged ``ok`` (``at_hi`` if no
    midpoint was).

    Args:
        make: builds the candidate at ``x`` (e.g. the plan at a ratio).
        ok: whether a candidate meets the target (e.g. its exact cost is within the budget).
        lo: the lower end (not ``ok``, or the least value searched).
        hi: the upper end, whose candidate is ``at_hi``.
        at_hi: ``make(hi)``, already known to be ``ok``.
        steps: how many times the interval is halved.

    Returns:
        ``(x, make(x))`` for the least ``ok`` point found.
    """
    best = at_hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = make(mid)
        if ok(cand):
            hi, best = mid, cand
        else:
            lo = mid
    return hi, best


__all__ = ["bisect"]


def search_budget(
    plan_at: Callable[[float], Plan], cost_of: Callable[[Plan], Cost], budget: Budget, original: Cost,
    steps: int = 16,
) -> tuple[float, Plan]:
    """Bisect the allocator's ratio for the least pruning whose exact cost meets ``budget``.

    Uses :func:`bisect`, the bisection the adaptive allocation shares.
    """
    base = static_values(original)

    def met(p: Plan) -> bool:
        return budget.met(static_values(cost_of(p)), base)

    hi = 1.0 - 1e-9
    hi_plan = plan_at(hi)
    if not met(hi_plan):
        raise BudgetUnreachableError(
            "the budget cannot be met under the per-group limits: pruning as far as they allow "
            f"gives {budget.describe(static_values(cost_of(hi_plan)), base)}. Loosen "
            "max_ratio/min_channels/round_to, ignore fewer modules, or ask for a smaller reduction"
        )
    if budget.met(base, base):
        return 0.0, plan_at(0.0)
    return bisect(plan_at, met, 0.0, hi, hi_plan, steps)
