"""Property tests of the invariants in docs/design.md, on random small networks (see strategies.py).

- forward works after pruning at any ratio, the output shape is unchanged, widths stay coupled;
- ratio 0 changes nothing;
- removing dead channels (all their weights zero) changes no output, and l2 scores them 0 (lowest);
- a masked model and the same plan physically removed agree (exact groups only); undo restores;
- params after surgery == plan.predicted_params(original) == count(model).params;
- a plan survives a JSON round trip and replays on a copy of the original to the same weights;
- MACs never increase, and strictly decrease when the plan removes anything.
"""

from __future__ import annotations

import os

os.environ["ADAPRUNE_STRICT_TRACE"] = "1"  # a failing graph rule raises instead of freezing

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import adaprune as ap
from adaprune.graph import UnsupportedOpWarning
from adaprune.importance import get_importance
from adaprune.planner import plan_for
from strategies import FAMILIES, NetCase, net_cases, ratios

# The nets are tiny: one intra-op thread is ~100x faster than two contending ones on a busy 2-core box.
torch.set_num_threads(1)

# No shrinking by default: a failing case is already a small, printable NetCase, and shrinking a
# pruning failure costs minutes. ADAPRUNE_SHRINK=1 turns shrinking (and explanations) back on.
_PHASES = tuple(Phase) if os.environ.get("ADAPRUNE_SHRINK") == "1" else (Phase.explicit, Phase.generate)
PROPS = settings(
    max_examples=int(os.environ.get("ADAPRUNE_EXAMPLES", "12")),  # raise it for a deeper (nightly) run
    deadline=None,
    derandomize=True,
    database=None,
    phases=_PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

ATOL = 1e-5
RTOL = 1e-4

families = pytest.mark.parametrize("family", FAMILIES)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def unique_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def l2_scores(model: nn.Module, group: ap.Group) -> torch.Tensor:
    """The ``l2`` criterion's scores of one group (per-group ``score`` API, or the older call)."""
    criterion: Any = get_importance("l2")
    if hasattr(criterion, "score"):
        return criterion.score(model, group)  # type: ignore[no-any-return]
    return criterion(model, group)  # type: ignore[no-any-return]


def plan_of(graph: ap.Graph, cuts: dict[str, list[int]]) -> ap.Plan:
    """A plan removing ``cuts[group name]`` channels of the named groups (others untouched)."""
    removals: dict[str, dict[int, set[int]]] = {}
    groups = []
    for g in graph.groups:
        channels = sorted(cuts.get(g.name, []))
        groups.append(ap.GroupCut(g.name, g.size, tuple(channels)))
        if not channels:
            continue
        for tensor, dims in g.removals(channels).items():
            for d, pos in dims.items():
                removals.setdefault(tensor, {}).setdefault(d, set()).update(pos)
    frozen = {t: {d: tuple(sorted(p)) for d, p in dims.items()} for t, dims in removals.items()}
    return ap.Plan(frozen, tuple(groups))


def assert_widths_consistent(model: nn.Module) -> None:
    """Every module's size attributes match its tensors (surgery kept coupled widths consistent)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels, name
            assert m.weight.shape[1] * m.groups == m.in_channels, name
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            if m.bias is not None:
                assert m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
            if m.bias is not None:
                assert m.bias.shape == (m.out_features,), name
        elif isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t is not None and t.shape == (m.num_features,), name
        elif isinstance(m, nn.LayerNorm):
            assert tuple(m.weight.shape) == tuple(m.normalized_shape), name
        elif isinstance(m, nn.MultiheadAttention):
            assert m.embed_dim == m.num_heads * m.head_dim, name
            assert tuple(m.in_proj_weight.shape) == (3 * m.embed_dim, m.embed_dim), name
            assert m.out_proj.in_features == m.embed_dim, name


def build(case: NetCase) -> tuple[Any, torch.Tensor]:
    note(f"case: {case!r}")
    return case.build()


# ---------------------------------------------------------------------------------------------
# forward works, output shape unchanged, widths consistent
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_forward_after_prune_keeps_output_shape(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    ratio = data.draw(ratios, label="ratio")
    importance = data.draw(st.sampled_from(["l2", "l1", "random"]), label="importance")
    net, x = build(case)
    y0 = run(net, x)
    res = ap.prune(net, x, ratio=ratio, importance=importance, ignore=[net.head])
    assert res.model is net
    y = run(net, x)
    assert y.shape == y0.shape
    assert torch.isfinite(y).all()
    assert_widths_consistent(net)
    # the uniform allocator keeps ceil-ish (1 - ratio) of every group, at least one channel
    for cut in res.plan.groups:
        assert len(cut.removed) == cut.size - max(1, cut.size - int(ratio * cut.size + 1e-9))
        assert len(set(cut.removed)) == len(cut.removed)
        assert all(0 <= c < cut.size for c in cut.removed)


# ---------------------------------------------------------------------------------------------
# ratio 0 changes nothing
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_ratio_zero_changes_nothing(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    net, x = build(case)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    y0 = run(net, x)
    res = ap.prune(net, x, ratio=0.0, ignore=[net.head])
    assert res.plan.is_empty
    assert all(not cut.removed for cut in res.plan.groups)
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(run(net, x), y0)
    assert res.after == res.before


# ---------------------------------------------------------------------------------------------
# dead channels
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_removing_dead_channels_changes_no_output(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    net, x = build(case)
    graph = ap.trace(net, x, ignore=[net.head])
    exact = [g for g in graph.groups if g.exact and g.size >= 2]
    assume(exact)
    group = data.draw(st.sampled_from(exact), label="group")
    k = data.draw(st.integers(1, group.size - 1), label="k")
    dead = sorted(data.draw(st.permutations(range(group.size)), label="order")[:k])
    note(f"group {group.name} (size {group.size}), dead channels {dead}")

    params = dict(net.named_parameters())
    is_param = {(s.tensor, s.dim): s.is_param for s in group.slots}
    with torch.no_grad():
        for c in dead:
            for (tensor, dim), pos in group.positions(c).items():
                if is_param[(tensor, dim)]:
                    params[tensor].index_fill_(dim, torch.tensor(pos), 0.0)

    scores = l2_scores(net, group)
    alive = [c for c in range(group.size) if c not in dead]
    assert (scores[dead] == 0).all()
    assert (scores[alive] > 0).all()

    # uniform l2 at ratio k/size picks exactly the dead channels of this group
    chosen = plan_for(net, graph, ratio=k / group.size, importance="l2")
    cut = next(c for c in chosen.groups if c.name == group.name)
    assert list(cut.removed) == dead

    y0 = run(net, x)
    plan = plan_of(graph, {group.name: dead})
    assert not plan.is_empty
    predicted = plan.predicted_params(net)
    ap.apply_plan(net, plan, x)
    y = run(net, x)
    assert y.shape == y0.shape
    assert torch.allclose(y, y0, atol=ATOL, rtol=RTOL), (y - y0).abs().max()
    assert unique_params(net) == predicted


# ---------------------------------------------------------------------------------------------
# mask and remove agree
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_mask_and_remove_agree_on_exact_groups(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    ratio = data.draw(st.floats(0.1, 0.9, exclude_max=True), label="ratio")
    importance = data.draw(st.sampled_from(["l2", "random"]), label="importance")
    net, x = build(case)
    graph = ap.trace(net, x, ignore=[net.head])
    full = plan_for(net, graph, ratio=ratio, importance=importance)
    exact = {g.name for g in graph.groups if g.exact}
    plan = plan_of(graph, {c.name: list(c.removed) for c in full.groups if c.name in exact})
    assume(not plan.is_empty)

    y0 = run(net, x)
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    removed = copy.deepcopy(net)
    ap.remove(removed, plan)
    y_removed = run(removed, x)

    masking = ap.mask(net, plan)
    y_masked = run(net, x)
    assert y_masked.shape == y_removed.shape == y0.shape
    assert torch.allclose(y_masked, y_removed, atol=ATOL, rtol=RTOL), (y_masked - y_removed).abs().max()

    masking.undo()
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert torch.equal(run(net, x), y0)
    state = net.state_dict()
    assert state.keys() == state0.keys()
    assert all(torch.equal(state[k], v) for k, v in state0.items())


# ---------------------------------------------------------------------------------------------
# param count after surgery == plan prediction == count()
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_params_after_surgery_match_prediction_and_count(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    ratio = data.draw(ratios, label="ratio")
    net, x = build(case)
    original = copy.deepcopy(net)
    res = ap.prune(net, x, ratio=ratio, ignore=[net.head])
    actual = unique_params(net)
    assert actual == res.plan.predicted_params(original)
    assert actual == ap.count(net, x).params == res.after.params
    assert res.before.params == unique_params(original)
    if not res.plan.is_empty:
        assert actual < res.before.params


# ---------------------------------------------------------------------------------------------
# JSON round trip and replay
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_plan_json_round_trip_replays_to_same_weights(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    ratio = data.draw(ratios, label="ratio")
    importance = data.draw(st.sampled_from(["l2", "l1", "random"]), label="importance")
    net, x = build(case)
    original = copy.deepcopy(net)
    res = ap.prune(net, x, ratio=ratio, importance=importance, ignore=[net.head])

    text = res.plan.to_json()
    back = ap.Plan.from_json(text)
    assert back == res.plan
    assert back.to_json() == text
    assert back.predicted_params(original) == res.plan.predicted_params(original)

    fresh = copy.deepcopy(original)
    ap.apply_plan(fresh, back, x)
    want, got = net.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(run(fresh, x), run(net, x))


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------
@families
@PROPS
@given(data=st.data())
def test_macs_never_increase(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    ratio = data.draw(ratios, label="ratio")
    net, x = build(case)
    res = ap.prune(net, x, ratio=ratio, ignore=[net.head])
    assert res.after.macs <= res.before.macs
    if not res.plan.is_empty:
        assert res.after.macs < res.before.macs
    assert res.after == ap.count(net, x)


# ---------------------------------------------------------------------------------------------
# strategies sanity: every family really has prunable channels
# ---------------------------------------------------------------------------------------------
@families
@settings(PROPS, max_examples=6)
@given(data=st.data())
def test_every_family_has_prunable_groups(family: str, data: st.DataObject) -> None:
    case = data.draw(net_cases(family), label="case")
    net, x = build(case)
    graph = ap.trace(net, x, ignore=[net.head])
    assert graph.groups, "no prunable group: the strategy generated a net with nothing to prune"
    for g in graph.groups:
        assert g.size >= 1
        assert len(g.slots) == len(g.channel_of)
        for slot, owner in zip(g.slots, g.channel_of):
            assert owner.shape == (slot.size,)
            assert int(owner.max()) < g.size
        # every channel owns at least one parameter position
        for c in range(g.size):
            assert any(
                slot.is_param and bool((owner == c).any()) for slot, owner in zip(g.slots, g.channel_of)
            ), (g.name, c)


# ---------------------------------------------------------------------------------------------
# regressions found by the properties (minimal reproductions)
# ---------------------------------------------------------------------------------------------
N_OUT_REG = 3


class _TorchSplit(nn.Module):
    """``torch.split`` is ``torch.functional.split``: its op name must resolve to ``split``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, N_OUT_REG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), 4, dim=1)
        return self.head(torch.relu(self.conv2(a + b)).mean((2, 3)))


