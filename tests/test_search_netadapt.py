"""ap.search(method="netadapt"): NetAdapt's greedy path to the budget, one candidate per cluster a step, judged at
milder budgets on the way; it spares what the evaluation rewards, spends at most ``trials`` evaluations, and
needs no Optuna."""

from __future__ import annotations

import itertools

import pytest

import adaprune as ap
from adaprune.errors import ArgumentTypeError, ConfigError
from search_nets import FirstLayerMatters, X, alive, cnn, macs

pytestmark = pytest.mark.usefixtures("one_thread")

FIRST = "0 (+1)"
"""The cluster of the first two convs (built alike); the last conv is cluster "4"."""


def test_netadapt_meets_the_budget_and_spares_the_layer_the_metric_needs() -> None:
    model = cnn()
    found = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=8, method="netadapt",
                      ignore=[model[8]])
    assert macs(model, found.plan) <= 0.5
    assert found.best.ratios[FIRST] < found.best.ratios["4"]
    handle = ap.mask(model, found.plan)
    spared = alive(model, 0)
    handle.undo()
    other = cnn()
    uniform = ap.prune(other, X, budget=ap.Budget(macs=0.5), allocation="uniform", ignore=[other[8]])
    # the uniform cut at the same budget loses at least 2 more of the first conv's channels (13 kept against 11)
    assert spared >= 16 - len(next(g for g in uniform.plan.groups if g.name.startswith("0")).removed) + 2


def test_each_step_meets_a_milder_budget_and_keeps_its_best_candidate() -> None:
    model = cnn()
    found = ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=9, method="netadapt",
                      ignore=[model[8]])
    # 2 clusters: 4 steps of 2 candidates (the ninth evaluation is not used), none repeated here
    assert found.evaluations + found.repeats == 8 and found.evaluations <= 9
    steps = [found.trials[i:i + 2] for i in range(0, len(found.trials), 2)]
    reached = [max(macs(model, t.plan) for t in step) for step in steps]
    assert all(a > b for a, b in itertools.pairwise(reached)), reached  # nearer the budget at every step
    assert [t.final for t in found.trials] == [False] * 6 + [True] * 2
    assert reached[0] > 0.8 and reached[-1] <= 0.5  # 0.5 ** (1/4) = 0.84 of the MACs after the first step
    assert found.best is max(steps[-1], key=lambda t: t.metric) and found.metric == found.best.metric
    # each step starts from the best candidate of the one before: no ratio falls
    kept = [max(step, key=lambda t: t.metric).ratios for step in steps]
    assert all(b[c] >= a[c] - 1e-9 for a, b in itertools.pairwise(kept) for c in a)


def test_netadapt_is_deterministic_and_ignores_the_seed() -> None:
    model = cnn()
    a, b = (ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=6, method="netadapt", seed=s,
                      ignore=[model[8]]) for s in (0, 7))
    assert [(t.ratios, t.metric) for t in a.trials] == [(t.ratios, t.metric) for t in b.trials]
    assert a.plan.to_json() == b.plan.to_json()


def test_bad_method_gamma_and_too_few_trials_are_named() -> None:
    model = cnn()
    kw = {"ignore": [model[8]]}
    with pytest.raises(ConfigError, match="method.*'tpe', 'netadapt'"):
        ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=4, method="bayes", **kw)
    with pytest.raises(ConfigError, match="gamma"):
        ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=4, method="netadapt", gamma=1.0, **kw)
    with pytest.raises(ArgumentTypeError, match="gamma"):
        ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=4, method="netadapt", gamma="3", **kw)
    with pytest.raises(ConfigError, match=r"trials=1 .* 2 clusters"):
        ap.search(model, X, FirstLayerMatters(), ap.Budget(macs=0.5), trials=1, method="netadapt", **kw)
