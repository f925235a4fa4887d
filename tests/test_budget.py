"""Budgets: ``prune(budget=Budget(...))`` meets the bound on the exact cost, without overshooting much.

- ``Budget(macs=0.5)`` leaves between 40% and 50% of the original MACs (measured with ``ap.count`` on
  the pruned model) for torchvision resnet18 and mobilenet_v2 and a small HF BERT, with ``uniform``
  and ``global`` allocation;
- ``params=`` and ``bytes=`` budgets (relative and absolute) are met as well, also with ``round_to``;
- a budget the limits make impossible raises ``BudgetUnreachableError`` naming the costs, and the
  model is left exactly as it was;
- ``Budget`` validates its fields.
"""

from __future__ import annotations

import os

os.environ["ADAPRUNE_STRICT_TRACE"] = "1"

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
import transformers
from torch import nn

import adaprune as ap
from adaprune.errors import BudgetUnreachableError, ConfigError

torch.set_num_threads(1)

Case = tuple[nn.Module, Any, nn.Module]


def resnet18() -> Case:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    return m, torch.randn(1, 3, 64, 64), m.fc


def mobilenet_v2() -> Case:
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    return m, torch.randn(1, 3, 64, 64), m.classifier[1]


def bert() -> Case:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=3,
    )
    m = transformers.BertForSequenceClassification(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    x = {
        "input_ids": torch.randint(0, 100, (2, 16), generator=gen),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
    }
    return m, x, m.classifier


MODELS: dict[str, Callable[[], Case]] = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "bert": bert}


def logits(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], out_before: torch.Tensor, x: Any) -> None:
    now = model.state_dict()
    assert list(now) == list(before), "state_dict names or order changed"
    for k, old in before.items():
        assert now[k].shape == old.shape, f"{k}: {tuple(old.shape)} -> {tuple(now[k].shape)}"
        assert torch.equal(now[k], old), f"{k} changed"
    assert torch.equal(logits(model, x), out_before)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_macs_budget_is_met_without_overshooting(model_name: str, allocation: str) -> None:
    model, x, head = MODELS[model_name]()
    out_shape = logits(model, x).shape
    original = ap.count(model, x)

    res = ap.prune(model, x, budget=ap.Budget(macs=0.5), allocation=allocation, ignore=[head])

    after = ap.count(model, x)
    frac = after.macs / original.macs
    assert frac <= 0.5, f"{model_name}/{allocation}: {frac:.1%} of the original MACs, bound 50%"
    assert frac >= 0.4, f"{model_name}/{allocation}: {frac:.1%} of the original MACs: pruned far past the bound"
    assert res.before == original
    assert res.after == after
    assert 0.0 < res.ratio < 1.0
    assert logits(model, x).shape == out_shape
    assert torch.isfinite(logits(model, x)).all()


@pytest.mark.parametrize(
    "budget_kwargs",
    [{"params": 0.5}, {"bytes": 0.5}, {"macs": 0.7, "params": 0.6}, {"params": 5_000_000}],
    ids=["params", "bytes", "macs+params", "params-absolute"],
)
def test_params_and_bytes_budgets_are_met(budget_kwargs: dict) -> None:
    model, x, head = resnet18()
    original = ap.count(model, x)
    budget = ap.Budget(**budget_kwargs)
    ap.prune(model, x, budget=budget, allocation="uniform", ignore=[head])
    after = ap.count(model, x)
    for field, bound in budget_kwargs.items():
        limit = bound * getattr(original, field) if bound <= 1 else bound
        got = getattr(after, field)
        assert got <= limit, f"{field}: {got:,} > bound {limit:,.0f}"
        assert got >= 0.8 * limit, f"{field}: {got:,} is far below the bound {limit:,.0f}"


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "bert"])
def test_bytes_budget_on_other_models(model_name: str) -> None:
    model, x, head = MODELS[model_name]()
    original = ap.count(model, x)
    ap.prune(model, x, budget=ap.Budget(bytes=0.6), allocation="global", ignore=[head])
    after = ap.count(model, x)
    assert after.bytes <= 0.6 * original.bytes
    assert after.bytes >= 0.45 * original.bytes


def test_budget_met_with_round_to() -> None:
    model, x, head = resnet18()
    original = ap.count(model, x)
    res = ap.prune(model, x, budget=ap.Budget(macs=0.5), round_to=8, ignore=[head])
    assert ap.count(model, x).macs <= 0.5 * original.macs
    for cut in res.plan.groups:
        kept = cut.size - len(cut.removed)
        assert kept == cut.size or kept % 8 == 0, cut


def test_budget_already_met_removes_nothing() -> None:
    model, x, head = resnet18()
    before = snapshot(model)
    out = logits(model, x)
    res = ap.prune(model, x, budget=ap.Budget(macs=1.0), ignore=[head])
    assert res.plan.is_empty
    assert_unchanged(model, before, out, x)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_unreachable_budget_raises_and_leaves_the_model_unchanged(model_name: str) -> None:
    model, x, head = MODELS[model_name]()
    before = snapshot(model)
    out = logits(model, x)
    with pytest.raises(BudgetUnreachableError) as info:
        ap.prune(model, x, budget=ap.Budget(macs=0.01), max_ratio=0.3, ignore=[head])
    msg = str(info.value)
    assert "macs" in msg and "%" in msg, msg
    assert "1.0%" in msg, f"the message should give the bound: {msg}"
    assert isinstance(info.value, ValueError)
    assert_unchanged(model, before, out, x)


def test_unreachable_params_budget_names_params() -> None:
    model, x, head = resnet18()
    before = snapshot(model)
    out = logits(model, x)
    with pytest.raises(BudgetUnreachableError, match="params"):
        ap.prune(model, x, budget=ap.Budget(params=100), min_channels=16, ignore=[head])
    assert_unchanged(model, before, out, x)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"macs": 0}, {"macs": -0.5}, {"params": 0.0}, {"bytes": -3}, {"macs": True},
     {"macs": "0.5"}, {"macs": 0.5, "params": -1}, {"macs": float("nan")}],
    ids=["none", "zero", "negative", "params-zero", "bytes-negative", "bool", "str", "one-bad", "nan"],
)
def test_invalid_budget_raises_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        ap.Budget(**kwargs)


def test_ratio_and_budget_together_raise_config_error() -> None:
    model, x, head = resnet18()
    before = snapshot(model)
    out = logits(model, x)
    with pytest.raises(ConfigError, match="budget"):
        ap.prune(model, x, ratio=0.3, budget=ap.Budget(macs=0.5), ignore=[head])
    with pytest.raises(ConfigError):
        ap.prune(model, x, budget={"macs": 0.5}, ignore=[head])  # type: ignore[arg-type]
    assert_unchanged(model, before, out, x)


def test_absolute_budget_means_the_same_on_a_pruned_copy() -> None:
    """``Budget.absolute(original)`` states relative bounds as amounts: latency through ``latency_ms``,
    counts as they are; an absolute bound stays, backend and threads carry over."""
    original = {"macs": 1000.0, "params": 400.0, "latency": 8.0}
    b = ap.Budget(macs=0.5, params=300, latency=0.25, backend="onnxruntime", threads=2)
    a = b.absolute(original)
    assert a == ap.Budget(macs=500.0, params=300, latency_ms=2.0, backend="onnxruntime", threads=2)
    assert a.limits({"macs": 7.0, "params": 1.0, "latency": 1.0}) == b.limits(original)
