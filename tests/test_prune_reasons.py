"""A prune that removes nothing says why: pinned by the output, by ``ignore``, by an op the graph does
not understand (named), by sizes fixed in the code, by the check after surgery, or by the limits."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.graph import UnsupportedOpWarning

torch.set_num_threads(1)


class MLP(nn.Module):
    def __init__(self, op: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = torch.special.erfcx(h) if self.op == "erfcx" else torch.relu(h)
        return self.fc2(h)


class FixedViews(nn.Module):
    """Two branches whose width the code states as a constant (``view(B, 8)``): tracing cannot see it,
    the check after surgery can."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.head(torch.cat([self.a(x).reshape(n, 8), self.b(x).reshape(n, 8)], 1))


def prune(model: nn.Module, **kwargs) -> ap.PruneResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        return ap.prune(model, torch.randn(2, 4), **kwargs)


def test_something_pruned_has_no_reason() -> None:
    res = prune(MLP(), ratio=0.5)
    assert not res.plan.is_empty and res.reason == ""
    assert "nothing" not in res.summary()


def test_pinned_by_the_output() -> None:
    res = prune(nn.Linear(4, 3), ratio=0.5)
    assert res.plan.is_empty
    assert res.reason.startswith("every channel is pinned") and "model's output" in res.reason
    assert res.reason in res.summary() and "nothing was pruned" in res.summary()


def test_pinned_by_ignore() -> None:
    model = MLP()
    res = prune(model, ratio=0.5, ignore=[model.fc1])
    assert res.plan.is_empty
    assert "`ignore`" in res.reason and "'fc1'" in res.reason


def test_pinned_by_an_unknown_op_names_it() -> None:
    res = prune(MLP("erfcx"), ratio=0.5)
    assert res.plan.is_empty
    assert "does not understand" in res.reason and "'special.erfcx' in <model>" in res.reason


def test_the_limits() -> None:
    assert "ratio=0" in prune(MLP(), ratio=0.0).reason
    res = prune(MLP(), ratio=0.5, min_channels=8)
    assert res.plan.is_empty
    assert res.reason.startswith("the limits") and "min_channels" in res.reason


def test_every_group_broken_by_the_surgery_check() -> None:
    res = prune(FixedViews(), ratio=0.5)
    assert res.plan.is_empty
    assert "surgery check" in res.reason and res.reason.endswith("groups a, b")


class OneFixedView(nn.Module):
    """One prunable group, whose width the code states as a constant: cutting it breaks the model."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x).reshape(x.shape[0], 8))


def test_the_only_group_broken_by_the_surgery_check_is_kept_whole_too() -> None:
    """One broken group is treated as two are: kept whole and named, not an exception."""
    model = OneFixedView()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune(model, ratio=0.5)
    assert res.plan.is_empty and [f.op for f in res.frozen if f.module == "a"] == ["surgery check"]
    assert "surgery check" in res.reason and "breaks the model" in res.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_reason_is_derived_not_stored(ratio: float) -> None:
    """The reason follows the result's own data (a result rebuilt with another plan says so too)."""
    res = prune(MLP(), ratio=ratio)
    assert bool(res.reason) == res.plan.is_empty
