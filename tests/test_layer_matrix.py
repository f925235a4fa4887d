"""Every entry of the layer registry (``adaprune.layers.LAYERS``) and each of its hooks is tested (issue 12).

- ``fix``: a model containing the kind is pruned at 0.5; the kind's tensors shrink, its size attributes
  agree with its tensors, the output shape is unchanged, the plan replayed on a fresh copy
  (``ap.apply_plan``) gives the same state dict, and ``ap.save``/``ap.load`` give the same outputs.
- ``role``: the dim of ``weight`` called "out" has the layer's output width, the one called "in" its input
  width.
- ``channel_dim``: the dim it names in a real output holds the channels.
- ``norm``: the normalisation kinds say so, the others do not.
- ``refit``: the hook's rows reproduce the layer as a linear map, and ``reconstruct`` refits the layer
  after its input was pruned without increasing its output error.
- ``width``: equals the real output width.

``test_every_registered_hook_has_a_case`` fails when a kind or hook is registered without a case here.
``test_register_layer_in_one_call`` registers a custom kind and prunes a model with it end to end.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprune as ap
from adaprune.layers import (
    HOOKS,
    LAYERS,
    is_norm,
    key_of,
    lookup,
    output_channel_dim,
    output_width,
    refit_of,
    register_layer,
    unregister_layer,
    weight_role,
)
from adaprune.layers import registry as layer_registry
from adaprune.plan import Plan
from adaprune.surgery import reconstruct

torch.set_num_threads(1)

CONV1D = "transformers.pytorch_utils.Conv1D"
GPT2_ATTENTION = "transformers.models.gpt2.modeling_gpt2.GPT2Attention"
VIT = "torchvision.models.vision_transformer.VisionTransformer"
C2F = "ultralytics.nn.modules.block.C2f"


@pytest.fixture(autouse=True)
def _strict_trace(monkeypatch):
    monkeypatch.setenv("ADAPRUNE_STRICT_TRACE", "1")


def _run(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _of_kind(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` whose class is ``key`` or derives from it."""
    return [(n, m) for n, m in model.named_modules() if key in {key_of(c) for c in type(m).__mro__}]


def _size(m: nn.Module) -> int:
    """Elements of the module's own tensors (of its children's when it has none: GPT2Attention)."""
    own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    return sum(t.numel() for t in own or [*m.parameters(), *m.buffers()])


# --------------------------------------------------------------------------------------------------
# size attributes agree with tensors, per kind
# --------------------------------------------------------------------------------------------------


def _linear(m: Any) -> None:
    assert tuple(m.weight.shape) == (m.out_features, m.in_features)
    assert m.bias is None or tuple(m.bias.shape) == (m.out_features,)


def _bilinear(m: Any) -> None:
    assert tuple(m.weight.shape) == (m.out_features, m.in1_features, m.in2_features)
    assert m.bias is None or tuple(m.bias.shape) == (m.out_features,)


def _conv(m: Any) -> None:
    w = m.weight
    assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
    if m.transposed:
        assert (w.shape[0], w.shape[1] * m.groups) == (m.in_channels, m.out_channels)
    else:
        assert (w.shape[0], w.shape[1] * m.groups) == (m.out_channels, m.in_channels)
    assert m.bias is None or tuple(m.bias.shape) == (m.out_channels,)


def _batch_norm(m: Any) -> None:
    for t in (m.weight, m.bias, m.running_mean, m.running_var):
        assert t is None or tuple(t.shape) == (m.num_features,)


def _group_norm(m: Any) -> None:
    assert m.num_channels % m.num_groups == 0
    for t in (m.weight, m.bias):
        assert t is None or tuple(t.shape) == (m.num_channels,)


def _layer_norm(m: Any) -> None:
    for t in (m.weight, getattr(m, "bias", None)):
        assert t is None or tuple(t.shape) == tuple(m.normalized_shape)


def _prelu(m: Any) -> None:
    assert m.weight.numel() == m.num_parameters


def _embedding(m: Any) -> None:
    assert tuple(m.weight.shape) == (m.num_embeddings, m.embedding_dim)


