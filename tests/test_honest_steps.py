"""Honest comparisons: adapt counts the optimizer steps it spends, and every comparison (the demo, README's
demo table, the accuracy benchmark) gives each method exactly as many."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import adaprune as ap
from adaprune import demo, report
from adaprune.adapt.state import ControllerState
from adaprune.examples.digits import DigitsCNN, load_digits_data, train
from adaprune.report.render import steps_table, summary_table

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    data = load_digits_data(0)
    model = DigitsCNN(8)
    train(model, data, epochs=4, seed=0)
    return data, model


class CountingTask:
    """Fine-tunes with its own loop and counts every optimizer step it takes. The first evaluation after
    the first fine-tune reports a collapsed metric, so the first step is rolled back (its steps count)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, inner: ap.ClassificationTask) -> None:
        self.inner = inner
        self.taken = 0
        self.calls: list[int] = []
        self.injected = False

    def evaluate(self, model):
        out = self.inner.evaluate(model)
        if self.calls and not self.injected:
            self.injected = True
            out = {**out, "accuracy": out["accuracy"] - 0.5}
        return out

    def calibration(self):
        return self.inner.calibration()

    def finetune(self, model, steps):
        self.calls.append(steps)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        was_training = model.training
        model.train()
        batches = itertools.cycle(self.inner.calibration())
        for _ in range(steps):
            x, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            self.taken += 1
        model.train(was_training)


def test_adapt_result_counts_the_optimizer_steps_the_task_took(digits, tmp_path):
    data, base = digits
    model = copy.deepcopy(base)
    task = CountingTask(ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val")))
    res = ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.6), tolerance=0.05, ignore=[model.fc],
                   finetune_steps=7, max_iterations=4, run_dir=tmp_path / "run")
    assert task.taken > 0 and res.optimizer_steps == task.taken
    assert [h.optimizer_steps for h in res.history] == task.calls == [7] * len(res.history)
    assert any(not h.accepted for h in res.history) and any(h.accepted for h in res.history)
    assert f"optimizer steps: {task.taken}" in res.summary()

    saved = json.loads((tmp_path / "run" / "state.json").read_text())
    assert [h["optimizer_steps"] for h in saved["history"]] == task.calls
    assert sum(h.optimizer_steps for h in ControllerState.from_data(saved).history) == task.taken

    data_ = report.build(res, tolerance=0.05, budget=ap.Budget(macs=0.6))
    assert data_["optimizer_steps"] == task.taken
    head, rows = steps_table(data_)
    assert [r[head.index("optimizer steps")] for r in rows] == ["7"] * len(res.history)
    assert any(r[0].startswith("optimizer steps") and r[2] == f"{task.taken:,}" for r in summary_table(data_)[1])
    report.save_json(data_, tmp_path / "report.json")
    assert report.load(tmp_path / "report.json")["optimizer_steps"] == task.taken
    interrupted = report.from_state(saved)  # a report from state.json alone sums the steps' counts
    assert interrupted["optimizer_steps"] == task.taken


def test_state_and_report_files_from_before_the_count_still_load(digits, tmp_path):
    data, base = digits
    model = copy.deepcopy(base)
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))
    ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.8), tolerance=0.05, ignore=[model.fc],
             finetune_steps=2, max_iterations=2, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "state.json").read_text())
    for h in saved["history"]:
        del h["optimizer_steps"]
    old = ControllerState.from_data(saved)
    assert old.history and all(h.optimizer_steps == 0 for h in old.history)
    old_report = report.from_state(saved)
    assert old_report["optimizer_steps"] is None
    assert all(r[steps_table(old_report)[0].index("optimizer steps")] == "–" for r in steps_table(old_report)[1])
    assert not any(r[0].startswith("optimizer steps") for r in summary_table(old_report)[1])


def test_the_baseline_gets_what_adapt_spent_in_and_after_its_loop():
    res = type("R", (), {"optimizer_steps": 120})()
    assert demo.baseline_steps(res) == 120  # type: ignore[arg-type]
    assert demo.baseline_steps(res, after=30) == 150  # type: ignore[arg-type]


