"""ap.search and ap.allocate_from_sensitivity: plans that meet the budget exactly, per-cluster ratios that
follow what the evaluation rewards, the same search on Ray as here, and their errors."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ArgumentTypeError, BudgetUnreachableError, ConfigError
from adaprune.plan import plan_from_choice
from search_nets import FirstLayerMatters, X, alive, cnn, kept, macs

pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")

def test_search_meets_the_budget_and_spares_the_layer_the_metric_needs() -> None:
    model = cnn()
    found = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=24, seed=0, ignore=[model[8]])
    # (16 channels a layer: the sampler runs out of plans it has not evaluated before 24)
    assert 0 < found.evaluations <= 24 and found.metric == max(t.metric for t in found.trials)
    assert macs(model, found.plan) <= 0.5
    # the first trial is the uniform allocation: it cuts the first conv as much as the others
    uniform = found.trials[0]
    assert len({round(r, 6) for r in uniform.ratios.values()}) == 1 and uniform.metric < found.metric
    first = next(c for c in found.best.ratios if c.startswith("0"))
    assert found.best.ratios[first] < min(r for c, r in found.best.ratios.items() if c != first)
    assert found.metric >= uniform.metric + 2  # at least 2 channels of the first conv fewer lost than uniform


def test_search_is_deterministic() -> None:
    model = cnn()
    kw = {"trials": 8, "seed": 3, "ignore": [model[8]]}
    a = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), **kw)
    b = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), **kw)
    assert [t.weights for t in a.trials] == [t.weights for t in b.trials] and a.plan.to_json() == b.plan.to_json()


@pytest.mark.xdist_group("ray")
def test_search_on_ray_is_the_local_search() -> None:
    pytest.importorskip("ray")
    model = cnn()
    kw = {"trials": 6, "seed": 3, "ignore": [model[8]]}
    local = [ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), method=m, **kw) for m in ("tpe", "netadapt")]
    with ap.RayExecutor(workers=2) as ex:
        remote = [ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), executor=ex, method=m, **kw)
                  for m in ("tpe", "netadapt")]
    for a, b in zip(remote, local):
        assert [(t.weights, t.metric) for t in a.trials] == [(t.weights, t.metric) for t in b.trials]
        assert a.plan.to_json() == b.plan.to_json()


def test_allocate_from_sensitivity_cuts_least_where_the_table_says_it_hurts() -> None:
    model = cnn()
    table = ap.sensitivity(model, X, FirstLayerMatters(), ignore=[model[8]])
    plan = ap.allocate_from_sensitivity(model, X, table, ap.Budget(macs=0.5), ignore=[model[8]])
    assert 0.4 < macs(model, plan) <= 0.5  # (whole channels of a small model: not closer)
    widths = kept(model, plan)
    first = next(n for n in widths if n.startswith("0"))
    assert widths[first] >= max(w for n, w in widths.items() if n != first) > min(widths.values())
    # fewer of the first conv's channels lost than the uniform cut at the same budget
    uniform = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=1, ignore=[model[8]])
    handle = ap.mask(model, plan)
    assert FirstLayerMatters()(model) > uniform.metric
    handle.undo()


def test_both_allocators_spend_the_budget_to_the_last_whole_channel() -> None:
    """The scale's bisection moves every cluster at once and may stop short of the budget; the whole channels
    left go back, so that no group can keep one more of its removed channels within the budget."""
    model = cnn()
    budget = ap.Budget(macs=0.5)
    found = ap.search(model, X, FirstLayerMatters(), budget, trials=6, seed=1, ignore=[model[8]])
    table = ap.sensitivity(model, X, FirstLayerMatters(), ignore=[model[8]])
    plans = [found.plan, ap.allocate_from_sensitivity(model, X, table, budget, ignore=[model[8]])]
    graph = ap.trace(model, X, ignore=[model[8]])
    for plan in plans:
        assert macs(model, plan) <= 0.5
        removed = {g.name: list(g.removed) for g in plan.groups if g.removed}
        for name in removed:
            one_back = {n: idx[1:] if n == name else idx for n, idx in removed.items()}
            assert macs(model, plan_from_choice(graph, one_back)) > 0.5, name


def test_the_budget_and_the_table_are_checked() -> None:
    model = cnn()
    with pytest.raises(ConfigError, match="static budget"):
        ap.search(model, X, FirstLayerMatters(), ap.Budget(latency=0.5), trials=2)
    with pytest.raises(BudgetUnreachableError, match="max_ratio"):
        ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.01), trials=2, max_ratio=0.5, ignore=[model[8]])
    with pytest.raises(ArgumentTypeError, match="table"):
        ap.allocate_from_sensitivity(model, X, {"baseline": 0}, ap.Budget(macs=0.5))
    table = ap.sensitivity(model, X, FirstLayerMatters(), ignore=[model[8]], cluster=False)
    other = nn.Sequential(OrderedDict(a=nn.Conv2d(3, 8, 3), r=nn.ReLU(), b=nn.Conv2d(8, 4, 3)))
    with pytest.raises(ConfigError, match="no curve"):
        ap.allocate_from_sensitivity(other, X, table, ap.Budget(macs=0.5))


def test_without_optuna_the_message_names_the_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ConfigError, match=r"adaprune\[search\].*netadapt"):
        ap.search(cnn(), X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=2)
    found = ap.search(cnn(), X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=2, method="netadapt")
    assert macs(cnn(), found.plan) <= 0.5


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_recalibrated_evaluation_sees_fresh_statistics_and_puts_the_old_ones_back() -> None:
    from adaprune.search import Recalibrated

    model = BatchNormNet().eval()
    batches = [(torch.randn(16, 3, 12, 12) * 3 + 1, None) for _ in range(2)]
    seen = []

    def mean_of_running_mean(m: nn.Module) -> float:
        seen.append(m.bn.running_mean.clone())
        return float(m.bn.running_mean.mean())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert Recalibrated(mean_of_running_mean, batches)(model) != 0.0  # the statistics of these batches
    assert not torch.equal(seen[0], before["bn.running_mean"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="calibration"):
        ap.search(model, X, mean_of_running_mean, ap.Budget(macs=0.5), trials=1, recalibrate=True, ignore=["head"])
    found = ap.search(model, X, mean_of_running_mean, ap.Budget(macs=0.5), trials=2, recalibrate=True,
                      calibration=batches, ignore=["head"])
    # (one cluster: one plan meets the budget, so the second trial would repeat it and is not evaluated)
    assert found.evaluations == 1 and found.repeats >= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_tuned_evaluation_trains_the_candidate_and_puts_its_weights_back() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from adaprune.search import Tuned

    model = BatchNormNet()
    y = torch.randint(0, 5, (32,))
    data = torch.randn(32, 3, 12, 12)
    task = ap.ClassificationTask(DataLoader(TensorDataset(data, y), batch_size=16, shuffle=True),
                                 DataLoader(TensorDataset(data, y), batch_size=32), lr=0.05)

    def loss(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return -float(nn.functional.cross_entropy(m(data), y))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = loss(model)
    tuned = Tuned(loss, task, 40)(model)
    assert tuned > plain + 0.05  # 40 steps on these 32 examples lower their loss
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    handle = ap.mask(model, ap.search(model, X, loss, ap.Budget(macs=0.5), trials=1, ignore=["head"]).plan)
    Tuned(loss, task, 5)(model)  # on a masked model: the masks stay, the weights come back
    handle.undo()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class CountingPlans:
    """FirstLayerMatters that also records which channels each call saw alive (a picklable evaluation)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def __call__(self, model: nn.Module) -> float:
        self.seen.append(tuple(alive(model, i) for i in (0, 2, 4)))
        return FirstLayerMatters()(model)


def test_search_spends_each_evaluation_on_a_plan_it_has_not_evaluated() -> None:
    """16 channels a layer give few plans: the sampler asks for the same plan again. A repeat is told its value,
    so the trials' evaluations all go to different plans."""
    model = cnn()
    judge = CountingPlans()
    found = ap.search(model, X, judge, ap.Budget(macs=0.5), trials=12, seed=0, ignore=[model[8]])
    assert found.evaluations == len(judge.seen) == 12
    assert len(set(judge.seen)) == 12, judge.seen
    assert found.repeats > 0


def test_each_trial_keeps_the_plan_it_evaluated() -> None:
    model = cnn()
    found = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=4, seed=2, ignore=[model[8]])
    for t in found.trials:
        handle = ap.mask(model, t.plan)
        assert FirstLayerMatters()(model) == t.metric and macs(model, t.plan) <= 0.5
        handle.undo()
