"""Probing (:mod:`adaprune.adapt.probing`): one unit per group, a probe budget, first-order estimates.

A stack of identical residual MLP blocks, one of them made far more sensitive (its output scaled up,
the others scaled down): adapt must leave that block wider than its identical siblings, which it
cannot when identical groups share one cluster's ratio. With a probe budget below the number of groups
and calibration batches, a step evaluates the task at most ``probe_budget`` times for probes plus its
own evaluation, and the prober estimates the unmeasured units from the first-order scores calibrated
on the measured ones. Without calibration batches (no estimate) and more groups than the budget, the
units are the clusters of groups built alike.
"""

from __future__ import annotations

import importlib
import math
import statistics

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.adapt.controller import Controller
from adaprune.allocate import Limits
from adaprune.cost.budget import static_values
from adaprune.cost.predict import CostPredictor
from adaprune.graph import trace
from adaprune.importance import Context, default_loss, get_importance
from adaprune.sensitivity import clusters

probing = importlib.import_module("adaprune.adapt.probing")  # (adaprune.adapt is also the function)

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
BLOCKS, HOT = 4, 2


class Block(nn.Module):
    def __init__(self, d: int = 16, h: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """A stem, ``BLOCKS`` identical residual blocks and a head; block ``HOT`` writes 4x its share into
    the residual stream, the others 1/4 (so cutting HOT's hidden neurons costs ~16x more)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[Block() for _ in range(BLOCKS)])
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for i, b in enumerate(self.blocks):
                b.fc2.weight.mul_(4.0 if i == HOT else 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def widths(model: Stack) -> list[int]:
    return [b.fc1.out_features for b in model.blocks]


class Fidelity(ap.Task):
    """Minus the MSE to the original model's outputs; counts its evaluations."""

    metric, higher_is_better = "fidelity", True

    def __init__(self, reference: torch.Tensor, calibrate: bool = False) -> None:
        self.reference, self.calibrate, self.calls = reference, calibrate, 0

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.calls += 1
        with torch.no_grad():
            return {"fidelity": -float(nn.functional.mse_loss(model(X), self.reference))}

    def calibration(self):  # the original model's argmax as labels: the default loss fits the logits
        if not self.calibrate:
            return None
        return [(X[i:i + 64], self.reference[i:i + 64].argmax(1)) for i in (0, 64)]


def stack_and_task(calibrate: bool = False) -> tuple[Stack, Fidelity]:
    model = Stack()
    with torch.no_grad():
        return model, Fidelity(model(X), calibrate)


# -- one unit per group ----------------------------------------------------------------------------

def test_a_sensitive_block_keeps_more_than_its_identical_siblings() -> None:
    model, task = stack_and_task()
    res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.5), tolerance=0.01, ignore=[model.head])
    assert res.budget_met, res.message
    kept = widths(model)
    others = [w for i, w in enumerate(kept) if i != HOT]
    assert kept[HOT] > max(others), kept
    assert max(others) < 32  # the siblings were cut
    assert kept[HOT] >= 2 * min(others), kept


def test_units_are_single_groups_within_the_budget_or_with_an_estimate() -> None:
    model, _ = stack_and_task()
    graph = trace(model, X[:2], ignore=[model.head])
    names = [g.name for g in graph.groups]
    assert len(names) == BLOCKS + 1  # the residual stream and each block's hidden neurons
    for budget, can_estimate in ((len(names), False), (1, True), (24, False)):
        found = probing.units(model, graph, budget, can_estimate)
        assert list(found) == names and all([g.name for g in found[n]] == [n] for n in names)


def test_without_an_estimate_and_over_the_budget_units_are_clusters() -> None:
    model, _ = stack_and_task()
    graph = trace(model, X[:2], ignore=[model.head])
    found = probing.units(model, graph, 2, False)
    expected = clusters(model, graph.groups)
    assert {k: [g.name for g in v] for k, v in found.items()} == {k: [g.name for g in v] for k, v in expected.items()}
    assert sorted(len(v) for v in found.values()) == [1, BLOCKS]  # the stem alone, the blocks together


