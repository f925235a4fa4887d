"""Recurrent layers (nn.LSTM / nn.GRU / nn.RNN and their cells): hidden units are channels.

Every configuration (single and stacked, bidirectional, batch_first, packed sequences, LSTM
projections) must: prune its hidden units at ratio 0.5 with unchanged output shapes and consistent
size attributes; lose nothing when exactly its dead units (all their weights zero) are removed; give
the same outputs masked and removed; replay from plan JSON; count MACs (fused oneDNN/cuDNN kernels
included) and save/load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import adaprune as ap
from adaprune.cost.predict import CostPredictor
from adaprune.importance import Context, default_loss, get_importance
from adaprune.plan import plan_from_choice
from adaprune.planner import plan_for

torch.set_num_threads(1)
VOCAB, EMB, HIDDEN, T, B = 11, 6, 8, 5, 3


@pytest.fixture(autouse=True)
def _strict_trace(monkeypatch):
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


@dataclass(frozen=True)
class Case:
    kind: str = "LSTM"
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    proj: int = 0
    packed: bool = False

    @property
    def id(self) -> str:
        bits = [self.kind, f"L{self.layers}"]
        bits += [b for b, on in (("bi", self.bidirectional), ("bf", self.batch_first), ("packed", self.packed)) if on]
        return "-".join(bits + ([f"proj{self.proj}"] if self.proj else []))


class Tagger(nn.Module):
    """Embedding -> recurrent layer -> per-step linear head (the head reads both directions)."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case
        self.emb = nn.Embedding(VOCAB, EMB)
        extra = {"proj_size": case.proj} if case.proj else {}
        self.rnn = getattr(nn, case.kind)(
            EMB, HIDDEN, num_layers=case.layers, bidirectional=case.bidirectional,
            batch_first=case.batch_first, **extra,
        )
        width = (case.proj or HIDDEN) * (2 if case.bidirectional else 1)
        self.head = nn.Linear(width, 4)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x: Any = self.emb(tokens)
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.case.batch_first, enforce_sorted=False)
        out, _ = self.rnn(x)
        if lengths is not None:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.case.batch_first)
        return self.head(out)


CASES = [
    Case("LSTM"),
    Case("LSTM", layers=2),
    Case("LSTM", bidirectional=True),
    Case("LSTM", layers=2, bidirectional=True, batch_first=True),
    Case("LSTM", batch_first=True, packed=True),
    Case("LSTM", layers=2, bidirectional=True, packed=True),
    Case("LSTM", proj=5),
    Case("LSTM", layers=2, bidirectional=True, proj=5),
    Case("GRU"),
    Case("GRU", layers=2, bidirectional=True, batch_first=True, packed=True),
    Case("RNN"),
    Case("RNN", layers=2, bidirectional=True),
]
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def build(case: Case, seed: int = 0) -> tuple[Tagger, Any]:
    torch.manual_seed(seed)
    model = Tagger(case).eval()
    tokens = torch.randint(0, VOCAB, (B, T) if case.batch_first else (T, B))
    return model, ((tokens, torch.tensor([T, 2, 4])) if case.packed else tokens)


