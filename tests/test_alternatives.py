"""Alternative step sizes (``alternatives=k``, adaprune.adapt.alternatives): a step tries several sizes at
once and keeps the largest within tolerance; every size's recovery is counted; a killed run resumes to the
same plan. (On Ray: tests/test_scale.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaprune as ap
from adaprune.errors import ConfigError, RunDirError

torch.manual_seed(0)
X = torch.randn(160, 8)
Y = (X[:, :4].sum(1) > 0).long()


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


class FirstWidth:
    """A task whose metric is the fraction of the first layer's units left: masking changes nothing, and a step
    is within ``tolerance`` exactly when it leaves enough of them (no fine-tuning, no noise)."""

    metric, higher_is_better = "width", True

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"width": model[0].out_features / 32}


def width_run(**kw) -> ap.AdaptResult:
    options = {"tolerance": 0.3, "ignore": ["4"], "step": 0.6, "max_step": 0.6, "max_iterations": 3, "confidence": 0, "seed": 0}
    return ap.adapt(mlp(), X[:2], FirstWidth(), ap.Budget(macs=0.3), **{**options, **kw})


def by_step(result: ap.AdaptResult) -> dict[int, list]:
    out: dict[int, list] = {}
    for h in result.history:
        out.setdefault(h.step, []).append(h)
    return out


def test_a_step_keeps_the_largest_of_its_sizes_that_is_within_tolerance() -> None:
    result = width_run(alternatives=3)
    first = by_step(result)[0]
    assert [round(h.step_size, 4) for h in sorted(first, key=lambda h: -h.step_size)] == [0.6, 0.3, 0.15]
    kept = first[-1]  # the deciding record comes last
    assert kept.accepted and not any(h.accepted for h in first[:-1]) and "the largest of 3 sizes" in kept.reason
    drops = {round(h.step_size, 4): 1 - h.metrics["width"] for h in first}
    assert drops[0.6] > 0.3 >= drops[0.3] and drops[0.15] <= 0.3  # the largest fails; two are within
    assert round(kept.step_size, 4) == 0.3  # the larger of the two within tolerance, not the smaller
    assert "not used: the larger 30.0%" in next(h.reason for h in first if round(h.step_size, 4) == 0.15)
    assert "rolled back, 30.0% tried beside it is kept" in next(h.reason for h in first if h.step_size == 0.6)


def test_one_size_at_a_time_spends_a_whole_step_on_the_size_that_fails() -> None:
    one, three = width_run(alternatives=1), width_run(alternatives=3)
    assert [h.accepted for h in by_step(one)[0]] == [False]  # the baseline: step 0 rolls back
    assert by_step(three)[0][-1].accepted  # with the sizes at once, step 0 goes on at 30%
    assert three.costs_after["macs"] < one.costs_after["macs"]


def classification() -> ap.ClassificationTask:
    train = DataLoader(TensorDataset(X[:96], Y[:96]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(X[96:], Y[96:]), batch_size=64)
    return ap.ClassificationTask(train, val, lr=0.01)


class Stopping:
    """A ClassificationTask whose ``stop_at``-th fine-tuning is interrupted (a run killed in a step)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, stop_at: int = 0) -> None:
        self.inner, self.stop_at, self.tunes = classification(), stop_at, 0

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.inner.evaluate(model)

    def finetune(self, model: nn.Module, steps: int) -> None:
        self.tunes += 1
        if self.tunes == self.stop_at:
            raise KeyboardInterrupt
        self.inner.finetune(model, steps)


def trained() -> nn.Module:
    model = mlp()
    torch.manual_seed(2)
    classification().finetune(model, 60)
    return model


def tuned_run(task, tmp_path, name: str, model: nn.Module, **kw) -> ap.AdaptResult:
    options = {"finetune_steps": 3, "max_iterations": 3, "step": 0.6, "max_step": 0.6, "confidence": 0, "alternatives": 3, "seed": 4}
    return ap.adapt(copy.deepcopy(model), X[:2], task, ap.Budget(macs=0.3), tolerance=0.1, ignore=["4"],
                    run_dir=tmp_path / name, **{**options, **kw})


def test_every_sizes_recovery_is_counted_and_a_killed_run_resumes_to_the_same_plan(tmp_path) -> None:
    model = trained()
    whole = tuned_run(Stopping(), tmp_path, "whole", model)
    assert len(whole.history) > len(by_step(whole)) > 1  # several sizes in a step
    assert whole.optimizer_steps == 3 * len(whole.history)  # the sizes not kept spent theirs too
    with pytest.raises(KeyboardInterrupt):
        tuned_run(Stopping(stop_at=5), tmp_path, "parts", model)  # in the second step's sizes
    resumed = tuned_run(Stopping(), tmp_path, "parts", model, resume=True)
    assert resumed.plan.to_json() == whole.plan.to_json()
    assert [(h.step, h.step_size, h.accepted, h.metrics) for h in resumed.history] == \
        [(h.step, h.step_size, h.accepted, h.metrics) for h in whole.history]
    with pytest.raises(RunDirError, match="alternatives"):
        tuned_run(Stopping(), tmp_path, "parts", model, resume=True, alternatives=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_alternatives_is_checked(bad) -> None:
    with pytest.raises((ConfigError, TypeError), match="alternatives"):
        width_run(alternatives=bad)


def test_adapt_fine_tunes_its_sizes_even_when_called_without_gradients(tmp_path) -> None:
    model = trained()
    for k in (1, 3):
        with torch.no_grad():  # (recovery needs gradients whatever the caller's mode; before, a raw RuntimeError)
            result = tuned_run(Stopping(), tmp_path, f"no_grad{k}", model, alternatives=k)
        plain = tuned_run(Stopping(), tmp_path, f"grad{k}", model, alternatives=k)
        assert [h.metrics for h in result.history] == [h.metrics for h in plain.history]


def test_the_summary_and_the_report_tell_sizes_not_used_from_sizes_rolled_back(tmp_path) -> None:
    from adaprune import report

    result = width_run(alternatives=3)
    unused = [h for h in result.history if h.unused]
    assert unused and not any(h.accepted for h in unused)
    steps = len({h.step for h in result.history})
    rolled = sum(not h.accepted and not h.unused for h in result.history)
    assert (f"steps: {steps}, {len(result.history)} sizes tried ({sum(h.accepted for h in result.history)} accepted, "
            f"{rolled} rolled back, {len(unused)} within tolerance and not used)") in result.summary()
    data = report.collect(result, mlp(), X[:2], latency=False, metric="width", tolerance=0.3)
    html = report.write(data, tmp_path / "report")["html"].read_text()
    assert html.count("<td>not used</td>") == len(unused)
    assert html.count('<td class="bad">rolled back</td>') == rolled


def test_an_unfinished_runs_report_counts_its_steps_not_its_sizes(tmp_path) -> None:
    import json

    from adaprune import report

    with pytest.raises(KeyboardInterrupt):
        tuned_run(Stopping(stop_at=5), tmp_path, "cut", trained())  # in the second step's sizes
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert len(state["history"]) == 3  # the first step's 3 sizes
    assert report.from_state(state)["message"].startswith("run not finished: 1 step (3 sizes tried) so far")
