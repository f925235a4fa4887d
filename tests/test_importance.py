"""Contract tests for every registered importance criterion (picked up from ``IMPORTANCE.names()``).

On a few small nets fed real images (sklearn's 8x8 digits) as calibration data:

- every criterion returns one finite float score per channel for every group, and leaves the model as
  it was (weights, buffers, training flags, ``requires_grad``, ``.grad``);
- scores follow channel permutations: permuting the channels of one group consistently across all
  its slots (a function-preserving change) permutes the scores the same way (``random`` excluded);
- channels whose parameter slices are all zero score lowest, and exactly 0 for the data-driven ones;
- errors: a data-driven criterion without calibration, an unknown name, a duplicate registration.
"""

from __future__ import annotations

import os

os.environ["ADAPRUNE_STRICT_TRACE"] = "1"  # a failing graph rule raises instead of freezing

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError, UnknownNameError
from adaprune.graph import Group
from adaprune.importance import IMPORTANCE, Context, get_importance

torch.set_num_threads(1)

NAMES = IMPORTANCE.names()
DATA_DRIVEN = {"taylor", "activation", "apoz", "wanda"}
UNORDERED = {"random", "position"}  # scores carry no information about the weights


# ---------------------------------------------------------------------------------------------
# data: real 8x8 digit images
# ---------------------------------------------------------------------------------------------
_DIGITS = load_digits()
_X = torch.tensor(_DIGITS.images / 16.0, dtype=torch.float32)  # (1797, 8, 8) in [0, 1]
_Y = torch.tensor(_DIGITS.target, dtype=torch.long)


def image_batches(n: int = 2, size: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(_X[i * size:(i + 1) * size, None], _Y[i * size:(i + 1) * size]) for i in range(n)]


def flat_batches(n: int = 2, size: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.flatten(1), y) for x, y in image_batches(n, size)]


