"""Blame: which unit a rolled-back step should not have cut as far.

A step cuts several units at once and is judged as a whole, after its recovery; when it is rolled back,
the controller halves the cap of the unit that hurt (:meth:`Controller.protect`) and tries again with a
smaller step. Which unit hurt is not what the step's probes said: a probe masks ``probe_ratio`` of a unit
on the model as it was, and a unit whose first channels cost little can fall off a cliff further down
(a detector's RPN conv cut to a third, under a step that probes had judged cheap). Blaming by the probes
(harm x ratio cut) then caps the wrong unit again and again while the step keeps failing.

So blame is measured. A rolled-back step records its *suspects*: every unit it cut, the channels it cut
there, and the probes' guess (harm x ratio) as the prior. The next step runs on the same weights (a
rollback restores them), so its own probes are mostly served from the probe cache; from the probe budget
it leaves unspent, it measures each suspect's own cut alone (masked on the restored model, no recovery),
highest prior first, and caps the one whose cut hurts most: by half, or k-fold when its cut alone,
before any recovery, costs k > 2 tolerances (harm in the metric's units; a loss's rise is not), so a
unit whose every remaining channel carries signal is protected at once, not after four rollbacks. A
single suspect is blamed without measuring; suspects beyond the budget keep their prior. Measurements go through the prober's cache, so a
suspect's cut that an earlier probe already masked costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from ..graph import Graph, Group
from ..plan import Plan, plan_from_choice
from .probing import Probe
from .state import ControllerState, Suspect

if TYPE_CHECKING:
    from .controller import Controller


def suspects_of(plan: Plan, probes: dict[str, Probe], ratios: dict[str, float], step: int,
                over: float = 2.0) -> list[Suspect]:
    """The units ``plan`` cut (ratio above 0 and a channel removed), most suspect first by the probes;
    ``over``: the step's drop in tolerances."""
    cut = {g.name: list(g.removed) for g in plan.groups if g.removed}
    out = []
    for unit, ratio in ratios.items():
        if ratio <= 0 or unit not in probes:
            continue
        mine = {g.name: cut[g.name] for g in probes[unit].groups if g.name in cut}
        if mine:
            prior = probes[unit].drop * ratio
            out.append(Suspect(unit, mine, prior if math.isfinite(prior) else 1e30, step, over))
    return sorted(out, key=lambda s: -s.prior)


def blame(ctl: Controller, work: nn.Module, graph: Graph, state: ControllerState,
          canonical: Callable[[Plan], str], left: int) -> str:
    """Cap the suspect of the last rollback whose cut hurts most (measured, within ``left`` evaluations);
    clears the suspects and returns the note for the rolled-back step's record ("" with none)."""
    suspects, state.suspects = state.suspects, []
    by_name = {g.name: g for g in graph.groups}
    live = [s for s in suspects if s.cut and all(g in by_name for g in s.cut)]  # (protected since: not cut again)
    if not live:
        return ""
    harms: dict[str, float] = {}
    if len(live) > 1:
        now = ctl.probe_now(work, state)
        for s in live[:max(left, 0)]:
            sub = plan_from_choice(Graph([by_name[g] for g in s.cut]), s.cut)
            harms[s.unit] = ctl.prober.measure(work, sub, now, ctl.lineage, canonical(sub))
    # the most measured harm; unmeasured suspects rank below the measured by their prior (live is in prior order)
    worst = max(live, key=lambda s: (s.unit in harms, harms.get(s.unit, 0.0), s.prior)) if harms else live[0]
    groups: list[Group] = [by_name[g] for g in worst.cut]
    if worst.unit not in harms:
        return ctl.protect(state, groups, worst.unit) + " (by its probe)"
    how = f"measured: masking its cut alone costs {harms[worst.unit]:.4g}, the most of {len(harms)} cut units"
    # a step whose recovered drop came to k > 2 tolerances: the culprit's cap shrinks k-fold, not by half (a
    # unit whose every remaining channel now carries signal is protected in two rollbacks, not four)
    factor = 0.5 if worst.over <= 2.0 else 1.0 / worst.over
    if factor < 0.5:
        how += f"; the step lost {worst.over:.1f} tolerances"
    return ctl.protect(state, groups, worst.unit, factor) + f" ({how})"


__all__ = ["blame", "suspects_of"]
