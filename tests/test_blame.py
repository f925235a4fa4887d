"""A rolled-back step's blame is measured: each unit it cut, masked alone on the restored model, and the one
whose cut hurts most is capped, not the one its probe ranked first (the probe masks only ``probe_ratio``,
and a unit can be cheap there and fall off a cliff further down)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.adapt import blame as blame_module
from adaprune.adapt import edge
from adaprune.adapt.state import ControllerState, Suspect
from adaprune.errors import FileFormatError
from small_nets import X8, alive, mlp3

X, net = X8, mlp3


class Cliff(ap.Task):
    """Each neuron cut from the first layer costs 0.004 (its probe looks dear); the second layer's cost
    0.0005 each until more than 16 of its 32 are cut, then 0.5 at once (its probe, a quarter masked,
    looks cheap)."""

    metric, higher_is_better = "score", True

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        a, b = 32 - alive(model[0]), 32 - alive(model[2])
        return {"score": 1.0 - 0.004 * a - 0.0005 * b - (0.5 if b > 16 else 0.0)}


def rollbacks(res: ap.AdaptResult) -> list[str]:
    return [h.reason for h in res.history if not h.accepted and h.cuts]


def test_the_unit_whose_own_cut_hurts_is_capped_not_the_one_the_probes_rank_first() -> None:
    res = ap.adapt(net(), X[:2], Cliff(), ap.Budget(macs=0.4), tolerance=0.1, ignore=["4"], step=0.6,
                   max_iterations=6)
    first = rollbacks(res)[0]
    assert "capped 2 " in first and "measured" in first, first
    assert res.budget_met, res.message
    assert alive(res.model[2]) >= 16  # not over the cliff


def test_blamed_by_the_probes_alone_the_run_caps_the_wrong_unit(monkeypatch) -> None:
    """The baseline (no measurement: blame by probe harm x ratio) caps the first layer, which was not what
    hurt: the test above fails with it."""
    controller = sys.modules["adaprune.adapt.controller"]
    monkeypatch.setattr(controller, "blame", lambda ctl, work, graph, state, canonical, left:
                        blame_module.blame(ctl, work, graph, state, canonical, 0))
    res = ap.adapt(net(), X[:2], Cliff(), ap.Budget(macs=0.4), tolerance=0.1, ignore=["4"], step=0.6,
                   max_iterations=6)
    first = rollbacks(res)[0]
    assert "capped 0 " in first and "by its probe" in first, first


def test_suspects_survive_a_resume_and_a_malformed_one_is_named() -> None:
    state = ControllerState(suspects=[Suspect("2", {"2": [0, 3]}, 0.25, 4)])
    again = ControllerState.from_json(state.to_json())
    assert again.suspects == state.suspects
    bad = state.to_json().replace('"prior": 0.25', '"prior": "high"')
    with pytest.raises(FileFormatError, match="suspects"):
        ControllerState.from_json(bad)


class Misleading(ap.Task):
    """The first layer's neurons cost 0.02 each, the second's 0.0005; the reported loss never moves (as a
    detector's training loss can stay put while its mAP falls)."""

    metric, higher_is_better = "score", True

    def __init__(self, tracks: bool) -> None:
        self.loss_tracks_metric = tracks

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        a, b = 32 - alive(model[0]), 32 - alive(model[2])
        return {"score": 1.0 - 0.02 * a - 0.0005 * b, "loss": 1.0}


def first_cuts(tracks: bool) -> dict[str, int]:
    res = ap.adapt(net(), X[:2], Misleading(tracks), ap.Budget(macs=0.6), tolerance=0.5, ignore=["4"], step=0.4,
                   max_iterations=1)
    return res.history[0].cuts


def test_a_loss_that_does_not_track_the_metric_is_not_what_probes_measure() -> None:
    cuts = first_cuts(False)  # harm by the metric: the cheap second layer is cut, the dear first one spared
    assert cuts.get("2", 0) > 3 * cuts.get("0", 0), cuts
    blind = first_cuts(True)  # harm by the loss, which never moves: the probes cannot tell the layers apart
    assert blind.get("2", 0) <= 3 * blind.get("0", 0), blind


def test_a_task_object_that_is_not_a_task_subclass_keeps_its_loss_tracks_metric() -> None:
    from adaprune.task import as_task

    class Duck:
        metric, higher_is_better, loss_tracks_metric = "score", True, False

        def evaluate(self, model: nn.Module) -> dict[str, float]:
            return {"score": 1.0}

    assert as_task(Duck()).loss_tracks_metric is False
    assert as_task(Misleading(True)).loss_tracks_metric is True


class Flat(ap.Task):
    """Any cut at all costs 0.06 (over half the tolerance of 0.1, so the step never grows), more costs
    nothing more."""

    metric, higher_is_better = "score", True

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"score": 1.0 if alive(model[0]) + alive(model[2]) == 64 else 0.94}


