"""Least-squares reconstruction of the layers that lost inputs (surgery/reconstruct.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError
from adaprune.examples.digits import DigitsCNN, load_digits_data, train
from adaprune.surgery import reconstruct


def _plan_cutting(model: nn.Module, x: torch.Tensor, keep: dict[str, list[int]]) -> ap.Plan:
    """A plan removing every output channel of the named producers except ``keep`` (traced coupling)."""
    graph = ap.trace(model, x)
    chosen = {}
    for g in graph.groups:
        prod = next((s for s in g.slots if s.is_param and s.dim == 0 and s.tensor.endswith(".weight")), None)
        if prod is not None and prod.tensor[: -len(".weight")] in keep:
            chosen[g.name] = [c for c in range(g.size) if c not in keep[prod.tensor[: -len(".weight")]]]
    from adaprune.plan import plan_from_choice

    return plan_from_choice(graph, chosen)


class Low(nn.Module):
    """Producer of rank 2 (six outputs are combinations of two), a linear consumer: refit is exact."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.conv = conv
        if conv:
            self.a = nn.Conv1d(2, 6, 1, bias=False)
            self.b = nn.Conv1d(6, 3, 3, padding=1, stride=2, dilation=2)
        else:
            self.a = nn.Linear(2, 6, bias=False)
            self.b = nn.Linear(6, 3)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(6, 2, *self.a.weight.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("conv", [False, True])
def test_exact_when_the_kept_channels_span_the_removed_ones(conv):
    torch.manual_seed(0)
    model = Low(conv).eval()
    x = torch.randn(16, 2, 20) if conv else torch.randn(64, 2)
    original = copy.deepcopy(model)
    want = original(x)
    plan = _plan_cutting(model, x[:1], {"a": [1, 4]})
    ap.remove(model, plan)
    assert model.a.weight.shape[0] == 2 and model.b.weight.shape[1] == 2
    sliced = (model(x) - want).abs().max()
    report = reconstruct(model, original, [(x, None)], plan.removals, ridge=0.0)
    assert "b" in report.refit and report.refit["b"][1] < 1e-5 < report.refit["b"][0]
    assert (model(x) - want).abs().max() < 1e-4 < sliced
    for p, q in zip(original.parameters(), Low(conv).parameters()):  # the original keeps its shapes
        assert p.shape == q.shape


def test_skips_what_it_cannot_refit_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(4, 3, 8, 8)
    original = copy.deepcopy(model)
    plan = _plan_cutting(model, x[:1], {"0": [0, 1, 2, 3]})
    ap.remove(model, plan)
    report = reconstruct(model, original, [x], plan.removals)
    assert report.skipped.get("2") == "grouped convolution"
    assert "4" in report.refit
    # without the plan, a layer whose output width also changed cannot be matched channel for channel
    chain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    before = copy.deepcopy(chain)
    ap.remove(chain, _plan_cutting(chain, x[:1], {"0": [0, 1, 2], "2": [0, 1, 2, 3, 4]}))
    assert "no plan says which" in reconstruct(chain, before, [x]).skipped["2"]


def test_bad_arguments():
    m = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="ridge"):
        reconstruct(m, m, [torch.zeros(1, 2)], ridge=-1)
    with pytest.raises(ConfigError, match="calibration batch"):
        reconstruct(m, m, [])


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    data = load_digits_data(0)
    model = DigitsCNN(16)
    train(model, data, epochs=8, seed=0)
    return data, model


def _acc(model, data):
    model.eval()
    with torch.no_grad():
        return float((model(data.x_val).argmax(1) == data.y_val).float().mean())


def test_recovers_a_one_shot_prune_of_a_trained_cnn(digits):
    """Half the channels of a trained CNN, no fine-tuning: refit layers get closer to the original outputs
    and the accuracy comes back (it collapses without refitting)."""
    data, base = digits
    model = copy.deepcopy(base)
    modes = {n: m.training for n, m in base.named_modules()}
    res = ap.prune(model, data.x_val[:1], ratio=0.5, ignore=[model.fc])
    sliced = _acc(model, data)
    calib = [(data.x_train[i:i + 64], None) for i in range(0, 512, 64)]
    report = reconstruct(model, base, calib, res.plan.removals)
    assert report.refit and not report.skipped
    assert all(after < before for before, after in report.refit.values())
    ap.task.recalibrate_bn(model, calib)
    assert _acc(model, data) > max(sliced + 0.2, 0.8)
    assert {n: m.training for n, m in base.named_modules()} == modes


def test_adapt_keeps_the_width_floor(digits):
    data, base = digits
    model = copy.deepcopy(base)
    widths = [m.out_channels for m in base.modules() if isinstance(m, nn.Conv2d)]
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))
    res = ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.05), tolerance=0.9, ignore=[model.fc],
                   min_width=0.4, finetune_steps=0, max_iterations=6)
    assert not res.budget_met  # a floor of 40% of every width cannot reach 5% of the MACs
    now = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert now != widths
    assert all(n >= 0.4 * w for n, w in zip(now, widths)), (now, widths)


@pytest.mark.parametrize("opt", [{"min_width": 1.0}, {"min_width": -0.1}, {"reconstruct_ridge": -1.0}])
def test_adapt_rejects_bad_floor_and_ridge(opt):
    with pytest.raises(ConfigError, match=next(iter(opt))):
        ap.adapt(nn.Linear(2, 2), torch.zeros(1, 2), ap.ClassificationTask([], []), ap.Budget(macs=0.5), **opt)


def test_prune_refit(digits):
    data, base = digits
    calib = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, 512, 64)]
    plain, refit = copy.deepcopy(base), copy.deepcopy(base)
    ap.prune(plain, data.x_val[:1], budget=ap.Budget(macs=0.25), ignore=[plain.fc])
    res = ap.prune(refit, data.x_val[:1], budget=ap.Budget(macs=0.25), ignore=[refit.fc], calibration=calib,
                   refit=True)
    assert res.reconstruction is not None and res.reconstruction.refit
    assert [p.shape for p in plain.parameters()] == [p.shape for p in refit.parameters()]
    assert _acc(refit, data) > _acc(plain, data) + 0.2
    with pytest.raises(ConfigError, match="calibration"):
        ap.prune(copy.deepcopy(base), data.x_val[:1], ratio=0.5, refit=True)


def test_cross_validated_ridge_does_not_overfit_few_samples():
    """A consumer with more inputs than calibration samples: a plain least-squares fit matches the
    calibration samples and fails on new ones; the cross-validated ridge does not do worse than the
    sliced weights on new samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 60), nn.ReLU(), nn.Linear(60, 5)).eval()
    original = copy.deepcopy(model)
    plan = _plan_cutting(model, torch.randn(1, 30), {"0": list(range(40))})
    ap.remove(model, plan)
    calib, fresh = torch.randn(24, 30), torch.randn(512, 30)

    def fresh_error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(fresh) - original(fresh)).pow(2).mean())

    sliced = fresh_error(model)
    exact, cv = copy.deepcopy(model), copy.deepcopy(model)
    reconstruct(exact, original, [calib], plan.removals, ridge=0.0)
    reconstruct(cv, original, [calib], plan.removals)
    assert fresh_error(exact) > fresh_error(cv)
    assert fresh_error(cv) <= sliced * 1.001
