"""Re-timing before a latency budget is declared met.

Every relative latency bound is a fraction of one number, the original model's latency, measured once at
the start of the run (:meth:`Controller.costs` with three times the repeats). A measurement can come out
high as a whole (the first model timed in a process, a CPU that has not reached its clock yet, a neighbour's
burst that lasts longer than the measurement), and then every bound is loose by that much: on a shared
2-core machine a digits CNN's original measured 3.9 ms where it runs in 2.9, and adapt stopped at 0.57 of
its own figure, 0.68 of the truth, for a 0.6 budget.

So when the costs say the budget is met and latency is bounded, the original and the working model are
timed again, alternately (``ROUNDS`` rounds of ``latency_repeats`` passes each, so drift hits both), and
each keeps the least of its measurements (load only ever adds time; the start's figure for the original
counts too). If the budget still holds on those numbers, the run ends; if not, the state's original and
current latency take them (the new bound is written to the run's warnings) and the run goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..cost.latency import measure_latency
from ..scale.distributed import on_leader
from .state import ControllerState

if TYPE_CHECKING:
    from .controller import Controller

ROUNDS = 3
"""Alternating rounds of timing the original and the working model."""


def retime(ctl: Controller, work: nn.Module, state: ControllerState, values: dict[str, float]) -> bool:
    """Whether the budget still holds with the original and ``work`` timed again side by side; when it does
    not, ``state.original_costs`` and ``values`` take the new latencies (and the run goes on)."""
    budget = ctl.budget
    if not budget.needs_latency:
        return True
    original, now = state.original_costs["latency"], values["latency"]
    for _ in range(ROUNDS):
        for model, which in ((ctl.model, "original"), (work, "now")):
            ms = on_leader(measure_latency, model, ctl.x, backend=budget.backend, threads=budget.threads,  # (rank 0's)
                           repeats=ctl.cfg.latency_repeats).median_ms
            if which == "original":
                original = min(original, ms)
            else:
                now = min(now, ms)
    costs = {**state.original_costs, "latency": original}
    if budget.met({**values, "latency": now}, costs):
        return True
    note = (f"re-timed before stopping: the original runs in {original:.4g} ms (measured {state.original_costs['latency']:.4g} "
            f"ms at the start) and this model in {now:.4g} ms, so the latency budget is not met yet; the bound is "
            f"now {budget.limits(costs)['latency']:.4g} ms")
    state.warnings.append(note)
    state.original_costs, values["latency"] = costs, now
    return False


__all__ = ["ROUNDS", "retime"]