def row_batches(n: int = 2, size: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each image as a sequence of 8 tokens (its rows) of 8 features."""
    return [(x[:, 0], y) for x, y in image_batches(n, size)]


# ---------------------------------------------------------------------------------------------
# nets (the classifier is ``head`` and is ignored)
# ---------------------------------------------------------------------------------------------
class ResidualCNN(nn.Module):
    """conv+BN chain with an identity residual block, then a strided conv and a GAP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(x + self.bn2(self.c2(y)))
        x = torch.relu(self.bn3(self.c3(x)))
        return self.head(x.mean((2, 3)))


class FlattenCNN(nn.Module):
    """Depthwise (multiplier 2) + pointwise + grouped conv, max-pool, flatten -> Linear head: channels
    that own several positions of a slot."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.grouped = nn.Conv2d(12, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.grouped(torch.relu(self.pw(x))))
        return self.head(nn.functional.max_pool2d(x, 2).flatten(1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 24)
        self.ln = nn.LayerNorm(24)
        self.fc3 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.ln(self.fc2(x)))
        return self.head(nn.functional.gelu(self.fc3(x)))


class TinyTransformer(nn.Module):
    """Rows of the image as tokens: embed, pre-LN multi-head attention and FFN with residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ff1 = nn.Linear(16, 32)
        self.ff2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff2(torch.relu(self.ff1(x)))
        return self.head(x.mean(1))


NETS: dict[str, tuple[Callable[[], nn.Module], Callable[..., list]]] = {
    "residual_cnn": (ResidualCNN, image_batches),
    "flatten_cnn": (FlattenCNN, image_batches),
    "mlp": (MLP, flat_batches),
    "transformer": (TinyTransformer, row_batches),
}


def build(net: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    factory, batches = NETS[net]
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    model.eval()
    calib = batches()
    return model, calib, calib[0][0][:4]


_GRAPHS: dict[str, list[Group]] = {}


def groups_of(net: str) -> list[Group]:
    if net not in _GRAPHS:
        model, _, x = build(net)
        _GRAPHS[net] = ap.trace(model, x, ignore=[model.head]).groups
    return _GRAPHS[net]


def score(name: str, model: nn.Module, groups: list[Group], calib: list) -> dict[str, torch.Tensor]:
    return get_importance(name)(model, groups, Context(calibration=calib))


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return list(now) == list(before) and all(torch.equal(now[k], before[k]) for k in before)


criteria = pytest.mark.parametrize("name", NAMES)
nets = pytest.mark.parametrize("net", list(NETS))


def test_registry_has_the_documented_criteria() -> None:
    assert set(NAMES) >= {"l1", "l2", "lamp", "fpgm", "bn_scale", "taylor", "activation", "apoz",
                          "wanda", "random"}


@pytest.mark.parametrize("net", list(NETS))
def test_nets_have_groups(net: str) -> None:
    groups = groups_of(net)
    assert len(groups) >= 2
    assert all(g.size >= 2 for g in groups)


# ---------------------------------------------------------------------------------------------
# shape, dtype, finiteness; the model is left as it was
# ---------------------------------------------------------------------------------------------
@criteria
@nets
def test_one_finite_float_score_per_channel(name: str, net: str) -> None:
    model, calib, _ = build(net)
    groups = groups_of(net)
    model.train()  # the criterion may switch to eval; it must switch back
    for p in model.parameters():
        p.grad = None
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)

    scores = score(name, model, groups, calib)

    assert set(scores) == {g.name for g in groups}
    for g in groups:
        s = scores[g.name]
        assert isinstance(s, torch.Tensor), (g.name, type(s))
        assert s.dtype.is_floating_point, (g.name, s.dtype)
        assert tuple(s.shape) == (g.size,), (g.name, tuple(s.shape), g.size)
        assert torch.isfinite(s).all(), (g.name, s)
        assert (s >= 0).all(), (g.name, s)  # higher = keep; every built-in criterion is non-negative
    assert same_state(model, before), "scoring changed the weights or buffers"
    assert all(m.training for m in model.modules()), "scoring left modules in eval mode"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(p.grad is None for p in model.parameters()), "scoring left .grad behind"


@criteria
def test_scores_are_deterministic(name: str) -> None:
    model, calib, _ = build("residual_cnn")
    groups = groups_of("residual_cnn")
    a = score(name, model, groups, calib)
    b = score(name, model, groups, calib)
    for g in groups:
        assert torch.equal(a[g.name], b[g.name]), g.name


# ---------------------------------------------------------------------------------------------
# equivariance under channel permutations
# ---------------------------------------------------------------------------------------------
def permute_group(model: nn.Module, group: Group, perm: torch.Tensor) -> None:
    """New channel i gets what old channel perm[i] had, in every slot of ``group`` (params and buffers).

    Positions of one channel in a slot are matched in order, so e.g. the q, k and v rows of a head move
    together and a flattened feature map keeps its spatial order.
    """
    named = tensors(model)
    with torch.no_grad():
        for slot, owner in zip(group.slots, group.channel_of):
            src = torch.arange(slot.size)
            for i in range(group.size):
                dst = (owner == i).nonzero().flatten()
                frm = (owner == int(perm[i])).nonzero().flatten()
                assert dst.numel() == frm.numel(), f"{slot} is not regular; cannot permute channel {i}"
                src[dst] = frm
            t = named[slot.tensor]
            t.copy_(t.index_select(slot.dim, src))


@criteria
@nets
def test_scores_follow_channel_permutations(name: str, net: str) -> None:
    if name in UNORDERED:
        pytest.skip(f"{name} scores do not depend on the weights")
    model, calib, x = build(net)
    groups = groups_of(net)
    base = score(name, model, groups, calib)
    with torch.no_grad():
        ref_out = model(x)
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for g in groups:
        perm = torch.randperm(g.size, generator=gen)
        if torch.equal(perm, torch.arange(g.size)):
            perm = perm.roll(1)
        permuted = copy.deepcopy(model)
        permute_group(permuted, g, perm)
        with torch.no_grad():  # the permutation is function-preserving: the group is complete
            torch.testing.assert_close(permuted(x), ref_out, rtol=1e-4, atol=1e-5)
        after = score(name, permuted, groups, calib)
        expected = base[g.name][perm]
        scale = float(base[g.name].abs().max()) or 1.0
        np.testing.assert_allclose(
            after[g.name].double().numpy(), expected.double().numpy(), rtol=1e-4, atol=2e-3 * scale,
            err_msg=f"{name}: scores of group {g.name} did not follow the permutation {perm.tolist()}",
        )
        checked += 1
    assert checked == len(groups)


# ---------------------------------------------------------------------------------------------
# dead channels score lowest (exactly zero for the data-driven criteria)
# ---------------------------------------------------------------------------------------------
def zero_channels(model: nn.Module, group: Group, channels: list[int]) -> None:
    """Zero every *parameter* slice that ``channels`` own in ``group`` (buffers are left alone)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for c in channels:
            for (tensor, dim), pos in group.positions(c).items():
                if tensor in params:
                    params[tensor].index_fill_(dim, torch.tensor(pos), 0.0)


@criteria
@nets
def test_dead_channels_score_lowest(name: str, net: str) -> None:
    if name in UNORDERED:
        pytest.skip(f"{name} scores do not depend on the weights")
    groups = groups_of(net)
    for g in groups:
        model, calib, _ = build(net)
        dead = sorted({1, g.size - 2}) if g.size >= 4 else [0]
        zero_channels(model, g, dead)
        s = score(name, model, groups, calib)[g.name]
        alive = [c for c in range(g.size) if c not in dead]
        assert float(s[dead].max()) <= float(s[alive].min()), (
            f"{name}: dead channels {dead} of group {g.name} do not score lowest: {s.tolist()}"
        )
        if name in DATA_DRIVEN:
            assert torch.all(s[dead] == 0), f"{name}: dead channels of {g.name} score {s[dead].tolist()}"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@criteria
def test_calibration_required_exactly_by_data_driven_criteria(name: str) -> None:
    model, _, _ = build("mlp")
    groups = groups_of("mlp")
    crit = get_importance(name)
    if name in DATA_DRIVEN:
        with pytest.raises(ConfigError, match=name) as info:
            crit(model, groups, Context())
        assert "calibration" in str(info.value)
        with pytest.raises(ConfigError, match=name):
            crit(model, groups, Context(calibration=[]))
    else:
        try:
            scores = crit(model, groups, Context())
        except ConfigError as exc:  # a new data-driven criterion: it must at least name itself
            assert name in str(exc)
        else:
            assert set(scores) == {g.name for g in groups}


@pytest.mark.parametrize("name", sorted(DATA_DRIVEN & set(NAMES)))
def test_prune_without_calibration_names_the_criterion(name: str) -> None:
    model, _, x = build("mlp")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=name):
        ap.prune(model, x, ratio=0.5, importance=name, ignore=[model.head])
    assert same_state(model, before)


def test_unknown_name_lists_the_registered_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_importance("no-such-criterion")
    msg = str(info.value)
    assert "no-such-criterion" in msg
    for n in NAMES:
        assert n in msg
    assert isinstance(info.value, KeyError)
    model, _, x = build("mlp")
    with pytest.raises(UnknownNameError, match="no-such-criterion"):
        ap.prune(model, x, ratio=0.5, importance="no-such-criterion", ignore=[model.head])


def test_duplicate_registration_raises() -> None:
    original = IMPORTANCE.get("l2")

    class Dup:
        def __call__(self, model, groups, ctx):  # pragma: no cover - never called
            return {}

    with pytest.raises(ValueError, match="l2"):
        IMPORTANCE.register("l2")(Dup)
    assert IMPORTANCE.get("l2") is original
    assert IMPORTANCE.names() == NAMES


def test_non_string_non_callable_importance_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        get_importance(3)  # type: ignore[arg-type]


def test_callable_importance_is_used_as_is() -> None:
    calls = []

    def mine(model, groups, ctx):
        calls.append(len(groups))
        return {g.name: torch.arange(g.size, dtype=torch.float64) for g in groups}

    assert get_importance(mine).__wrapped__ is mine  # used as is, its output checked (test_arguments.py)
    model, _, x = build("mlp")
    res = ap.prune(model, x, ratio=0.5, importance=mine, ignore=[model.head])
    assert calls and calls[0] >= 1
    # the lowest-scored channels (the first half of each group) were removed
    fc1 = next(c for c in res.plan.groups if c.name == "fc1")
    assert list(fc1.removed) == list(range(16))


# ---------------------------------------------------------------------------------------------
# apoz is defined after the activation (Hu et al., 2016: "average percentage of zeros after ReLU")
# ---------------------------------------------------------------------------------------------
def test_apoz_scores_a_channel_that_is_always_zero_after_relu_lowest() -> None:
    """conv -> BN -> ReLU: a BN shift of -100 makes channel 3 of ``c1`` zero after the ReLU on every
    input, so its APoZ is 100% and its score (1 - APoZ) must be 0, the lowest of its group."""
    if "apoz" not in NAMES:
        pytest.skip("no apoz criterion")
    model, calib, _ = build("residual_cnn")
    with torch.no_grad():
        model.bn1.bias[3] = -100.0
        post_relu = torch.cat([torch.relu(model.bn1(model.c1(torch.relu(model.bn0(model.stem(x))))))
                               for x, _ in calib])
    assert (post_relu[:, 3] == 0).all() and (post_relu[:, [0, 1, 2]] > 0).any()
    s = score("apoz", model, groups_of("residual_cnn"), calib)["c1"]
    assert float(s[3]) == 0.0, f"apoz of a channel that is never active after its ReLU: {s.tolist()}"
    assert float(s[3]) <= float(s.min())
