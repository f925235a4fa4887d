"""Warm start: begin an adapt run from a previous run's plan, mapped onto the updated model.

``adapt(updated, x, task, budget, warm_start=previous)`` maps the previous plan onto the updated model
(:func:`adaprune.updates.map_plan`: by tensor name, through the updated model's groups; what does not
map is reported in the result, never guessed) and spends its first steps on it:

1. the whole mapped plan is tried as one step (recovery: ``warm_finetune_steps``, by default
   ``finetune_steps`` for each of the fewest ordinary steps that could cut as much) and judged like any
   step, against the tolerance on the task as it is now; a verdict the validation set leaves undecided
   (every point drop within tolerance, an interval's upper end above it) gets ``finetune_steps`` more
   recovery and is judged once again, before anything is grown back (cheaper than a grow-back, which costs
   a recovery per try). Accepted: the run goes on as usual from there,
   so a plan that still fits costs one evaluation plus one recovery, and any budget left unmet is cut
   by ordinary steps (which probe the updated model, so they cut where it now has slack);
2. rolled back: the update needs some of the channels the plan removes. Each cut group's harm is measured
   alone on the updated model (its channels masked, one evaluation per group, at most ``probe_budget``
   groups: those with the most channels removed) and the groups whose cut costs the most harm per cost
   saved are **grown back** (half of the groups still cut, at least one): the next try cuts the plan
   without them from the updated model, so they keep the updated model's own weights (``state.warm``:
   ``grow`` holds them until that try starts, ``restored`` the groups grown back in the tries that ran);
3. after ``WARM_TRIES`` tries rolled back, or when nothing is left to cut, the warm start is abandoned
   and the run continues from the unpruned updated model like a run from scratch.

Everything the warm start decided is in ``state.warm`` (so a killed run resumes in the middle of it)
and in each step's reason; the mapping's identity is part of the run's settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..cost.budget import static_values
from ..cost.predict import CostPredictor
from ..graph import Graph, trace
from ..plan import plan_from_choice
from ..surgery.check import find_broken
from .attempts import attempt
from .state import ControllerState

if TYPE_CHECKING:
    from ..mapping import MappedPlan
    from .controller import Controller

WARM_TRIES = 3
"""Tries of the warm plan (the whole plan, then with groups grown back) before the warm start is abandoned."""


def warm_state(mapped: MappedPlan) -> dict[str, Any]:
    """The warm start's part of the controller state, before its first try."""
    removed = {g: list(c) for g, c in sorted(mapped.removed.items())}
    key = hashlib.sha256(json.dumps(removed, sort_keys=True).encode()).hexdigest()[:16]
    return {"key": key, "removed": removed, "dropped": list(mapped.dropped), "extended": list(mapped.extended),
            "notes": list(mapped.notes), "harms": {}, "restored": [], "grow": [], "tries": 0, "outcome": ""}


def warm_key(mapped: MappedPlan | None) -> dict[str, str]:
    """What a resumed run must share with its start: the mapped plan's identity (nothing without a warm start)."""
    return {} if mapped is None else {"warm_start": warm_state(mapped)["key"]}


