"""Filling the slack (:func:`adaprune.adapt.fill.fill`): the final step lands on the budget, not below it.

- :func:`fill` on a traced MLP: it gives back removed channels, most important first, keeps the plan's
  cost within the target, and stops only when no further channel of any group fits (so it ends within
  one channel's cost of the target);
- ``ap.adapt`` on a tiny BERT, whose heads are coarse (1/8 of a layer's attention each) and whose FFN
  neurons are fine: the result lands within 1% below a MACs budget of 0.3 (without the fill the last
  step, in whole heads and neurons, undershoots it by several percent).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.adapt.fill import fill
from adaprune.allocate import lowest
from adaprune.cost.budget import static_values
from adaprune.cost.predict import CostPredictor
from adaprune.graph import trace
from adaprune.importance import Context, get_importance
from adaprune.plan import Plan, plan_from_choice
from adaprune.surgery.hf_config import UnsaveableConfigWarning

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture
def setting():
    model = mlp()
    x = torch.randn(2, 8)
    graph = trace(model, x)
    assert sorted(g.size for g in graph.groups) == [16, 32]
    scores = get_importance("l2")(model, graph.groups, Context())
    predictor = CostPredictor(model, x)

    def value(plan: Plan) -> float:
        return static_values(predictor(plan))["macs"]

    cut = {g.name: lowest(scores[g.name], g.size // 2 + 4) for g in graph.groups}  # 20 of 32, 12 of 16
    return graph, scores, value, plan_from_choice(graph, cut)


def removed(plan: Plan) -> dict[str, set[int]]:
    return {g.name: set(g.removed) for g in plan.groups}


def test_fill_gives_back_the_most_important_channels_up_to_the_target(setting) -> None:
    graph, scores, value, plan = setting
    original, cut = value(Plan()), value(plan)
    target = cut + 0.4 * (original - cut)
    out = fill(plan, graph, scores, target, value)
    before, after = removed(plan), removed(out)
    assert value(out) <= target
    assert sum(map(len, after.values())) < sum(map(len, before.values()))  # channels were given back
    for name, idx in after.items():
        assert idx <= before[name]  # only removed channels come back
        back = before[name] - idx
        if back and idx:  # the ones given back are the most important of those removed
            assert min(float(scores[name][i]) for i in back) >= max(float(scores[name][i]) for i in idx)
    # nothing more fits: giving back the next channel of any group still cut passes the target
    costs = {}
    for name, idx in after.items():
        if idx:
            best = max(idx, key=lambda i: float(scores[name][i]))
            trial = plan_from_choice(graph, {**{n: sorted(i) for n, i in after.items()}, name: sorted(idx - {best})})
            costs[name] = value(trial) - value(out)
            assert value(trial) > target, name
    assert costs  # the target leaves some group cut, so the bound below says something
    assert target - value(out) < min(costs.values())  # within one (the finest) channel of the target


def test_fill_changes_nothing_it_cannot_improve(setting) -> None:
    graph, scores, value, plan = setting
    assert fill(plan, graph, scores, value(plan) - 1.0, value) is plan  # the plan already misses the target
    empty = plan_from_choice(graph, {})
    assert fill(empty, graph, scores, value(Plan()), value) is empty
    exact = fill(plan, graph, scores, value(plan), value)  # no slack: nothing fits
    assert removed(exact) == removed(plan)
    everything = fill(plan, graph, scores, value(Plan()), value)  # room for all of it
    assert all(not idx for idx in removed(everything).values())


class Constant(ap.Task):
    """A metric pruning never moves: every step is accepted, the run ends on the budget."""

    metric, higher_is_better = "score", True

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"score": 1.0}


def test_adapt_lands_on_the_budget_with_coarse_heads_and_fine_neurons() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, intermediate_size=64,
                        vocab_size=100)
    model = BertModel(config).eval()
    x = {"input_ids": torch.randint(1, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    sizes = sorted({g.size for g in trace(model, x).groups})
    assert sizes == [8, 64]  # heads and FFN neurons
    macs = ap.count(model, x).macs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsaveableConfigWarning)  # BertConfig cannot state per-layer widths
        res = ap.adapt(model, x, Constant(), ap.Budget(macs=0.3), tolerance=0.01)
    assert res.budget_met, res.message
    ratio = res.costs_after["macs"] / res.costs_before["macs"]
    assert 0.99 * 0.3 <= ratio <= 0.3, ratio
    assert ap.count(model, x).macs / macs == pytest.approx(ratio)
    heads = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    assert min(heads) < 8  # heads were cut too: the fine neurons took up what whole heads left


def test_fill_keeps_widths_multiples_of_round_to(setting) -> None:
    graph, scores, value, plan = setting  # kept widths 12 of 32 and 4 of 16: multiples of 4
    target = (value(plan) + value(Plan())) / 2
    filled = fill(plan, graph, scores, target, value, round_to=4)
    assert sum(len(c.removed) for c in filled.groups) < sum(len(c.removed) for c in plan.groups)
    sizes = {g.name: g.size for g in graph.groups}
    for cut in filled.groups:
        assert (sizes[cut.name] - len(cut.removed)) % 4 == 0, cut
    assert value(filled) <= target
