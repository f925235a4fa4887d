"""torchvision classifiers prune at 0.5 out of the box, and their plans replay to the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaprune as ap


@pytest.fixture(autouse=True)
def _strict_trace(monkeypatch):
    """ADAPRUNE_STRICT_TRACE=1 for every test of this module: a coupling rule that fails raises
    instead of silently freezing. Set per test (not with os.environ at import time) so it does not
    leak into other test modules collected in the same session. Unknown ops still only warn."""
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


torchvision = pytest.importorskip("torchvision")

MODELS = {
    "resnet18": lambda m: m.fc,
    "mobilenet_v2": lambda m: m.classifier[-1],
    "shufflenet_v2_x1_0": lambda m: m.fc,
}


def _attrs_consistent(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.weight.shape[0] == m.out_channels, name
            assert m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            assert m.weight.shape[0] == m.running_mean.shape[0] == m.num_features, name


def _widths_chain(model: nn.Module, x: torch.Tensor) -> None:
    """Every conv / BN / linear receives exactly the width it was built for (forward hooks)."""
    seen = []

    def hook(mod, inp, out):
        t = inp[0]
        if isinstance(mod, nn.modules.conv._ConvNd):
            assert t.shape[1] == mod.in_channels
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            assert t.shape[1] == mod.num_features
        elif isinstance(mod, nn.Linear):
            assert t.shape[-1] == mod.in_features
        seen.append(mod)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    assert seen


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_prune_half(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    fresh = copy.deepcopy(model)  # a copy made before pruning, for the replay
    head = MODELS[name](model)
    head_shape = tuple(head.weight.shape)

    res = ap.prune(model, x, ratio=0.5, ignore=[head])

    # forward works, output shape unchanged, costs fell
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    assert res.after.macs < res.before.macs
    assert res.after.params < res.before.params
    assert res.after.macs < 0.8 * res.before.macs, res.summary()
    assert res.before == ap.count(fresh, x)
    assert res.after == ap.count(model, x)
    assert res.frozen == []  # nothing in these models needs freezing
    assert tuple(MODELS[name](model).weight.shape) == (head_shape[0], MODELS[name](model).in_features)
    _attrs_consistent(model)
    _widths_chain(model, x)

    # the plan predicts the parameter count
    assert res.plan.predicted_params(fresh) == res.after.params
    assert res.plan.predicted_params(fresh) == sum(p.numel() for p in model.parameters())

    # JSON replay on the pre-pruning copy gives the same weights (before any train-mode forward)
    plan = ap.Plan.from_json(res.plan.to_json())
    ap.apply_plan(fresh, plan, x)
    a, b = model.state_dict(), fresh.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y)

    # and the pruned model trains: a train-mode step with gradients works
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 1000)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