def _mha(m: Any) -> None:
    assert m.embed_dim == m.num_heads * m.head_dim
    assert m.kdim == m.vdim == m.embed_dim
    assert tuple(m.in_proj_weight.shape) == (3 * m.embed_dim, m.embed_dim)
    assert tuple(m.in_proj_bias.shape) == (3 * m.embed_dim,)
    assert m.out_proj.in_features == m.out_proj.out_features == m.embed_dim


def _rnn(m: Any) -> None:
    gates = {"LSTM": 4, "GRU": 3}.get(type(m).__name__, 1)
    real = m.proj_size or m.hidden_size
    dirs = 2 if m.bidirectional else 1
    for k in range(m.num_layers):
        for sfx in ("", "_reverse")[:dirs]:
            ins = m.input_size if k == 0 else real * dirs
            assert tuple(getattr(m, f"weight_ih_l{k}{sfx}").shape) == (gates * m.hidden_size, ins)
            assert tuple(getattr(m, f"weight_hh_l{k}{sfx}").shape) == (gates * m.hidden_size, real)
            if m.proj_size:
                assert tuple(getattr(m, f"weight_hr_l{k}{sfx}").shape) == (m.proj_size, m.hidden_size)
    # the flat weight list the fused kernels read is the module's current parameters
    assert [id(w) for w in m._flat_weights] == [id(getattr(m, n)) for n in m._flat_weights_names]


def _rnn_cell(m: Any) -> None:
    gates = {"LSTMCell": 4, "GRUCell": 3}.get(type(m).__name__, 1)
    assert tuple(m.weight_ih.shape) == (gates * m.hidden_size, m.input_size)
    assert tuple(m.weight_hh.shape) == (gates * m.hidden_size, m.hidden_size)


def _hf_conv1d(m: Any) -> None:
    assert tuple(m.weight.shape) == (m.nx, m.nf)
    assert tuple(m.bias.shape) == (m.nf,)


def _gpt2_attention(m: Any) -> None:
    assert m.split_size == m.embed_dim == m.c_attn.nf // 3 == m.c_proj.nx
    assert m.num_heads * m.head_dim == m.embed_dim


def _c2f(m: Any) -> None:
    assert 2 * m.c == m.cv1.conv.out_channels
    assert m.cv2.conv.in_channels == (2 + len(m.m)) * m.c


def _vit(m: Any) -> None:
    assert m.hidden_dim == m.class_token.shape[-1] == m.conv_proj.out_channels
    assert m.encoder.pos_embedding.shape[-1] == m.hidden_dim
    assert tuple(m.encoder.ln.normalized_shape) == (m.hidden_dim,)


CONSISTENT: dict[str, Callable[[Any], None]] = {
    key_of(nn.Linear): _linear,
    key_of(nn.Bilinear): _bilinear,
    key_of(nn.modules.conv._ConvNd): _conv,
    key_of(nn.modules.batchnorm._NormBase): _batch_norm,
    key_of(nn.GroupNorm): _group_norm,
    key_of(nn.LayerNorm): _layer_norm,
    key_of(nn.RMSNorm): _layer_norm,
    key_of(nn.PReLU): _prelu,
    key_of(nn.Embedding): _embedding,
    key_of(nn.EmbeddingBag): _embedding,
    key_of(nn.MultiheadAttention): _mha,
    key_of(nn.RNNBase): _rnn,
    key_of(nn.RNNCellBase): _rnn_cell,
    CONV1D: _hf_conv1d,
    GPT2_ATTENTION: _gpt2_attention,
    VIT: _vit,
    C2F: _c2f,
}


# --------------------------------------------------------------------------------------------------
# example models, one or more per kind with a fixer
# --------------------------------------------------------------------------------------------------


class Chain(nn.Module):
    """Modules applied in turn; a tuple result (MHA, LSTM, LSTMCell) passes on its first element."""

    def __init__(self, *mods: nn.Module, self_attention: bool = False) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.self_attention = self_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.mods:
            if isinstance(m, nn.MultiheadAttention):
                x = m(x, x, x, need_weights=False)
            elif isinstance(m, nn.Bilinear):
                x = m(x, x.flip(-1))
            else:
                x = m(x)
            x = x[0] if isinstance(x, tuple) else x
        return x


