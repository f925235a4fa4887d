"""``probe_data``: probes measured on part of the validation data, each against the current model on that
same part, while steps are still judged on all of it. The ready tasks evaluate a fixed part
(``evaluate_part``); a task that cannot is refused before anything is measured."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaprune as ap
from adaprune.adapt.config import AdaptConfig
from adaprune.adapt.state import run_settings
from adaprune.errors import ConfigError, RunDirError
from adaprune.task import as_task
from small_nets import X8, alive, mlp3

pytestmark = pytest.mark.usefixtures("one_thread")

X, net = X8, mlp3


class Layered(ap.Task):
    """Each neuron cut from the first layer costs 0.01, from the second 0.0005. Its part of the data is
    harder: every score there is 0.3 lower, so a probe compared with the whole data's score would look
    0.3 worse than it is, whatever it cut. Records what it was asked."""

    metric, higher_is_better = "score", True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def score(self, model: nn.Module) -> float:
        return 1.0 - 0.01 * (32 - alive(model[0])) - 0.0005 * (32 - alive(model[2]))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.calls.append("all")
        return {"score": self.score(model)}

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        self.calls.append(f"part {fraction}")
        return {"score": self.score(model) - 0.3}


def run(task: ap.Task, **kw) -> ap.AdaptResult:
    return ap.adapt(net(), X[:2], task, ap.Budget(macs=0.6), tolerance=0.2, ignore=["4"], max_iterations=4, **kw)


def test_probes_measure_the_part_and_steps_are_judged_on_all_of_it() -> None:
    task = Layered()
    res = run(task, probe_data=0.5)
    assert res.budget_met, res.message
    parts = [c for c in task.calls if c.startswith("part")]
    assert parts and set(parts) == {"part 0.5"}
    assert res.part_evaluations == len(parts)
    assert res.evaluations == len(task.calls)
    # every step's judged metric is the whole data's (the part's would be 0.3 lower)
    for h in res.history:
        assert h.metrics["score"] > 0.8, h
    assert "of part of the validation data" in res.summary()


def test_the_part_is_compared_with_the_current_model_on_the_same_part() -> None:
    """Measured against the current model on the part, the first layer (0.01 per neuron) is spared and the
    second (0.0005) cut, as with all of the data."""
    whole, part = run(Layered()), run(Layered(), probe_data=0.5)
    for res in (whole, part):
        assert res.budget_met, res.message
        assert alive(res.model[0]) > alive(res.model[2]) + 8, (alive(res.model[0]), alive(res.model[2]))
    assert [alive(m) for m in (whole.model[0], whole.model[2])] == [alive(m) for m in (part.model[0], part.model[2])]


def test_against_the_whole_datas_metrics_every_probe_looks_equally_bad(monkeypatch) -> None:
    """The baseline (probes on the part, the reference from all of the data) sees the 0.3 offset in every
    probe and no longer tells the layers apart: the test above fails with it."""
    controller = sys.modules["adaprune.adapt.controller"]
    monkeypatch.setattr(controller.Controller, "probe_now",
                        lambda self, work, state, cached=True: self.current_metrics(state))
    res = run(Layered(), probe_data=0.5)
    assert not alive(res.model[0]) > alive(res.model[2]) + 8, (alive(res.model[0]), alive(res.model[2]))


def test_a_task_without_evaluate_part_is_refused_before_anything_is_measured() -> None:
    class WholeOnly(ap.Task):
        metric, higher_is_better = "score", True

        def __init__(self) -> None:
            self.calls = 0

        def evaluate(self, model: nn.Module) -> dict[str, float]:
            self.calls += 1
            return {"score": 1.0}

    task = WholeOnly()
    model = net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"probe_data=0.5.*WholeOnly.*evaluate_part"):
        run(task, probe_data=0.5)
    assert task.calls == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="probe_data"):
        AdaptConfig(probe_data=0.0)
    with pytest.raises(ConfigError, match="probe_data"):
        AdaptConfig(probe_data=1.5)


def test_a_protocol_task_with_evaluate_part_is_used() -> None:
    class Proto:
        metric, higher_is_better = "score", True

        def __init__(self) -> None:
            self.inner = Layered()

        def evaluate(self, model):
            return self.inner.evaluate(model)

        def evaluate_part(self, model, fraction):
            return self.inner.evaluate_part(model, fraction)

    proto = Proto()
    assert as_task(proto).evaluates_parts
    res = run(proto, probe_data=0.25)
    assert res.part_evaluations > 0 and "part 0.25" in proto.inner.calls


def loaders(shuffle: bool) -> tuple[list, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=g), torch.randint(0, 3, (100,), generator=g)
    val = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=shuffle, generator=torch.Generator().manual_seed(1))
    return [(x[:10], y[:10])], val


def test_classification_part_is_the_same_examples_on_every_call_even_when_the_loader_shuffles() -> None:
    train, val = loaders(shuffle=True)
    task = ap.ClassificationTask(train, val)
    model = net()
    first = task.evaluate_part(model, 0.3)
    assert task.evaluate_part(model, 0.3) == first
    kept = task._parts[0.3]
    assert sum(len(b[1]) for b in kept) == 30
    assert task.evaluate_part(model, 1.0) == pytest.approx(task.evaluate(model))  # (shuffled: another sum order)


def test_classification_part_is_the_first_batches_of_a_fixed_loader() -> None:
    train, val = loaders(shuffle=False)
    task = ap.ClassificationTask(train, val)
    model = net()
    _, hits = task.evaluate_examples(model)
    part = task.evaluate_part(model, 0.5)
    assert part["accuracy"] == pytest.approx(float(hits[:50].mean()))


def test_a_classification_subclass_with_its_own_evaluate_cannot_evaluate_a_part() -> None:
    class Own(ap.ClassificationTask):
        def evaluate(self, model):
            return {"accuracy": 1.0}

    train, val = loaders(shuffle=False)
    task = Own(train, val)
    assert not task.evaluates_parts
    with pytest.raises(ConfigError, match="overrides evaluate.*evaluate_part"):
        task.evaluate_part(net(), 0.5)


def test_embedding_part_is_the_mean_over_the_first_batches() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    task = ap.EmbeddingTask([torch.randn(8, 6, generator=g) for _ in range(2)],
                            [torch.randn(8, 6, generator=g) for _ in range(4)])
    task.set_teacher(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight.add_(0.5 * torch.randn(changed[0].weight.shape, generator=g))
    _, per = task.evaluate_examples(changed)
    part = task.evaluate_part(changed, 0.5)
    assert part["similarity"] == pytest.approx(float(per[:16].mean()))
    assert task.evaluate_part(changed, 0.1)["similarity"] == pytest.approx(float(per[:8].mean()))


def test_multitask_part_prefixes_and_names_the_task_that_cannot() -> None:
    class WholeOnly(ap.Task):
        metric, higher_is_better = "score", True

        def evaluate(self, model):
            return {"score": 1.0}

    both = ap.MultiTask({"a": Layered(), "b": Layered()}, tolerance={"a": 0.1, "b": 0.1})
    assert both.evaluates_parts
    assert set(both.evaluate_part(net(), 0.5)) == {"a/score", "b/score"}
    mixed = ap.MultiTask({"a": Layered(), "w": WholeOnly()}, tolerance={"a": 0.1, "w": 0.1})
    assert not mixed.evaluates_parts
    with pytest.raises(ConfigError, match="task 'w'.*evaluate_part"):
        mixed.evaluate_part(net(), 0.5)


def test_a_resumed_run_keeps_its_probe_data_and_ends_as_one_run(tmp_path) -> None:
    whole = run(Layered(), probe_data=0.5)
    first = run(Layered(), probe_data=0.5, run_dir=tmp_path / "r", max_evaluations=4)
    assert first.stopped and first.part_evaluations > 0
    with pytest.raises(RunDirError, match="probe_data"):
        run(Layered(), run_dir=tmp_path / "r", resume=True)
    done = run(Layered(), probe_data=0.5, run_dir=tmp_path / "r", resume=True)
    assert done.plan.to_json() == whole.plan.to_json()
    assert done.part_evaluations >= first.part_evaluations
    assert done.evaluations >= first.evaluations
    # a run saved before probe_data existed (its settings lack it) resumes at the default
    assert "probe_data" not in run_settings(AdaptConfig(), ap.Budget(macs=0.5), [])
    assert run_settings(AdaptConfig(probe_data=0.5), ap.Budget(macs=0.5), [])["probe_data"] == 0.5
