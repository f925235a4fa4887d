"""Least-squares reconstruction is dropped when the task's metric says it hurts.

With ``reconstruct=None`` (the default) a step on a model with BatchNorm evaluates the cut model as it
is and refitted, keeps the refit unless it measurably lowers the metric (paired interval) and says so
in ``record.refit`` (both metrics); on a model
without BatchNorm nothing is tried (``refit == ""``). A refit that damages the model is dropped (the
step's model and metric are the plain ones); one that helps is kept.
"""

from __future__ import annotations

import copy
import importlib
import re

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.examples.digits import DigitsCNN, load_digits_data, train

recovery = importlib.import_module("adaprune.adapt.recovery")  # the controller's recovery (refit, recalibration)

pytestmark = pytest.mark.usefixtures("one_thread")

SAID = re.compile(r"^refit (kept|dropped) \((\w+) (-?[0-9.]+) without, (-?[0-9.]+) with\)$")


@pytest.fixture(scope="module")
def digits():
    data = load_digits_data(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = DigitsCNN(8)
        train(model, data, epochs=3, seed=0)
    finally:
        torch.set_num_threads(threads)
    return data, model


def task_of(data) -> ap.ClassificationTask:
    return ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))


def adapt(model: nn.Module, data, task=None, **options) -> ap.AdaptResult:
    options = {"tolerance": 0.05, "finetune_steps": 0, "max_iterations": 2, **options}
    return ap.adapt(model, data.x_val[:1], task or task_of(data), ap.Budget(macs=0.6), ignore=[model.fc], **options)


def said(record) -> tuple[bool, float, float]:
    """(kept, metric without, metric with) from ``record.refit``."""
    found = SAID.match(record.refit)
    assert found, record.refit
    return found.group(1) == "kept", float(found.group(3)), float(found.group(4))


def test_a_batchnorm_model_tries_the_refit_and_drops_it_only_when_worse(digits) -> None:
    data, base = digits
    res = adapt(copy.deepcopy(base), data)
    assert res.history
    for h in res.history:
        kept, without, with_ = said(h)
        if with_ > without:
            assert kept  # a better refit is always kept
        if not kept:
            assert with_ < without  # dropped only when worse (and then beyond the paired interval)
        # without fine-tuning, the step's metric is the kept model's
        assert h.metrics["accuracy"] == pytest.approx(with_ if kept else without, abs=5e-5)


def test_reconstruct_false_tries_nothing(digits) -> None:
    data, base = digits
    res = adapt(copy.deepcopy(base), data, reconstruct=False)
    assert res.history and all(h.refit == "" for h in res.history)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def test_no_refit_by_default_without_batchnorm(digits) -> None:
    data, _ = digits
    model = mlp()
    res = ap.adapt(model, data.x_val[:1], task_of(data), ap.Budget(macs=0.6), ignore=[model[5]], tolerance=0.5,
                   finetune_steps=0, max_iterations=2)
    assert res.history and all(h.refit == "" for h in res.history)
    forced = mlp()
    res = ap.adapt(forced, data.x_val[:1], task_of(data), ap.Budget(macs=0.6), ignore=[forced[5]], tolerance=0.5,
                   finetune_steps=0, max_iterations=2, reconstruct=True)
    assert res.history and all(SAID.match(h.refit) for h in res.history)


def test_a_refit_that_hurts_is_dropped(digits, monkeypatch) -> None:
    """The refit, then noise on every weight: the metric with it collapses; each step keeps the plain
    model, whose metric is the step's, and the adapted model is that one."""
    data, base = digits
    real = recovery.reconstruct

    def damaging(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        return out

    monkeypatch.setattr(recovery, "reconstruct", damaging)
    model = copy.deepcopy(base)
    task = task_of(data)
    res = adapt(model, data, task)
    assert any(h.accepted for h in res.history)
    for h in res.history:
        kept, without, with_ = said(h)
        assert not kept and with_ < without - 0.3
        assert h.metrics["accuracy"] == pytest.approx(without, abs=5e-5)
    accepted = [h for h in res.history if h.accepted]
    assert task.evaluate(model)["accuracy"] == accepted[-1].metrics["accuracy"] == res.after["accuracy"]


class Marked(ap.Task):
    """Scores 0.75 when the classifier's bias is all 7 (the mark the stub refit leaves), else 0.5."""

    metric, higher_is_better = "score", True

    def __init__(self, data) -> None:
        self.batches = [(data.x_train[:64], data.y_train[:64])]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"score": 0.75 if bool((model.fc.bias == 7.0).all()) else 0.5}

    def calibration(self):
        return self.batches


def test_a_refit_that_helps_is_kept(digits, monkeypatch) -> None:
    data, base = digits

    def marking(model, *args, **kwargs):
        with torch.no_grad():
            model.fc.bias.fill_(7.0)

    monkeypatch.setattr(recovery, "reconstruct", marking)
    model = copy.deepcopy(base)
    res = adapt(model, data, Marked(data), max_iterations=1)
    (h,) = res.history
    assert said(h) == (True, 0.5, 0.75)
    assert h.accepted and h.metrics["score"] == 0.75
    assert bool((model.fc.bias == 7.0).all())  # the refitted model is the one kept