def test_adapt_without_calibration_probes_clusters(monkeypatch) -> None:
    """No calibration batches, 5 groups, probe_budget=2: every step's units are the 2 clusters, so a
    step evaluates at most 2 probes and its own model."""
    seen: list[dict] = []
    real = probing.units

    def spy(work, graph, budget, can_estimate, tied=False):
        out = real(work, graph, budget, can_estimate, tied)
        seen.append({"groups": len(graph.groups), "units": {k: len(v) for k, v in out.items()}})
        return out

    monkeypatch.setattr(probing, "units", spy)
    per_step = count_per_step(monkeypatch)
    model, task = stack_and_task(calibrate=False)
    ap.adapt(model, X[:2], task, ap.Budget(macs=0.5), tolerance=0.01, ignore=[model.head], probe_budget=2,
             max_iterations=3)
    assert seen
    for s in seen:
        assert len(s["units"]) < s["groups"]  # merged
        assert sum(s["units"].values()) == s["groups"]
    assert max(per_step) <= 2 + 1


# -- the probe budget ------------------------------------------------------------------------------

def count_per_step(monkeypatch) -> list[int]:
    """The task evaluations of every step (Controller.step wrapped; the task counts its calls)."""
    per_step: list[int] = []
    real = Controller.step

    def step(self, work, state, values):
        before = self.task.calls
        out = real(self, work, state, values)
        per_step.append(self.task.calls - before)
        return out

    monkeypatch.setattr(Controller, "step", step)
    return per_step


def test_a_step_evaluates_at_most_the_probe_budget_plus_its_own(monkeypatch) -> None:
    """5 groups, probe_budget=2, calibration batches (a first-order estimate ranks the groups): each
    step measures at most 2 probes, plus the step's own evaluation (no BatchNorm: no refit, 1)."""
    per_step = count_per_step(monkeypatch)
    model, task = stack_and_task(calibrate=True)
    graph = trace(model, X[:2], ignore=[model.head])
    assert len(graph.groups) > 2 + 1  # measuring every group would take more evaluations than the bound
    res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.5), tolerance=0.01, ignore=[model.head], probe_budget=2,
                   max_iterations=4)
    assert len(per_step) == len(res.history) >= 2
    assert per_step[0] == 2 + 1  # the first step measures exactly the budget
    assert max(per_step) <= 2 + 1, per_step
    assert all(h.refit == "" for h in res.history)


def taylor(model: nn.Module, graph: object, batches: object) -> object:
    """The Taylor scores on ``batches``, as the controller hands them to ``first_order``."""
    return lambda: get_importance("taylor")(model, graph.groups, Context(batches, default_loss))  # type: ignore[attr-defined]


def test_the_prober_measures_the_budget_and_estimates_the_rest() -> None:
    model, task = stack_and_task(calibrate=True)
    graph = trace(model, X[:2], ignore=[model.head])
    scores = get_importance("l2")(model, graph.groups, Context())
    estimate = probing.first_order(model, graph.groups, task.calibration(), taylor(model, graph, task.calibration()), scores, "l2")
    assert estimate is not None and set(estimate) == {g.name for g in graph.groups}
    predictor = CostPredictor(model, X[:2])
    now = task.evaluate(model)
    task.calls = 0

    def harm(before: dict[str, float], masked: dict[str, float]) -> float:
        return max(before["fidelity"] - masked["fidelity"], 0.0)

    prober = probing.Prober(0.3, 2, Limits(), task.evaluate, dict, harm)
    probes = prober.run(model, graph, scores, predictor, now, 0, estimate, "macs")
    assert set(probes) == {g.name for g in graph.groups}
    measured = {n for n, p in probes.items() if p.measured}
    assert len(measured) == 2 and prober.measured == task.calls == 2
    # the estimate of each unit: the first-order scores of the channels its probe masks
    guess, worth = {}, {}
    full = static_values(predictor(ap.Plan()))["macs"]
    for name, p in probes.items():
        found = prober.plan(p.groups, scores, predictor)
        assert found is not None
        _, chosen, _, after = found
        guess[name] = sum(float(estimate[g].reshape(-1)[chosen[g]].sum()) for g in chosen)
        worth[name] = (full - after["macs"]) / (guess[name] + 1e-12)
        assert p.saved["macs"] == pytest.approx(full - after["macs"])
    # the measured ones are those the allocator would cut most (the most cost saved per estimated harm)
    assert measured == set(sorted(worth, key=worth.get, reverse=True)[:2])
    # the others: their estimate times the median measured / estimated ratio
    factor = statistics.median(probes[n].drop / guess[n] for n in measured)
    for name, p in probes.items():
        assert math.isfinite(p.drop) and p.drop >= 0
        if name not in measured:
            assert p.drop == pytest.approx(factor * guess[name])
    # measuring again on the same weights version is served from the cache
    again = prober.run(model, graph, scores, predictor, now, 0, estimate, "macs")
    assert task.calls == 2 and {n: p.drop for n, p in again.items()} == {n: p.drop for n, p in probes.items()}