def _pool_head(c: int, nd: int) -> list[nn.Module]:
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[nd](1)
    return [nn.ReLU(), pool, nn.Flatten(), nn.Linear(c, 3)]


def _conv_input(nd: int) -> torch.Tensor:
    return torch.randn(2, 3, *([8] * nd))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(n_embd=16, n_head=2, n_layer=1, n_positions=8, vocab_size=20, bos_token_id=0,
                         eos_token_id=0, attn_implementation="eager")
        self.gpt = GPT2Model(cfg)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gpt(input_ids=ids).last_hidden_state)


def _gpt() -> tuple[nn.Module, Any]:
    return GPT(), torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


def _vit_model() -> tuple[nn.Module, Any]:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3)
    return model, torch.randn(2, 3, 16, 16)


def _c2f_model() -> tuple[nn.Module, Any]:
    block = pytest.importorskip("ultralytics.nn.modules.block")
    return Chain(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), block.C2f(8, 16, n=2, shortcut=True),
                 *_pool_head(16, 2)), _conv_input(2)


def _seq(*mods: nn.Module) -> tuple[nn.Module, Any]:
    return Chain(*mods), torch.randn(2, 5, 6)


@dataclass(frozen=True)
class FixCase:
    id: str
    build: Callable[[], tuple[nn.Module, Any]]
    xfail: str = ""

    def make(self) -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        model, x = self.build()
        return model.eval(), x


FIX_CASES: dict[str, list[FixCase]] = {
    key_of(nn.Linear): [
        FixCase("mlp", lambda: (Chain(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)),
                                torch.randn(2, 6))),
    ],
    key_of(nn.Bilinear): [
        FixCase("bilinear", lambda: (Chain(nn.Linear(6, 8), nn.Bilinear(8, 8, 8), nn.ReLU(), nn.Linear(8, 3)),
                                     torch.randn(2, 6))),
    ],
    key_of(nn.modules.conv._ConvNd): [
        FixCase("conv1d", lambda: (Chain(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3),
                                         *_pool_head(8, 1)), _conv_input(1))),
        FixCase("conv2d-grouped-depthwise", lambda: (Chain(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 6, 1), *_pool_head(6, 2)),
            _conv_input(2))),
        FixCase("conv3d", lambda: (Chain(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 6, 3),
                                         *_pool_head(6, 3)), _conv_input(3))),
        FixCase("conv_transpose2d-grouped", lambda: (Chain(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(6, 8, 3, groups=2), *_pool_head(8, 2)), _conv_input(2))),
    ],
    key_of(nn.modules.batchnorm._NormBase): [
        FixCase("batchnorm2d", lambda: (Chain(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), *_pool_head(8, 2)),
                                        _conv_input(2))),
        FixCase("batchnorm1d", lambda: (Chain(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
                                        torch.randn(2, 6))),
        FixCase("instancenorm1d", lambda: (Chain(nn.Conv1d(3, 8, 3, padding=1),
                                                 nn.InstanceNorm1d(8, affine=True, track_running_stats=True),
                                                 *_pool_head(8, 1)), _conv_input(1))),
    ],
    key_of(nn.GroupNorm): [
        FixCase("groupnorm", lambda: (Chain(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), *_pool_head(8, 2)),
                                      _conv_input(2))),
    ],
    key_of(nn.LayerNorm): [
        FixCase("layernorm", lambda: _seq(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))),
    ],
    key_of(nn.RMSNorm): [
        FixCase("rmsnorm", lambda: _seq(nn.Linear(6, 8), nn.RMSNorm(8), nn.ReLU(), nn.Linear(8, 3))),
    ],
    key_of(nn.PReLU): [
        FixCase("prelu", lambda: (Chain(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), *_pool_head(8, 2)),
                                  _conv_input(2))),
    ],
    key_of(nn.Embedding): [
        FixCase("embedding", lambda: (Chain(nn.Embedding(10, 8), nn.ReLU(), nn.Linear(8, 3)),
                                      torch.randint(0, 10, (2, 5)))),
    ],
    key_of(nn.EmbeddingBag): [
        FixCase("embeddingbag", lambda: (Chain(nn.EmbeddingBag(10, 8), nn.ReLU(), nn.Linear(8, 3)),
                                         torch.randint(0, 10, (2, 5)))),
    ],
    key_of(nn.MultiheadAttention): [
        FixCase("mha", lambda: _seq(nn.Linear(6, 16), nn.MultiheadAttention(16, 4, batch_first=True), nn.ReLU(),
                                    nn.Linear(16, 3))),
    ],
    key_of(nn.RNNBase): [
        FixCase("lstm-2layers-bidirectional-proj", lambda: _seq(
            nn.Linear(6, 8), nn.LSTM(8, 10, num_layers=2, bidirectional=True, proj_size=4, batch_first=True),
            nn.Linear(8, 3))),
        FixCase("gru", lambda: _seq(nn.Linear(6, 8), nn.GRU(8, 10, batch_first=True), nn.Linear(10, 3))),
        FixCase("rnn-relu", lambda: _seq(nn.Linear(6, 8), nn.RNN(8, 10, nonlinearity="relu", batch_first=True),
                                         nn.Linear(10, 3))),
    ],
    key_of(nn.RNNCellBase): [
        FixCase("lstmcell", lambda: (Chain(nn.Linear(6, 8), nn.LSTMCell(8, 10), nn.Linear(10, 3)), torch.randn(2, 6))),
        FixCase("grucell", lambda: (Chain(nn.Linear(6, 8), nn.GRUCell(8, 10), nn.Linear(10, 3)), torch.randn(2, 6))),
        FixCase("rnncell", lambda: (Chain(nn.Linear(6, 8), nn.RNNCell(8, 10), nn.Linear(10, 3)), torch.randn(2, 6))),
    ],
    CONV1D: [FixCase("gpt2", _gpt)],
    GPT2_ATTENTION: [FixCase("gpt2", _gpt)],
    VIT: [FixCase("vit", _vit_model)],
    C2F: [FixCase("c2f", _c2f_model)],
}