def warm_step(ctl: Controller, work: nn.Module, state: ControllerState, values: dict[str, float]) -> nn.Module:
    """One try of the warm plan (module doc); returns the model to go on with."""
    w = state.warm
    assert w is not None
    torch.manual_seed(ctl.cfg.seed * 100_003 + state.step)  # as every step: a resumed run replays it identically
    if not w["removed"]:
        w["outcome"] = "abandoned"
        state.warnings.append("warm start: the previous plan removes nothing; adapting from the full width")
        return work
    w["restored"], w["grow"] = [*w["restored"], *w["grow"]], []  # this try leaves them uncut
    restored = set(w["restored"])
    graph = trace(work, ctl.x, ignore=ctl.ignore)
    known = {g.name for g in graph.groups}
    chosen = {g: c for g, c in w["removed"].items() if g not in restored and g in known}
    plan = plan_from_choice(graph, chosen)
    broken = find_broken(work, plan, graph, ctl.x) if not plan.is_empty else []
    if broken:  # a cut the updated model cannot take: grown back (kept), said in the reason below
        bad = {f.module for f in broken}
        keep = [g.name for g in graph.groups if g.name in chosen and any(s.module in bad for s in g.slots)]
        w["restored"] = [*w["restored"], *keep]
        chosen = {g: c for g, c in chosen.items() if g not in keep}
        plan = plan_from_choice(graph, chosen)
    if plan.is_empty:
        w["outcome"] = "abandoned"
        state.warnings.append("warm start abandoned: every group of the previous plan breaks the updated model")
        return work
    field, _ = ctl.binding(state, values)
    field = "macs" if field == "latency" else field  # a latency cut is sized by the MACs it saves, as in a step
    predictor = CostPredictor(work, ctl.x)
    size = 1.0 - static_values(predictor(plan))[field] / max(values[field], 1e-12)
    w["tries"] += 1
    label = (f"warm start (try {w['tries']}): the previous plan" if not w["restored"] else
             f"warm start (try {w['tries']}): the previous plan with {len(w['restored'])} group"
             f"{'s' if len(w['restored']) > 1 else ''} grown back "
             f"({', '.join(w['restored'][:6])}{' ...' if len(w['restored']) > 6 else ''})")
    snapshot, record, _ = attempt(ctl, work, state, plan, size, ctl.warm_steps(size), more=ctl.cfg.finetune_steps)
    if record.accepted:
        w["outcome"] = "kept" if not w["restored"] else "grown back"
        record.reason = f"{label}: {record.reason}"
        return work
    if not w["harms"]:  # measured once, on the updated model, for every group the plan cuts
        w["harms"] = cut_harms(ctl, snapshot, graph, chosen, state, field)
    order = sorted(chosen, key=lambda g: w["harms"].get(g, 0.0), reverse=True)
    grow = order[:max(1, len(order) // 2)]
    if w["tries"] >= WARM_TRIES or len(grow) == len(order):
        w["outcome"] = "abandoned"
        record.reason = f"{label}: {record.reason}: rolled back; warm start abandoned, adapting the updated model from its full width"
    else:
        w["grow"] = grow
        record.reason = f"{label}: {record.reason}: rolled back; growing back {', '.join(grow)}"
    return snapshot


def cut_harms(ctl: Controller, model: nn.Module, graph: Graph, chosen: dict[str, list[int]],
              state: ControllerState, field: str) -> dict[str, float]:
    """Per group of ``chosen``, the harm of its cut alone on ``model`` (masked, measured, unmasked) per unit
    of the cost ``field`` it saves (a latency saving is judged on the MACs it saves): at most
    ``probe_budget`` groups are measured, those removing the most channels first; the others are 0 (not
    grown back before a measured one). A cut that makes the metric NaN is the most harm there is."""
    predictor = CostPredictor(model, ctl.x)
    full = static_values(predictor(plan_from_choice(graph, {})))[field]
    now = ctl.probe_now(model, state, cached=False)
    names = sorted(chosen, key=lambda g: len(chosen[g]), reverse=True)[:ctl.cfg.probe_budget]
    plans = {name: plan_from_choice(graph, {name: chosen[name]}) for name in names}
    keys = {name: (-1, plan.to_json()) for name, plan in plans.items()}  # (lineage -1: measured now, whatever the cache)
    ctl.prober.evaluate(model, [(keys[name], plans[name]) for name in names])  # all at once, on the run's executor
    out: dict[str, float] = {}
    for name in names:
        saved = max(full - static_values(predictor(plans[name]))[field], 1e-12)
        harm = ctl.prober.harm_of(keys[name], now)
        out[name] = harm / saved if math.isfinite(harm) else sys.float_info.max  # (finite: state.json is JSON)
    return out


__all__ = ["WARM_TRIES", "cut_harms", "warm_key", "warm_state", "warm_step"]
