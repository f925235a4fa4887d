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
from adaprune.adapt.state import ControllerState, Suspect
from adaprune.errors import FileFormatError

X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def alive(layer: nn.Linear) -> int:
    """Output neurons of ``layer`` that are still there (not removed, not masked to zero)."""
    return int((layer.weight.detach().abs().sum(1) > 0).sum())


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