def run(model: nn.Module, x: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def units_group(graph: ap.Graph, tensor: str = "rnn.weight_hh_l0", dim: int = 0) -> ap.Group:
    found = [g for g in graph.groups if any((s.tensor, s.dim) == (tensor, dim) for s in g.slots)]
    assert len(found) == 1, [g.name for g in graph.groups]
    return found[0]


def assert_rnn_consistent(rnn: nn.RNNBase, case: Case) -> None:
    """Every layer's and direction's weights agree with the module's size attributes."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[case.kind]
    width = rnn.proj_size or rnn.hidden_size
    dirs = 2 if rnn.bidirectional else 1
    for k in range(rnn.num_layers):
        for sfx in ["", "_reverse"][:dirs]:
            w_in = rnn.input_size if k == 0 else width * dirs
            assert tuple(getattr(rnn, f"weight_ih_l{k}{sfx}").shape) == (gates * rnn.hidden_size, w_in)
            assert tuple(getattr(rnn, f"weight_hh_l{k}{sfx}").shape) == (gates * rnn.hidden_size, width)
            assert tuple(getattr(rnn, f"bias_ih_l{k}{sfx}").shape) == (gates * rnn.hidden_size,)
            if rnn.proj_size:
                assert tuple(getattr(rnn, f"weight_hr_l{k}{sfx}").shape) == (rnn.proj_size, rnn.hidden_size)
    assert all(a is b for a, b in zip(rnn._flat_weights, rnn.parameters()))


@cases
def test_prune_shrinks_hidden_units(case: Case) -> None:
    model, x = build(case)
    original = copy.deepcopy(model)
    y0 = run(model, x)
    graph = ap.trace(model, x, ignore=[model.head])
    units = units_group(graph)
    assert units.size == HIDDEN and units.exact
    if case.proj:
        assert units_group(graph, "rnn.weight_hr_l0").size == case.proj
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert model.rnn.hidden_size == HIDDEN // 2
    assert model.rnn.proj_size == (case.proj - case.proj // 2 if case.proj else 0)
    assert model.rnn.input_size == model.emb.embedding_dim == EMB // 2  # layer 0 follows the embedding
    assert_rnn_consistent(model.rnn, case)
    y1 = run(model, x)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    assert res.after.macs < res.before.macs
    assert res.after == ap.count(model, x)
    assert res.plan.predicted_params(original) == res.after.params
    assert model.head.out_features == 4


def _zero_channels(model: nn.Module, group: ap.Group, channels: list[int]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for c in channels:
            for (tensor, dim), pos in group.positions(c).items():
                if tensor in params:
                    params[tensor].index_fill_(dim, torch.tensor(pos), 0.0)


@cases
def test_removing_dead_units_changes_no_output(case: Case) -> None:
    """Units whose weights are all zero output 0 from a zero state (every gate pre-activation is 0):
    removing exactly those changes no output, and l2 scores them lowest."""
    model, x = build(case, seed=1)
    graph = ap.trace(model, x, ignore=[model.head])
    tensor = "rnn.weight_hr_l0" if case.proj else "rnn.weight_hh_l0"
    group = units_group(graph, tensor)
    dead = [1, 4] if group.size > 4 else [0, 3]
    _zero_channels(model, group, dead)
    y0 = run(model, x)
    scores = get_importance("l2")(model, [group], Context(None, default_loss))[group.name]
    assert set(scores.argsort()[: len(dead)].tolist()) == set(dead)
    plan = plan_from_choice(graph, {group.name: dead})
    ap.apply_plan(model, plan, x)
    torch.testing.assert_close(run(model, x), y0, rtol=1e-4, atol=1e-5)


@cases
def test_mask_and_remove_agree(case: Case) -> None:
    model, x = build(case, seed=2)
    graph = ap.trace(model, x, ignore=[model.head])
    plan = plan_for(model, graph, ratio=0.5, importance="random")
    removed = copy.deepcopy(model)
    ap.remove(removed, plan)
    handle = ap.mask(model, plan)
    try:
        torch.testing.assert_close(run(model, x), run(removed, x), rtol=1e-4, atol=1e-5)
    finally:
        handle.undo()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@cases
def test_plan_json_replays_to_same_model(case: Case) -> None:
    model, x = build(case, seed=3)
    original = copy.deepcopy(model)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    back = ap.Plan.from_json(res.plan.to_json())
    assert back == res.plan
    fresh = ap.apply_plan(copy.deepcopy(original), back, x)
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(run(fresh, x), run(model, x))


@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[9]], ids=[CASES[i].id for i in (3, 7, 9)])
def test_save_and_load(case: Case, tmp_path) -> None:
    model, x = build(case, seed=4)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    ap.save(res, tmp_path / "out")
    loaded = ap.load(tmp_path / "out", lambda: Tagger(case))
    assert loaded.rnn.hidden_size == model.rnn.hidden_size
    assert_rnn_consistent(loaded.rnn, case)  # type: ignore[arg-type]
    torch.testing.assert_close(run(loaded, x), run(model, x))


@pytest.mark.parametrize(("kind", "gates"), [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_count_includes_recurrent_matmuls(kind: str, gates: int, bidirectional: bool) -> None:
    """The fused CPU kernel (oneDNN) and the meta device's decomposition count the same MACs: each
    weight matrix once per time step and sequence (the flop counter alone counts a fused LSTM as 0)."""
    case = Case(kind, layers=2, bidirectional=bidirectional)
    model, x = build(case)
    dirs = 2 if bidirectional else 1
    per_row = dirs * (gates * HIDDEN * EMB + gates * HIDDEN * HIDDEN)  # layer 0
    per_row += dirs * (gates * HIDDEN * dirs * HIDDEN + gates * HIDDEN * HIDDEN)  # layer 1
    expected = T * B * per_row + T * B * model.head.in_features * 4
    assert ap.count(model, x).macs == expected
    assert CostPredictor(model, x).use_meta  # the meta copy counts what the real model does


def test_budget_prunes_lstm() -> None:
    model, x = build(Case("LSTM", layers=2, bidirectional=True))
    res = ap.prune(model, x, budget=ap.Budget(macs=0.5), ignore=[model.head])
    assert res.after.macs <= 0.5 * res.before.macs
    assert run(model, x).shape == (T, B, 4)


class StateHead(nn.Module):
    """Classifies from the final states; optionally returns them too, and may start from a learnt state."""

    def __init__(self, kind: str, returns_state: bool, learnt_init: bool = False) -> None:
        super().__init__()
        self.proj_in = nn.Linear(EMB, EMB)
        self.rnn = getattr(nn, kind)(EMB, HIDDEN, num_layers=2)
        self.init = nn.Linear(3, HIDDEN) if learnt_init else None
        self.head = nn.Linear(HIDDEN, 4)
        self.returns_state = returns_state

    def forward(self, x: torch.Tensor) -> Any:
        hx = None
        if self.init is not None:
            h0 = torch.tanh(self.init(torch.ones(2, x.shape[1], 3)))
            hx = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        _, state = self.rnn(self.proj_in(x), hx)
        h_n = state[0] if isinstance(state, tuple) else state
        logits = self.head(h_n[-1])
        return (logits, state) if self.returns_state else logits


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_final_state_consumed_by_a_layer_is_pruned(kind: str) -> None:
    torch.manual_seed(0)
    model, x = StateHead(kind, returns_state=False).eval(), torch.randn(T, B, EMB)
    original = copy.deepcopy(model)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert model.rnn.hidden_size == HIDDEN // 2 and model.head.in_features == HIDDEN // 2
    assert model.rnn.input_size == model.proj_in.out_features == EMB // 2
    handle = ap.mask(original, res.plan)
    torch.testing.assert_close(run(original, x), run(model, x), rtol=1e-4, atol=1e-5)
    handle.undo()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_returned_state_pins_the_units(kind: str) -> None:
    """(h_n, c_n) leave the model: their width (the hidden units) keeps its size, the rest prunes."""
    torch.manual_seed(0)
    model, x = StateHead(kind, returns_state=True).eval(), torch.randn(T, B, EMB)
    y0 = run(model, x)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert model.rnn.hidden_size == HIDDEN
    assert model.rnn.input_size == EMB // 2  # the input side still prunes
    y1 = run(model, x)
    assert [t.shape for t in torch.utils._pytree.tree_flatten(y1)[0]] == [
        t.shape for t in torch.utils._pytree.tree_flatten(y0)[0]
    ]
    assert not res.plan.is_empty


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_initial_state_from_a_layer_is_coupled(kind: str) -> None:
    torch.manual_seed(0)
    model, x = StateHead(kind, returns_state=False, learnt_init=True).eval(), torch.randn(T, B, EMB)
    graph = ap.trace(model, x, ignore=[model.head])
    units = units_group(graph)
    assert any(s.tensor == "init.weight" and s.dim == 0 for s in units.slots)
    original = copy.deepcopy(model)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert model.init.out_features == model.rnn.hidden_size == HIDDEN // 2  # type: ignore[union-attr]
    handle = ap.mask(original, res.plan)
    torch.testing.assert_close(run(original, x), run(model, x), rtol=1e-4, atol=1e-5)
    handle.undo()


class CellLoop(nn.Module):
    """A cell stepped over time in Python: each step's state feeds the next."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell = getattr(nn, kind + "Cell")(EMB, HIDDEN)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: Any = None
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_cells(kind: str) -> None:
    torch.manual_seed(0)
    model, x = CellLoop(kind).eval(), torch.randn(T, B, EMB)
    original = copy.deepcopy(model)
    y0 = run(model, x)
    res = ap.prune(model, x, ratio=0.5, ignore=[model.head])
    assert (model.cell.hidden_size, model.cell.input_size) == (HIDDEN // 2, EMB)
    assert run(model, x).shape == y0.shape
    handle = ap.mask(original, res.plan)
    torch.testing.assert_close(run(original, x), run(model, x), rtol=1e-4, atol=1e-5)
    handle.undo()


def test_unbatched_sequence() -> None:
    """A 2-D input (no batch dim): nn.LSTM adds and removes the batch dim around its kernel."""
    torch.manual_seed(0)
    model, tokens = Tagger(Case("LSTM", layers=2, bidirectional=True)).eval(), torch.randint(0, VOCAB, (T,))
    original = copy.deepcopy(model)
    res = ap.prune(model, tokens, ratio=0.5, ignore=[model.head])
    assert model.rnn.hidden_size == HIDDEN // 2 and run(model, tokens).shape == (T, 4)
    handle = ap.mask(original, res.plan)
    torch.testing.assert_close(run(original, tokens), run(model, tokens), rtol=1e-4, atol=1e-5)
    handle.undo()
