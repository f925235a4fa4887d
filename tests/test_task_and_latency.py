"""ClassificationTask (fine-tune, distillation, BN recalibration), latency backends, energy budgets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.cost.energy import energy_uj
from adaprune.cost.latency import measure_latency, quiet_median
from adaprune.errors import ConfigError
from adaprune.examples.digits import DigitsCNN, load_digits_data
from adaprune.task import recalibrate_bn


@pytest.fixture(scope="module")
def data():
    return load_digits_data(0)


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"alpha": 1.5}, {"temperature": 0.0}])
def test_task_rejects_bad_settings(data, kwargs):
    with pytest.raises(ConfigError):
        ap.ClassificationTask(data.loader("train"), data.loader("val"), **kwargs)


def test_distillation_uses_a_frozen_copy_of_the_unpruned_model(data):
    torch.manual_seed(0)
    model = DigitsCNN(8)
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"), distill=True)
    task.set_teacher(model)
    assert task.teacher is not None and task.teacher is not model
    assert not any(p.requires_grad for p in task.teacher.parameters())
    xb, yb = next(iter(data.loader("train")))
    plain = ap.ClassificationTask(data.loader("train"), data.loader("val"))
    assert not torch.allclose(task.loss(model, xb, yb), plain.loss(model, xb, yb))
    before = [p.clone() for p in model.parameters()]
    task.finetune(model, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(task.teacher.state_dict().values(),
                                                  copy.deepcopy(task.teacher).state_dict().values()))


def test_adapt_with_distillation_keeps_the_tolerance(data):
    torch.manual_seed(0)
    model = DigitsCNN(8)
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"), distill=True)
    res = ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.8), tolerance=0.05, ignore=[model.fc],
                   max_iterations=4, finetune_steps=5)
    assert res.before["accuracy"] - res.after["accuracy"] <= 0.05 + 1e-9
    assert task.teacher is not None


def test_bn_recalibration(data):
    torch.manual_seed(0)
    model = DigitsCNN(8)
    bn = model.features[1]
    assert recalibrate_bn(model, [(data.x_train[:64], None)])
    x = model.features[0](data.x_train[:64])
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and bn.training  # settings and train mode restored
    assert not recalibrate_bn(nn.Sequential(nn.Linear(2, 2)), [(torch.zeros(1, 2), None)])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_latency_backends(backend):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    lat = measure_latency(model, torch.randn(4, 3, 16, 16), backend=backend, threads=1, repeats=5)
    assert lat.median_ms > 0 and lat.p90_ms >= lat.median_ms
    assert (lat.backend, lat.threads, lat.batch_size, lat.repeats) == (backend, 1, 4, 5)


def test_quiet_median_keeps_the_undisturbed_block():
    # 30 passes of 1 ms, the first 20 slowed to 3 ms by load from elsewhere: the plain median reports the
    # burst (3 ms), the least disturbed block the model's own time
    times = [3.0] * 20 + [1.0] * 10
    assert quiet_median(times) == 1.0
    assert quiet_median([2.0, 1.0, 3.0]) == 2.0  # too few passes for blocks: the plain median
    assert quiet_median([1.0] * 10 + [3.0] * 20) == 1.0  # wherever the quiet block falls


def test_latency_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="backend"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), backend="tpu")


def test_energy_budget_is_met_by_prune():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 64, 64)
    res = ap.prune(model, x, budget=ap.Budget(energy=0.6), ignore=[model.fc])
    assert res.after.energy_uj <= 0.6 * res.before.energy_uj
    assert res.after.energy_uj == pytest.approx(energy_uj(res.after.macs, res.after.bytes))


def test_prune_refuses_latency_budgets():
    with pytest.raises(ConfigError, match="adapt"):
        ap.prune(nn.Linear(2, 2), torch.zeros(1, 2), budget=ap.Budget(latency=0.5))
