"""adapt(loss=...): gradient-based criteria (taylor) use the caller's loss on the task's calibration
batches, as prune(loss=...) does; without it, the default (cross-entropy on logits) refuses targets it
cannot use, with a typed error naming the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import AdapruneError, ArgumentTypeError

torch.manual_seed(0)
X = torch.randn(64, 6)
Y = X @ torch.randn(6, 2)  # a regression target: float, two outputs


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


class Regression(ap.Task):
    metric, higher_is_better = "neg_mse", True

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"neg_mse": -float(nn.functional.mse_loss(model(X), Y))}

    def calibration(self):
        return [(X[:32], Y[:32]), (X[32:], Y[32:])]


def test_taylor_uses_the_given_loss() -> None:
    calls = []

    def mse(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(targets.shape))
        return nn.functional.mse_loss(output, targets)

    model = net()
    res = ap.adapt(model, X[:2], Regression(), ap.Budget(macs=0.6), tolerance=0.9, importance="taylor", loss=mse)
    assert calls and all(shape == (32, 2) for shape in calls)
    assert res.budget_met and ap.count(model, X[:2]).macs <= 0.6 * ap.count(net(), X[:2]).macs


def test_without_a_loss_float_targets_are_a_typed_error() -> None:
    with pytest.raises(AdapruneError, match="loss="):
        ap.adapt(net(), X[:2], Regression(), ap.Budget(macs=0.6), tolerance=0.9, importance="taylor")


def test_loss_must_be_callable() -> None:
    with pytest.raises(ArgumentTypeError, match="loss"):
        ap.adapt(net(), X[:2], Regression(), ap.Budget(macs=0.6), loss="mse")


def test_a_hugging_face_output_with_its_own_loss_is_the_default_loss() -> None:
    """Given labels, a transformers model computes its loss: taylor uses it (no loss= needed)."""
    import warnings

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=100, num_labels=3)).eval()
    ids = torch.randint(0, 100, (4, 8))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ap.prune(model, {"input_ids": ids}, ratio=0.3, importance="taylor", calibration=[(batch, None)])
    assert not res.plan.is_empty