def test_first_order_is_none_without_batches_and_the_scores_for_taylor() -> None:
    model, _ = stack_and_task()
    graph = trace(model, X[:2], ignore=[model.head])
    scores = get_importance("l2")(model, graph.groups, Context())
    assert probing.first_order(model, graph.groups, None, taylor(model, graph, None), scores, "l2") is None
    assert probing.first_order(model, graph.groups, None, taylor(model, graph, None), scores, "taylor") is scores


def test_later_steps_reprobe_and_calibrate_each_unit_by_its_own_ratio() -> None:
    """The first run measures every unit (within the budget) and records each one's measured/estimated
    ratio; a later run measures only ``reprobe`` units and gives each other unit its estimate times its
    OWN recorded ratio (not the median of the units measured now, which the ratios here differ from)."""
    model, task = stack_and_task(calibrate=True)
    graph = trace(model, X[:2], ignore=[model.head])
    scores = get_importance("l2")(model, graph.groups, Context())
    estimate = probing.first_order(model, graph.groups, task.calibration(), taylor(model, graph, task.calibration()), scores, "l2")
    assert estimate is not None
    predictor = CostPredictor(model, X[:2])
    now = task.evaluate(model)
    task.calls = 0

    def harm(before: dict[str, float], masked: dict[str, float]) -> float:
        return max(before["fidelity"] - masked["fidelity"], 0.0)

    prober = probing.Prober(0.3, 10, Limits(), task.evaluate, dict, harm, reprobe=1)
    ratios: dict[str, float] = {}
    first = prober.run(model, graph, scores, predictor, now, 0, estimate, "macs", ratios)
    assert all(p.measured for p in first.values()) and task.calls == len(first) == len(graph.groups)
    recorded = dict(ratios)
    assert set(recorded) == set(first) and len({round(r, 6) for r in recorded.values()}) > 2
    later = prober.run(model, graph, scores, predictor, now, 1, estimate, "macs", ratios)  # new weights version
    measured = [n for n, p in later.items() if p.measured]
    assert len(measured) == 1 and task.calls == len(first) + 1
    median = statistics.median(recorded[n] for n in measured)
    differs = 0
    for name, p in later.items():
        if name in measured:
            continue
        found = prober.plan(p.groups, scores, predictor)
        assert found is not None
        guess = sum(float(estimate[g].reshape(-1)[found[1][g]].sum()) for g in found[1])
        # own ratio x the same estimate on the same weights: what the first run measured for this unit
        assert p.drop == pytest.approx(recorded[name] * guess) == pytest.approx(first[name].drop)
        differs += not math.isclose(p.drop, median * guess, rel_tol=1e-3, abs_tol=1e-9)
    assert differs >= 1


def test_an_adapt_run_reprobes_after_its_first_step(monkeypatch) -> None:
    """5 groups within probe_budget, reprobe=2: the first step measures all 5, later ones at most 2 (each
    plus the step's own evaluation)."""
    per_step = count_per_step(monkeypatch)
    model, task = stack_and_task(calibrate=True)
    groups = len(trace(model, X[:2], ignore=[model.head]).groups)
    assert groups > 2
    res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.5), tolerance=0.01, ignore=[model.head], reprobe=2,
                   max_iterations=4)
    assert len(per_step) == len(res.history) >= 2
    assert per_step[0] == groups + 1, per_step
    assert max(per_step[1:]) <= 2 + 1, per_step