class _EinsumNet(nn.Module):
    """``torch.einsum`` is ``torch.functional.einsum`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(8, 6))
        self.head = nn.Linear(6, N_OUT_REG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.einsum("bi,ij->bj", torch.relu(self.fc1(x)), self.w))


@pytest.mark.parametrize(
    "net, x",
    [(_TorchSplit, (2, 3, 4, 4)), (_EinsumNet, (2, 4))],
    ids=["torch.split", "torch.einsum"],
)
def test_torch_functional_ops_are_traced(net: type, x: tuple) -> None:
    torch.manual_seed(0)
    model, inp = net().eval(), torch.randn(*x)
    y0 = run(model, inp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)  # the op must have a rule
        graph = ap.trace(model, inp, ignore=[model.head])
        res = ap.prune(model, inp, ratio=0.5, ignore=[model.head])
    assert not any("not understood" in f.reason for f in graph.frozen)
    assert not res.plan.is_empty
    assert run(model, inp).shape == y0.shape


class _SplitSizes(nn.Module):
    """Channels split into pieces of sizes fixed by the code (a list, or an int split_size)."""

    def __init__(self, sizes: list[int] | int) -> None:
        super().__init__()
        self.sizes = sizes
        self.conv = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 3, 1)
        self.head = nn.Linear(6, N_OUT_REG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.conv(x).split(self.sizes, dim=1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1).mean((2, 3)))


@pytest.mark.parametrize("sizes", [[2, 2], 2], ids=["list", "int"])
def test_split_with_fixed_sizes_freezes_the_split_channels(sizes: list[int] | int) -> None:
    """Only ``chunk`` (a fixed number of pieces) can shrink in lockstep; ``split`` fixes the
    pieces' sizes, so the graph must not offer the split tensor's channels for removal."""
    torch.manual_seed(0)
    model, x = _SplitSizes(sizes).eval(), torch.randn(2, 3, 4, 4)
    y0 = run(model, x)
    graph = ap.trace(model, x, ignore=[model.head])
    offered = [g.name for g in graph.groups for s in g.slots if (s.tensor, s.dim) == ("conv.weight", 0)]
    assert not offered, f"conv's out channels are offered for removal by group(s) {offered}"
    ap.prune(model, x, ratio=0.5, ignore=[model.head])  # must not raise SurgeryError
    assert model.conv.out_channels == 4
    assert run(model, x).shape == y0.shape
    assert math.isfinite(float(run(model, x).sum()))


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, N_OUT_REG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_macs_do_not_grow_when_heads_become_odd() -> None:
    """4 heads -> 3 heads: PyTorch's MHA fast path (eval, no_grad, batch_first, even heads) runs the
    fused ``_native_multi_head_attention`` before pruning, the slow path after."""
    torch.manual_seed(0)
    model, x = _Attn(8, 4).eval(), torch.randn(2, 6, 4)
    res = ap.prune(model, x, ratio=0.25, ignore=[model.head])
    assert model.attn.num_heads == 3
    assert res.after.macs < res.before.macs


def test_count_includes_attention() -> None:
    """MACs of one MHA forward: q/k/v and out projections plus the q@k^T and attn@v products."""
    torch.manual_seed(0)
    b, seq, dim, heads = 2, 6, 8, 4
    model, x = _Attn(dim, heads).eval(), torch.randn(b, seq, 4)
    embed = b * seq * 4 * dim
    projections = b * seq * dim * 3 * dim + b * seq * dim * dim
    attention = 2 * b * seq * seq * dim
    head = b * dim * N_OUT_REG
    assert ap.count(model, x).macs == embed + projections + attention + head
