"""Sizes written in the code (``reshape(n, 8)``): tracing cannot see them, so a cut of that width makes
the model fail. adapt leaves such a group out of its probes and cuts the others; it never crashes."""

from __future__ import annotations

import torch
from torch import nn

import adaprune as ap


class HalfFixed(nn.Module):
    """``a``'s width is stated in the code; ``b``, a twin of the same shape (so in the same cluster),
    is free."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).reshape(x.shape[0], 8)
        return self.head(torch.relu(self.b(h)))


class Constant(ap.Task):
    metric, higher_is_better = "m", True

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"m": 1.0}


def test_adapt_cuts_around_a_group_whose_width_is_in_the_code() -> None:
    torch.manual_seed(0)
    model, x = HalfFixed(), torch.randn(2, 4)
    res = ap.adapt(model, x, Constant(), ap.Budget(macs=0.7), tolerance=0.1)
    assert res.budget_met
    assert model.a.out_features == 8 and model.b.out_features < 8  # a kept whole, b cut
    assert model(x).shape == (2, 3)


def test_prune_keeps_that_group_whole_and_says_why() -> None:
    torch.manual_seed(0)
    model, x = HalfFixed(), torch.randn(2, 4)
    res = ap.prune(model, x, ratio=0.5)
    assert model.a.out_features == 8 and model.b.out_features == 4
    assert [f.op for f in res.frozen if f.module == "a"] == ["surgery check"]
