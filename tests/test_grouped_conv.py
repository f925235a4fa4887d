"""Grouped convolutions (groups > 1, not depthwise): pruned inside every group by default.

``grouped="inside"`` keeps ``groups`` and removes the same positions from every group (the weight's
per-group input dim is shared by all groups); ``grouped="whole"`` removes whole groups. Both must
keep output shapes, module attributes and masked == removed; on RegNet and ResNeXt the default
reaches at least Torch-Pruning's MACs reduction at ratio 0.5.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprune as ap
from adaprune.errors import ArgumentTypeError, ConfigError
from adaprune.planner import plan_for

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _strict_trace(monkeypatch):
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_convs_consistent(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels, name
            assert m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name


def assert_mask_equals_remove(original: nn.Module, pruned: nn.Module, plan: ap.Plan, x: torch.Tensor) -> None:
    handle = ap.mask(original, plan)
    try:
        torch.testing.assert_close(run(original, x), run(pruned, x), rtol=1e-4, atol=1e-5)
    finally:
        handle.undo()


class NeXtBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 -> grouped 3x3 (4 groups of 4) -> 1x1, with a residual add."""

    def __init__(self, groups: int = 4, width: int = 4) -> None:
        super().__init__()
        inner = groups * width
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, inner, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = nn.Conv2d(inner, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.head(x.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def block() -> tuple[NeXtBlock, torch.Tensor]:
    torch.manual_seed(0)
    model = NeXtBlock().eval()
    _randomize_bn(model)
    return model, torch.randn(2, 3, 6, 6)


def test_inside_groups_is_the_default() -> None:
    model, x = block()
    original = copy.deepcopy(model)
    y0 = run(model, x)
    graph = ap.trace(model, x, ignore=[model.head])
    inputs = next(g for g in graph.groups if any((s.tensor, s.dim) == ("conv2.weight", 1) for s in g.slots))
    outputs = next(g for g in graph.groups if any((s.tensor, s.dim) == ("conv2.weight", 0) for s in g.slots))
    assert inputs.size == outputs.size == 4  # position j of each of the 4 groups is one channel
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert (model.conv2.groups, model.conv2.in_channels, model.conv2.out_channels) == (4, 8, 8)
    assert tuple(model.conv2.weight.shape) == (8, 2, 3, 3)
    assert model.conv1.out_channels == model.bn1.num_features == 8
    assert model.conv3.in_channels == 8
    assert run(model, x).shape == y0.shape
    assert_convs_consistent(model)
    removed = res.plan.removals["conv2.weight"][0]
    per_group = [sorted(r % 4 for r in removed if r // 4 == k) for k in range(4)]
    assert all(p == per_group[0] for p in per_group) and len(per_group[0]) == 2  # same positions per group
    assert_mask_equals_remove(original, model, res.plan, x)


def test_whole_groups_on_request() -> None:
    model, x = block()
    original = copy.deepcopy(model)
    graph = ap.trace(model, x, ignore=[model.head], grouped="whole")
    plan = plan_for(model, graph, ratio=0.5)
    ap.apply_plan(model, plan, x)
    assert (model.conv2.groups, model.conv2.in_channels, model.conv2.out_channels) == (2, 8, 8)
    assert tuple(model.conv2.weight.shape) == (8, 4, 3, 3)  # each remaining group keeps its width
    assert_convs_consistent(model)
    assert_mask_equals_remove(original, model, plan, x)


class GroupedOnInput(nn.Module):
    """A grouped conv reading the model's input: its inputs cannot shrink, only its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.g(x)).mean((2, 3)))


def test_outputs_pruned_inside_groups_keep_groups() -> None:
    """Rows pruned inside the groups with the per-group input width unchanged: the conv keeps its 4
    groups (a fixer guessing from the shapes alone would take it for 2 whole groups)."""
    torch.manual_seed(0)
    model, x = GroupedOnInput().eval(), torch.randn(2, 8, 5, 5)
    original = copy.deepcopy(model)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert (model.g.groups, model.g.in_channels, model.g.out_channels) == (4, 8, 8)
    assert_mask_equals_remove(original, model, res.plan, x)


def test_grouped_setting_is_checked() -> None:
    model, x = block()
    with pytest.raises(ConfigError, match="grouped"):
        ap.trace(model, x, grouped="groups")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="grouped"):
        ap.trace(model, x, grouped=2)  # type: ignore[arg-type]


def _torchvision(name: str) -> tuple[nn.Module, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    _randomize_bn(model)
    return model, torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name", ["regnet_y_400mf", "resnext50_32x4d"])
def test_torchvision_grouped_models(name: str) -> None:
    model, x = _torchvision(name)
    original = copy.deepcopy(model)
    grouped = {n: (m.groups, m.in_channels // m.groups) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}
    y0 = run(model, x)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.fc])
    assert run(model, x).shape == y0.shape
    assert_convs_consistent(model)
    mods = dict(model.named_modules())
    for n, (groups, width) in grouped.items():
        conv = mods[n]
        assert conv.groups == groups and conv.in_channels // conv.groups < width, n  # type: ignore[operator]
    assert res.after.macs < 0.3 * res.before.macs
    exact = {g.name for g in res.graph.groups if g.exact}
    assert all(c.name in exact for c in res.plan.groups if c.removed)
    assert_mask_equals_remove(original, model, res.plan, x)


def _torch_pruning_macs(model: nn.Module, x: torch.Tensor, head: nn.Module, ratio: float) -> int:
    """Torch-Pruning's MACs after pruning, run as benchmarks/zoo.py runs it."""
    tp: Any = pytest.importorskip("torch_pruning")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=[head], round_to=None,
        )
        pruner.step()
    return ap.count(model, x).macs


def test_macs_at_half_no_higher_than_torch_pruning() -> None:
    model, x = _torchvision("regnet_y_400mf")
    theirs = copy.deepcopy(model)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.fc])
    assert res.after.macs <= _torch_pruning_macs(theirs, x, theirs.fc, 0.5)  # type: ignore[arg-type]
