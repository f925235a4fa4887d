"""``split`` / ``split_with_sizes`` whose sizes come from module attributes that a registered fixer
keeps equal to the pruned tensors: the pieces prune (equal sizes in lockstep, different sizes on
their own); literal sizes, or a module without a fixer, keep the split channels whole."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.layers import unregister_layer
from adaprune.surgery import register_fixer

torch.set_num_threads(1)
DIM = 6


@pytest.fixture(autouse=True)
def _strict_trace(monkeypatch):
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


class Fused(nn.Module):
    """One projection split into q (``q_size``) and k, v (``kv_size`` each), as GQA attention does."""

    def __init__(self, q_size: int, kv_size: int, literal: bool = False) -> None:
        super().__init__()
        self.q_size, self.kv_size, self.literal = q_size, kv_size, literal
        self.qkv = nn.Linear(DIM, q_size + 2 * kv_size)
        self.out_q = nn.Linear(q_size, DIM)
        self.out_kv = nn.Linear(kv_size, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.literal:  # a size written in the code (no attribute holds 2): the fixer cannot update it
            p = self.qkv(x).split(2, dim=-1)
            q, k, v = torch.cat(p[:4], -1), torch.cat(p[4:6], -1), torch.cat(p[6:], -1)
        else:
            q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.out_q(torch.relu(q)) + self.out_kv(torch.relu(k) * v)


def _fix_fused(m: Any, old: dict[str, Any]) -> None:
    m.q_size = m.out_q.in_features
    m.kv_size = m.out_kv.in_features


@pytest.fixture(autouse=True)
def _fused_fixer():
    """Fused's fixer, registered for these tests only (the layer matrix checks the registry's own kinds)."""
    register_fixer(Fused)(_fix_fused)
    try:
        yield
    finally:
        unregister_layer(Fused)


class NoFixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Fused(8, 4)
        self.split_size = 4
        self.qkv = nn.Linear(DIM, 12)
        self.out = nn.Linear(4, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.qkv(x).split(self.split_size, dim=-1)
        return self.inner(x) + self.out(a * b + c)


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_unequal_sizes_from_attributes_prune() -> None:
    torch.manual_seed(0)
    model, x = Net(Fused(8, 4)), torch.randn(2, 5, DIM)
    original = copy.deepcopy(model)
    graph = ap.trace(model, x, ignore=[model.head])
    sizes = sorted(g.size for g in graph.groups if any(s.tensor == "block.qkv.weight" for s in g.slots))
    assert sizes == [4, 8]  # q on its own; k and v in lockstep (equal widths)
    assert not any(f.op == "split" for f in graph.frozen)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert (model.block.q_size, model.block.kv_size, model.block.qkv.out_features) == (4, 2, 8)
    assert run(model, x).shape == (2, 5, 3)
    handle = ap.mask(original, res.plan)
    torch.testing.assert_close(run(original, x), run(model, x), rtol=1e-4, atol=1e-5)
    handle.undo()


def test_literal_sizes_stay_whole_even_with_a_fixer() -> None:
    torch.manual_seed(0)
    model, x = Net(Fused(8, 4, literal=True)), torch.randn(2, 5, DIM)
    graph = ap.trace(model, x, ignore=[model.head])
    assert any(f.op == "split" and f.module == "block" for f in graph.frozen)
    assert not any(s.tensor == "block.qkv.weight" and s.dim == 0 for g in graph.groups for s in g.slots)


def test_module_without_fixer_keeps_its_split_whole() -> None:
    torch.manual_seed(0)
    model, x = Net(NoFixer()), torch.randn(2, 5, DIM)
    graph = ap.trace(model, x, ignore=[model.head])
    assert any(f.op == "split" and f.module == "block" for f in graph.frozen)
    assert not any(s.tensor == "block.qkv.weight" and s.dim == 0 for g in graph.groups for s in g.slots)
    assert any(s.tensor == "block.inner.qkv.weight" and s.dim == 0 for g in graph.groups for s in g.slots)
    ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert model.block.qkv.out_features == 12 and model.block.inner.q_size == 4