def _fix_params() -> list[Any]:
    return [
        pytest.param(key, case, id=f"{key.rsplit('.', 1)[-1]}-{case.id}",
                     marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
        for key, cases in FIX_CASES.items()
        for case in cases
    ]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize(("key", "case"), _fix_params())
def test_fixer_round_trip(key: str, case: FixCase, tmp_path) -> None:
    model, x = case.make()
    before = {n: _size(m) for n, m in _of_kind(model, key)}
    assert before, f"the example has no module of kind {key}"
    y0 = _run(model, x)
    res = ap.prune(model, x, ratio=0.5)
    y1 = _run(model, x)
    assert y1.shape == y0.shape
    assert not res.plan.is_empty, res.reason
    rescued = [f.reason for f in res.frozen if f.op == "surgery check"]
    assert not rescued, f"cuts the fixers could not make work: {rescued}"
    mods = dict(_of_kind(model, key))
    shrank = [n for n in before if _size(mods[n]) < before[n]]
    assert shrank, f"no {key} lost any tensor elements"
    for name, m in mods.items():
        CONSISTENT[key](m)

    # the plan replayed on a fresh copy gives the same state dict and the same size attributes
    fresh, _ = case.make()
    ap.apply_plan(fresh, res.plan, x)
    got, want = fresh.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k
    for name, m in _of_kind(fresh, key):
        CONSISTENT[key](m)
        assert {a: v for a, v in vars(m).items() if isinstance(v, int)} == {
            a: v for a, v in vars(mods[name]).items() if isinstance(v, int)}, name

    # saved and loaded into a fresh copy of the architecture, it computes the same
    ap.save(res, tmp_path / "saved")
    loaded = ap.load(tmp_path / "saved", lambda: case.make()[0])
    torch.testing.assert_close(_run(loaded, x), y1)


# -- the same fixers under a plan written by hand ----------------------------------------------------


HAND_PLANS: dict[str, tuple[str, Callable[[], Plan]]] = {
    # Linear(6, 8) -> Bilinear(8, 8, 8) on (x, x.flip(-1)): both inputs lose the same producer rows
    # (positions 1, 2 of the producer are positions 6, 5 of the flipped copy)
    key_of(nn.Bilinear): ("bilinear", lambda: Plan({
        "mods.0.weight": {0: (1, 2)}, "mods.0.bias": {0: (1, 2)}, "mods.1.weight": {0: (0, 3), 1: (1, 2), 2: (5, 6)},
        "mods.1.bias": {0: (0, 3)}, "mods.3.weight": {1: (0, 3)}})),
    key_of(nn.EmbeddingBag): ("embeddingbag", lambda: Plan({
        "mods.0.weight": {1: (0, 2, 5)}, "mods.2.weight": {1: (0, 2, 5)}})),
}


@pytest.mark.parametrize("key", sorted(HAND_PLANS))
def test_fixer_by_hand_plan(key: str) -> None:
    """The fixers keep their modules consistent under a plan written by hand (cuts of every weight dim at
    once, which prune's round trip above need not choose)."""
    case = next(c for c in FIX_CASES[key] if c.id == HAND_PLANS[key][0])
    model, x = case.make()
    original = copy.deepcopy(model)
    y0 = _run(model, x)
    plan = HAND_PLANS[key][1]()
    ap.apply_plan(model, plan, x)
    assert _run(model, x).shape == y0.shape
    for name, m in _of_kind(model, key):
        CONSISTENT[key](m)
        assert _size(m) < _size(original.get_submodule(name))
    # zeroing the same slices gives the same outputs: the fixer's sizes are the ones forward uses
    handle = ap.mask(original, plan)
    try:
        torch.testing.assert_close(_run(model, x), _run(original, x))
    finally:
        handle.undo()


# --------------------------------------------------------------------------------------------------
# role, channel_dim, norm, width, refit
# --------------------------------------------------------------------------------------------------


def _hf_conv1d_module(nf: int = 5, nx: int = 4) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


# (module, input, dim of the input holding its channels)
ROLE_CASES: dict[str, list[Callable[[], tuple[nn.Module, torch.Tensor, int]]]] = {
    key_of(nn.Linear): [lambda: (nn.Linear(4, 5), torch.randn(2, 3, 4), -1)],
    key_of(nn.modules.conv._ConvNd): [
        lambda: (nn.Conv2d(4, 5, 3), torch.randn(2, 4, 6, 6), 1),
        lambda: (nn.Conv1d(4, 5, 3), torch.randn(2, 4, 6), 1),
        lambda: (nn.ConvTranspose2d(4, 5, 2), torch.randn(2, 4, 3, 3), 1),
    ],
    key_of(nn.Embedding): [lambda: (nn.Embedding(7, 5), torch.randint(0, 7, (2, 3)), -1)],
    CONV1D: [lambda: (_hf_conv1d_module(5, 4), torch.randn(2, 3, 4), -1)],
}


@pytest.mark.parametrize(("key", "make"), [pytest.param(k, f, id=f"{k.rsplit('.', 1)[-1]}-{i}")
                                           for k, fs in ROLE_CASES.items() for i, f in enumerate(fs)])
def test_role(key: str, make: Callable[[], tuple[nn.Module, torch.Tensor, int]]) -> None:
    m, x, in_dim = make()
    assert lookup(m, "role") is LAYERS[key].role
    y = m(x)
    roles = {d: weight_role(m, d) for d in range(m.weight.dim())}  # a conv's kernel dims have no role
    outs = [d for d, r in roles.items() if r == "out"]
    ins = [d for d, r in roles.items() if r == "in"]
    assert len(outs) == 1, roles
    assert m.weight.shape[outs[0]] == y.shape[output_channel_dim(m, y)], "the 'out' dim is not the output width"
    if x.is_floating_point():  # an embedding's input is ids: no input channels
        assert len(ins) == 1 and m.weight.shape[ins[0]] == x.shape[in_dim], "the 'in' dim is not the input width"
    else:
        assert ins == [], roles


CHANNEL_CASES: dict[str, list[Any]] = {
    key_of(nn.modules.conv._ConvNd): [
        pytest.param(lambda: (nn.Conv1d(3, 5, 3), torch.randn(2, 3, 7), 1), id="conv1d"),
        pytest.param(lambda: (nn.Conv2d(3, 5, 3), torch.randn(3, 7, 7), 0), id="conv2d-unbatched"),
        pytest.param(lambda: (nn.Conv3d(3, 5, 3), torch.randn(2, 3, 5, 5, 5), 1), id="conv3d"),
        pytest.param(lambda: (nn.ConvTranspose1d(3, 5, 3), torch.randn(2, 3, 7), 1), id="conv_transpose1d"),
    ],
    key_of(nn.modules.batchnorm._NormBase): [
        pytest.param(lambda: (nn.BatchNorm1d(5), torch.randn(4, 5), 1), id="batchnorm1d-2d"),
        pytest.param(lambda: (nn.BatchNorm1d(5), torch.randn(4, 5, 3), 1), id="batchnorm1d-3d"),
        pytest.param(lambda: (nn.BatchNorm2d(5), torch.randn(2, 5, 3, 3), 1), id="batchnorm2d"),
        pytest.param(lambda: (nn.InstanceNorm1d(5, affine=True), torch.randn(2, 5, 4), 1), id="instancenorm1d"),
        pytest.param(lambda: (nn.InstanceNorm1d(5, affine=True), torch.randn(5, 4), 0), id="instancenorm1d-unbatched"),
        pytest.param(lambda: (nn.InstanceNorm2d(5, affine=True), torch.randn(5, 3, 4), 0), id="instancenorm2d-unbatched"),
        pytest.param(lambda: (nn.InstanceNorm3d(5, affine=True), torch.randn(5, 2, 3, 4), 0),
                     id="instancenorm3d-unbatched"),
        pytest.param(lambda: (nn.InstanceNorm2d(5, affine=True), torch.randn(2, 5, 3, 4), 1), id="instancenorm2d"),
    ],
    key_of(nn.GroupNorm): [
        pytest.param(lambda: (nn.GroupNorm(2, 6), torch.randn(2, 6, 3), 1), id="groupnorm"),
    ],
}


@pytest.mark.parametrize(("key", "make"), [pytest.param(k, *p.values, id=p.id, marks=p.marks)
                                           for k, ps in CHANNEL_CASES.items() for p in ps])
def test_channel_dim(key: str, make: Callable[[], tuple[nn.Module, torch.Tensor, int]]) -> None:
    m, x, want = make()
    assert lookup(m, "channel_dim") is LAYERS[key].channel_dim
    y = m.eval()(x)
    d = output_channel_dim(m, y)
    assert d == want
    width = getattr(m, "out_channels", None) or getattr(m, "num_features", None) or m.num_channels
    assert y.shape[d] == width


NORM_CASES: dict[str, list[Callable[[], nn.Module]]] = {
    key_of(nn.modules.batchnorm._NormBase): [lambda: nn.BatchNorm2d(4), lambda: nn.InstanceNorm1d(4),
                                             lambda: nn.SyncBatchNorm(4)],
    key_of(nn.GroupNorm): [lambda: nn.GroupNorm(2, 4)],
    key_of(nn.LayerNorm): [lambda: nn.LayerNorm(4)],
    key_of(nn.RMSNorm): [lambda: nn.RMSNorm(4)],
}


@pytest.mark.parametrize(("key", "make"), [pytest.param(k, f, id=f"{k.rsplit('.', 1)[-1]}-{i}")
                                           for k, fs in NORM_CASES.items() for i, f in enumerate(fs)])
def test_norm(key: str, make: Callable[[], nn.Module]) -> None:
    m = make()
    assert LAYERS[key].norm is True
    assert is_norm(m) and is_norm(type(m))


def test_layers_that_are_not_norms() -> None:
    for m in (nn.Linear(2, 2), nn.Conv2d(2, 2, 1), nn.Embedding(3, 2), nn.PReLU(), nn.MultiheadAttention(4, 2)):
        assert not is_norm(m), type(m).__name__


WIDTH_CASES: dict[str, list[Any]] = {
    key_of(nn.Linear): [pytest.param(lambda: (nn.Linear(4, 5), torch.randn(2, 4)), id="linear")],
    key_of(nn.modules.conv._ConvNd): [
        pytest.param(lambda: (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 5, 5)), id="conv2d-grouped"),
        pytest.param(lambda: (nn.Conv1d(4, 6, 3), torch.randn(2, 4, 5)), id="conv1d"),
    ],
    key_of(nn.modules.conv._ConvTransposeNd): [
        pytest.param(lambda: (nn.ConvTranspose2d(4, 6, 2, groups=2), torch.randn(2, 4, 3, 3)), id="grouped"),
        pytest.param(lambda: (nn.ConvTranspose1d(4, 7, 2), torch.randn(2, 4, 3)), id="conv_transpose1d"),
    ],
    CONV1D: [pytest.param(lambda: (_hf_conv1d_module(5, 4), torch.randn(2, 3, 4)), id="conv1d-hf")],
}