def test_counting_optimizer_steps_counts_every_step_and_lets_go():
    p = torch.nn.Parameter(torch.ones(3))
    opts = [torch.optim.Adam([p]), torch.optim.SGD([p], lr=0.1)]
    with demo.counting_optimizer_steps() as counted:
        for opt in opts * 2:
            p.grad = torch.ones(3)
            opt.step()
    opts[0].step()  # outside the block: not counted
    assert counted.steps == 4


def test_demo_gives_the_static_baseline_exactly_the_steps_adapt_spent(monkeypatch):
    """Every call of the task's fine-tune is recorded: adapt's (all but the last) and the baseline's (last)."""
    calls: list[int] = []
    original = ap.ClassificationTask.finetune

    def recording(self, model, steps):
        calls.append(steps)
        return original(self, model, steps)

    monkeypatch.setattr(ap.ClassificationTask, "finetune", recording)
    rows, res = demo.run(width=8, epochs=2, finetune_steps=4, max_iterations=3)
    adapt_calls, baseline_call = calls[:-1], calls[-1]
    assert len(adapt_calls) == len(res.history) >= 1
    assert baseline_call == sum(adapt_calls) == res.optimizer_steps > 0
    names = [r[0] for r in rows]
    assert names == ["unpruned", "adaprune.adapt", "static prune (uniform)"]
    assert [r[demo.STEPS] for r in rows] == ["–", str(baseline_call), str(baseline_call)]


def _readme_table() -> tuple[str, list[str], list[list[str]]]:
    text = (ROOT / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "README lost its demo-table markers"
    block = text.split(START)[1].split(END)[0]
    lines = [line.strip() for line in block.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return block, cells[0], cells[2:]


def test_readme_demo_table_is_generated_with_the_same_steps_for_both():
    block, head, rows = _readme_table()
    assert "generated by `make readme`" in block and "load average" in block
    assert head == list(demo.COLUMNS)
    assert [r[0] for r in rows] == ["unpruned", "adaprune.adapt", "static prune (uniform)"]
    steps = [r[demo.STEPS] for r in rows]
    assert steps[0] == "–" and steps[1] == steps[2] and int(steps[1]) > 0
    assert f"spent {steps[1]} optimizer steps" in block and f"got exactly {steps[2]}" in block


def _bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A script of benchmarks/ imported as a module (it puts benchmarks/ on sys.path: undone after)."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks"), *sys.path])
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_script_rewrites_only_the_marked_block(monkeypatch):
    readme = _bench("readme", monkeypatch)
    text = f"intro\n{START}\nold table\n{END}\nafter\n"
    assert readme.replace_block(text, f"{START}\nnew\n{END}") == f"intro\n{START}\nnew\n{END}\nafter\n"
    with pytest.raises(SystemExit, match="once"):
        readme.replace_block("no markers", "")


def test_accuracy_benchmark_gives_every_method_the_same_optimizer_steps(digits, monkeypatch):
    acc = _bench("accuracy", monkeypatch)
    data, base = digits
    d = {k: getattr(data, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    args = argparse.Namespace(adapt_inner_steps=3, adapt_iters=2, tolerance=0.5, adapt_options={})
    recs = {m: acc.run_method(m, base, d["x_train"][:1], d, 0.6, 20, 0, args) for m in ("adapt", "static")}
    for r in recs.values():
        assert r["finetune_steps_total"] == r["optimizer_steps_counted"] == 20
    assert recs["adapt"]["finetune_steps_inside"] == 3 * recs["adapt"]["adapt_steps"] > 0


def test_benchmark_doc_states_the_steps_and_flags_unequal_ones(monkeypatch):
    make_doc = _bench("make_doc", monkeypatch)
    run = {"acc": 0.9, "finetune_steps_inside": 0, "finetune_steps_after": 110, "finetune_steps_total": 110}
    equal = {"static": [run], "adapt": [{**run, "finetune_steps_inside": 30, "finetune_steps_after": 80}]}
    assert make_doc.steps_line(equal, 2, 55).startswith("Optimizer steps: 110 (2 epochs x 55 batches)")
    assert make_doc.steps_cell(equal["adapt"]) == "30 + 80 = 110"
    unequal = {**equal, "tp_l2": [{**run, "finetune_steps_total": 90}]}
    assert "differ" in make_doc.steps_line(unequal, 2, 55)