def test_steps_too_small_to_reach_the_budget_in_the_iterations_left_are_raised() -> None:
    """With 5 iterations and steps of 5% that never grow, a run would end at 0.95^5 = 0.77 of the MACs;
    after each accepted step the step takes the size that reaches the budget in the iterations left."""
    res = ap.adapt(net(), X[:2], Flat(), ap.Budget(macs=0.5), tolerance=0.1, ignore=["4"], step=0.05,
                   max_iterations=5)
    assert res.budget_met, res.message
    assert "to reach the budget in the 4 steps left" in res.history[0].reason, res.history[0].reason
    assert not any("slack left" in h.reason for h in res.history)


class Practised(ap.Task):
    """0.92 (0.08 below the original's 1.0, over half a 0.1 tolerance) plus 0.01 per fine-tuning call,
    which moves the last bias by ``sign`` (a recovery that helps, or one that hurts)."""

    metric, higher_is_better = "score", True

    def __init__(self, sign: float) -> None:
        self.sign = sign

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"score": 0.92 + 0.01 * float(model[4].bias.detach()[0])}

    def finetune(self, model: nn.Module, steps: int) -> None:
        with torch.no_grad():
            model[4].bias[0] += self.sign


def at_the_edge(task: ap.Task, over: float = 1.2, spent: float = 0.92):
    from adaprune.adapt.config import AdaptConfig
    from adaprune.adapt.state import StepRecord

    controller = sys.modules["adaprune.adapt.controller"]
    model = net()
    with torch.no_grad():
        model[4].bias.zero_()
    ctl = controller.Controller(model, X[:2], task, ap.Budget(macs=0.5), AdaptConfig(tolerance=0.1, finetune_steps=1, confidence=0.0),
                                [], None)
    costs = ctl.costs(model)
    state = ControllerState(baseline={"score": 1.0}, step=2, history=[
        StepRecord(0, 0.2, {"0": 3}, {"score": spent}, costs, True, "within"),
        StepRecord(1, 0.2, {"0": 4}, {"score": 0.88}, costs, False, "exceeds: rolled back")],
        suspects=[Suspect("0", {"0": [1]}, 0.1, 1, over)])
    return ctl, model, state


def test_a_cut_that_failed_by_a_little_at_the_edge_is_followed_by_a_recovery_kept_only_if_it_helps() -> None:
    ctl, model, state = at_the_edge(Practised(+1.0))
    assert edge.at_the_edge(ctl, state)
    out = edge.recover_only(ctl, model, state)
    last = state.history[-1]
    assert last.accepted and last.cuts == {} and "recovery only" in last.reason and last.optimizer_steps == 1
    assert out is model and float(out[4].bias[0]) == 1.0 and ctl.current_metrics(state)["score"] == pytest.approx(0.93)

    ctl, model, state = at_the_edge(Practised(-1.0))  # a recovery that makes it worse is rolled back
    out = edge.recover_only(ctl, model, state)
    assert not state.history[-1].accepted and "rolled back" in state.history[-1].reason
    assert float(out[4].bias[0]) == 0.0 and ctl.current_metrics(state)["score"] == 0.92

    ctl, _, state = at_the_edge(Practised(+1.0), over=3.0)  # failed by a lot: cut again, with the culprit capped
    assert not edge.at_the_edge(ctl, state)
    ctl, _, state = at_the_edge(Practised(+1.0), spent=0.97)  # under half the tolerance spent: cut on
    assert not edge.at_the_edge(ctl, state)