@pytest.mark.parametrize(("key", "make"), [pytest.param(k, *p.values, id=p.id, marks=p.marks)
                                           for k, ps in WIDTH_CASES.items() for p in ps])
def test_width(key: str, make: Callable[[], tuple[nn.Module, torch.Tensor]]) -> None:
    m, x = make()
    assert lookup(m, "width") is LAYERS[key].width
    y = m(x)
    assert output_width(m) == y.shape[output_channel_dim(m, y)]


# -- refit ------------------------------------------------------------------------------------------


class Low(nn.Module):
    """A producer of rank 2 (its six outputs combine two inputs) and the layer to refit reading them:
    after two of the six go, the kept four still span them, so a refit can recover the layer."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "linear":
            self.a, self.b = nn.Linear(2, 6, bias=False), nn.Linear(6, 3)
        elif kind == "conv1d":
            self.a, self.b = nn.Conv1d(2, 6, 1, bias=False), nn.Conv1d(6, 3, 3, padding=1, stride=2)
        else:
            self.a, self.b = nn.Conv2d(2, 6, 1, bias=False), nn.Conv2d(6, 3, 3, padding=1, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


REFIT_CASES: dict[str, list[Any]] = {
    key_of(nn.Linear): [pytest.param("linear", torch.randn(64, 2), id="linear")],
    key_of(nn.Conv1d): [pytest.param("conv1d", torch.randn(16, 2, 12), id="conv1d")],
    key_of(nn.Conv2d): [pytest.param("conv2d", torch.randn(8, 2, 7, 7), id="conv2d")],
}


@pytest.mark.parametrize(("key", "kind", "x"), [pytest.param(k, *p.values, id=p.id)
                                                for k, ps in REFIT_CASES.items() for p in ps])
def test_refit(key: str, kind: str, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Low(kind).eval()
    fit = refit_of(model.b)
    assert fit is LAYERS[key].refit
    assert fit.why_not(model.b) is None
    # the hook's rows, times the weight, are the layer's output rows
    with torch.no_grad():
        rows = fit.rows(model.b, model.a(x))
        want = fit.out_rows(model.b, model(x))
        got = rows @ model.b.weight.reshape(model.b.weight.shape[0], -1).T + model.b.bias
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fit.inputs(model.b) == 6

    original = copy.deepcopy(model)
    plan = Plan({"a.weight": {0: (1, 4)}, "b.weight": {1: (1, 4)}})
    ap.apply_plan(model, plan, x[:1])
    assert fit.inputs(model.b) == 4
    with torch.no_grad():
        target = original(x)
        sliced = (model(x) - target).norm()
        report = reconstruct(model, original, [(x, None)], plan)
        refit = (model(x) - target).norm()
    assert "b" in report.refit, report
    err_before, err_after = report.refit["b"]
    assert err_after <= err_before
    assert refit <= sliced and refit < 1e-2 * target.norm(), (float(sliced), float(refit))


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3, padding="same"),
                                   nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")],
                         ids=["grouped", "padding-same", "padding-reflect"])
def test_refit_says_why_not(layer: nn.Module) -> None:
    fit = refit_of(layer)
    assert fit is not None and fit.why_not(layer)


# --------------------------------------------------------------------------------------------------
# the registry and the matrix agree
# --------------------------------------------------------------------------------------------------

CASES: dict[str, dict[str, Any]] = {
    "fix": FIX_CASES, "role": ROLE_CASES, "channel_dim": CHANNEL_CASES, "norm": NORM_CASES, "refit": REFIT_CASES,
    "width": WIDTH_CASES,
}


def test_every_registered_hook_has_a_case() -> None:
    assert set(CASES) == set(HOOKS), "a new kind of hook needs its own cases here"
    missing = [f"{key}: {hook}" for key, entry in LAYERS.items() for hook in HOOKS
               if getattr(entry, hook) is not None and not CASES[hook].get(key)]
    assert not missing, f"registered layer hooks without a case in tests/test_layer_matrix.py: {missing}"
    stale = [f"{key}: {hook}" for hook, cases in CASES.items() for key in cases
             if key not in LAYERS or getattr(LAYERS[key], hook) is None]
    assert not stale, f"cases for hooks no longer registered: {stale}"
    assert set(CONSISTENT) == set(FIX_CASES)


# --------------------------------------------------------------------------------------------------
# a custom layer kind registered in one call
# --------------------------------------------------------------------------------------------------


class ScaledLinear(nn.Module):
    """A linear layer of its own: a weight parameter, F.linear, and sizes kept in attributes that forward
    reads (so pruning it needs a fixer)."""

    def __init__(self, n_in: int, n_out: int, scale: float = 0.5) -> None:
        super().__init__()
        self.n_in, self.n_out, self.scale = n_in, n_out, scale
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.n_in), self.weight) * self.scale
        return y.reshape(*x.shape[:-1], self.n_out)


def _fix_scaled(m: Any, old: dict[str, Any]) -> None:
    m.n_out, m.n_in = m.weight.shape


def _scaled_net() -> nn.Module:
    torch.manual_seed(0)
    return Chain(ScaledLinear(6, 16), nn.ReLU(), ScaledLinear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


@pytest.fixture
def scaled_kind():
    key = key_of(ScaledLinear)
    assert key not in LAYERS
    try:
        yield key
    finally:
        if key in LAYERS:
            unregister_layer(ScaledLinear)


def test_register_layer_in_one_call(scaled_kind: str, tmp_path) -> None:
    x = torch.randn(2, 5, 6)
    # unregistered: cutting a ScaledLinear breaks its forward (n_in is stale), so the check after surgery
    # keeps those channels whole
    model = _scaled_net()
    res = ap.prune(model, x, ratio=0.5)
    assert model.mods[0].weight.shape == (16, 6) and model.mods[2].weight.shape == (12, 16)
    assert any(f.op == "surgery check" for f in res.frozen)

    entry = register_layer(ScaledLinear, fix=_fix_scaled, role=lambda m, d: "out" if d == 0 else "in",
                           width=lambda m: m.n_out)
    assert LAYERS[scaled_kind] is entry
    model = _scaled_net()
    y0 = _run(model, x)
    res = ap.prune(model, x, ratio=0.5)
    assert not [f for f in res.frozen if f.op == "surgery check"]
    assert _run(model, x).shape == y0.shape
    for m in (model.mods[0], model.mods[2]):
        assert (m.n_out, m.n_in) == tuple(m.weight.shape)
        assert output_width(m) == m.n_out and weight_role(m, 0) == "out" and weight_role(m, 1) == "in"
    assert model.mods[0].weight.shape == (8, 6) and model.mods[2].weight.shape == (6, 8)
    # a data-driven criterion reads the roles: the layers' inputs and outputs are found
    wanda = _scaled_net()
    res_w = ap.prune(wanda, x, ratio=0.5, importance="wanda", calibration=[(x, torch.zeros(2, 5, dtype=torch.long))])
    assert wanda.mods[0].weight.shape == (8, 6) and not res_w.plan.is_empty
    # replay and reload
    fresh = _scaled_net()
    ap.apply_plan(fresh, res.plan, x)
    assert (fresh.mods[2].n_out, fresh.mods[2].n_in) == (6, 8)
    ap.save(res, tmp_path / "saved")
    torch.testing.assert_close(_run(ap.load(tmp_path / "saved", _scaled_net), x), _run(model, x))


def test_registry_is_clean_after_the_custom_kind() -> None:
    """The custom kind was removed again (this runs after test_register_layer_in_one_call)."""
    assert key_of(ScaledLinear) not in LAYERS
    assert lookup(ScaledLinear, "fix") is None and not layer_registry._FOUND.get((ScaledLinear, "width"))
