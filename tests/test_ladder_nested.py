"""Nested widths over one set of weights (:mod:`adaprune.ladder.nested`).

- ordering channels by importance leaves the model's function unchanged and puts every group's
  channels in descending score order;
- every rung keeps a prefix of every group, so a smaller rung's channels are a subset of every larger
  rung's (the nesting invariant, by construction), and widths that grow are refused;
- ``use(k)`` (views of the shared weights, switched in place) and ``export(k)`` (physically pruned copy)
  give the same outputs on torchvision ResNet-18, MobileNetV2 and a Hugging Face BERT, the live model's
  parameters at every rung share the full model's storage, and ``use(0)`` gives back the original outputs;
- the same holds for random nested widths and scores on a small residual network (property test).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError
from adaprune.ladder import NestedWidths, nested_widths, order_channels

FRACTIONS = (0.75, 0.5, 0.25)


def resnet18() -> tuple[nn.Module, torch.Tensor, list[str]]:
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), ["fc"]


def mobilenet_v2() -> tuple[nn.Module, torch.Tensor, list[str]]:
    tv = pytest.importorskip("torchvision")
    return tv.models.mobilenet_v2(num_classes=10), torch.randn(2, 3, 32, 32), ["classifier.1"]


def bert() -> tuple[nn.Module, dict[str, torch.Tensor], list[str]]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    x = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return transformers.BertModel(config), x, ["pooler"]


def run(model: nn.Module, x: object) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def prepared(build) -> tuple[nn.Module, object, ap.Graph, torch.Tensor]:
    torch.manual_seed(0)
    model, x, ignore = build()
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        run(model, torch.randn(8, *x.shape[1:]) if isinstance(x, torch.Tensor) else x)
    model.eval()
    graph = ap.trace(model, x, ignore=[model.get_submodule(n) for n in ignore])
    return model, x, graph, run(model, x)


def uniform_widths(graph: ap.Graph) -> list[dict[str, int]]:
    return [{g.name: max(1, int(g.size * f)) for g in graph.groups} for f in FRACTIONS]


@pytest.mark.parametrize("build", [resnet18, mobilenet_v2, bert])
def test_ordering_keeps_the_function_and_sorts_every_group(build) -> None:
    model, x, graph, before = prepared(build)
    scores = {g.name: torch.rand(g.size) for g in graph.groups}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    perms = order_channels(model, graph, scores)
    assert set(perms) == {g.name for g in graph.groups}
    torch.testing.assert_close(run(model, x), before, rtol=1e-4, atol=1e-5)
    for g in graph.groups:
        ordered = scores[g.name][perms[g.name]]
        assert bool((ordered[:-1] >= ordered[1:]).all()), g.name
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())  # something moved


@pytest.mark.parametrize("build", [resnet18, mobilenet_v2, bert])
def test_use_and_export_agree_and_share_one_set_of_weights(build) -> None:
    model, x, graph, before = prepared(build)
    order_channels(model, graph, {g.name: torch.rand(g.size) for g in graph.groups})
    full = {n: p for n, p in model.named_parameters()}
    storages = {p.untyped_storage().data_ptr() for p in full.values()}
    rungs = NestedWidths(model, graph, uniform_widths(graph))
    assert len(rungs) == 4 and rungs.copied == [[], [], [], []]
    macs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a pruned BERT's config cannot state every size: not tested here
        for k in [1, 3, 2, 0, 2]:
            live = run(rungs.use(k), x)
            exported = rungs.export(k).eval()
            torch.testing.assert_close(live, run(exported, x), rtol=1e-4, atol=1e-5)
            assert {p.untyped_storage().data_ptr() for p in model.parameters()} <= storages  # views, no copies
            macs.append(ap.count(exported, x).macs)
    assert macs[3] > macs[0] > macs[2] > macs[1]  # full > rung 1 > rung 2 > rung 3
    rungs.use(0)
    torch.testing.assert_close(run(model, x), before, rtol=1e-4, atol=1e-5)
    assert dict(model.named_parameters()) == full  # the very same Parameter objects


def test_every_rung_keeps_a_prefix_of_every_group() -> None:
    model, _, graph, _ = prepared(resnet18)
    rungs = NestedWidths(model, graph, uniform_widths(graph))
    for k in range(1, len(rungs)):
        cuts = {c.name: set(c.removed) for c in rungs.plan(k).groups}
        for g in graph.groups:
            width = rungs.widths[k][g.name]
            assert cuts.get(g.name, set()) == set(range(width, g.size))
            assert rungs.widths[k - 1][g.name] >= width
        smaller, larger = rungs.plan(k).removals, rungs.plan(k - 1).removals
        for tensor, dims in larger.items():  # what a larger rung removes, every smaller one removes too
            for d, positions in dims.items():
                assert set(positions) <= set(smaller[tensor][d])


def test_widths_that_grow_or_name_unknown_groups_are_refused() -> None:
    model, _, graph, _ = prepared(resnet18)
    g = graph.groups[0]
    with pytest.raises(ConfigError, match=rf"rung 2: group '{g.name}' width"):
        nested_widths(graph, [{g.name: 2}, {g.name: 3}])
    with pytest.raises(ConfigError, match="every group keeps a channel"):
        nested_widths(graph, [{g.name: 0}])
    with pytest.raises(ConfigError, match="lack"):
        nested_widths(graph, [{"nope": 1}])
    rungs = NestedWidths(model, graph, [{g.name: 2}])
    with pytest.raises(ConfigError, match=r"rung 5: expected an int in \[0, 1\]"):
        rungs.use(5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.a, self.b = nn.Conv2d(12, 10, 3, padding=1), nn.Conv2d(10, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = h + self.b(F.relu(self.a(h)))
        return self.head(F.relu(self.dw(h)).mean((2, 3)))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_nested_widths_use_equals_export(data: st.DataObject) -> None:
    torch.manual_seed(data.draw(st.integers(0, 3)))
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    graph = ap.trace(model, x, ignore=[model.head])
    order_channels(model, graph, {g.name: torch.rand(g.size) for g in graph.groups})
    widths, last = [], {g.name: g.size for g in graph.groups}
    for _ in range(data.draw(st.integers(1, 4))):
        last = {n: data.draw(st.integers(1, w)) for n, w in last.items()}
        widths.append(last)
    rungs = NestedWidths(model, graph, widths)
    for k in data.draw(st.permutations(range(len(rungs)))):
        torch.testing.assert_close(run(rungs.use(k), x), run(rungs.export(k), x), rtol=1e-4, atol=1e-5)
        assert copy.deepcopy(model)(x).shape == (2, 4)


def test_a_rung_built_once_follows_changes_to_the_full_weights() -> None:
    """Rung states are built once and swapped in; they follow the full weights whether those change in
    place (an optimizer step) or are replaced (``param.data = ...``, as ``model.to(...)`` does)."""
    model, x, graph, _ = prepared(resnet18)
    nested = NestedWidths(model, graph, uniform_widths(graph))
    nested.use(2)
    nested.use(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in place: the cached views see it
    torch.testing.assert_close(run(nested.use(2), x), run(nested.export(2), x), rtol=1e-4, atol=1e-5)
    nested.use(0)
    for p in model.parameters():
        p.data = p.data.clone() * 0.5  # new storage: the cached states are rebuilt
    torch.testing.assert_close(run(nested.use(2), x), run(nested.export(2), x), rtol=1e-4, atol=1e-5)
    assert run(nested.use(2), x).abs().sum() > 0
