"""Errors: bad arguments, bad inputs, bad plans and failed surgery raise typed errors and change nothing."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprune as ap
from adaprune.allocate import ALLOCATORS
from adaprune.errors import (
    AdapruneError,
    ConfigError,
    PlanError,
    PlanMismatchError,
    SurgeryError,
    TraceError,
    UnknownNameError,
)
from adaprune.importance import IMPORTANCE
from small_nets import Net

# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(2):
            net(torch.randn(4, 3, 8, 8))
    return net


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

_PRIMITIVES = (int, float, str, bool, tuple, type(None))


def snapshot(model: nn.Module) -> dict:
    """Everything 'the model is unchanged' means: tensors (bytes), tensor identities, attributes, modes, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ids": {k: id(v) for k, v in list(model.named_parameters()) + list(model.named_buffers())},
        "attrs": {
            n: {k: v for k, v in vars(m).items() if isinstance(v, _PRIMITIVES)}
            for n, m in model.named_modules()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "repr": repr(model),
    }


def assert_unchanged(model: nn.Module, snap: dict, x: torch.Tensor | None = None, y0=None) -> None:
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k
    now = {k: id(v) for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    assert now == snap["ids"]
    assert {
        n: {k: v for k, v in vars(m).items() if isinstance(v, _PRIMITIVES)} for n, m in model.named_modules()
    } == snap["attrs"]
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == snap[
        "hooks"
    ]
    assert repr(model) == snap["repr"]
    if x is not None:
        was = model.training
        model.eval()
        with torch.no_grad():
            y = model(x)
        model.train(was)
        assert torch.equal(y, y0)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


# --------------------------------------------------------------------------------------------------
# ratio, importance, allocation, ignore, other arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, "a", True, False, 1.5, float("nan"), [0.5]])
def test_bad_ratio_is_config_error(ratio):
    net = make_net()
    snap = snapshot(net)
    with pytest.raises(ConfigError, match="ratio") as info:
        ap.prune(net, X, ratio=ratio, ignore=[net.head])
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AdapruneError)
    assert_unchanged(net, snap)


@pytest.mark.parametrize("ratio", [0, 0.0, 0.999])
def test_ratio_bounds_accepted(ratio):
    net = make_net()
    res = ap.prune(net, X, ratio=ratio, ignore=[net.head])
    if ratio == 0:
        assert res.plan.is_empty and res.after == res.before
    else:
        assert net.c1.out_channels == 1 and net.c2.out_channels == 1  # min_channels=1 keeps one


def test_unknown_importance_lists_registered_names():
    net = make_net()
    snap = snapshot(net)
    with pytest.raises(UnknownNameError) as info:
        ap.prune(net, X, importance="l3", ignore=[net.head])
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, AdapruneError)
    msg = str(err)
    assert "l3" in msg
    names = IMPORTANCE.names()
    assert {"l1", "l2"} <= set(names)
    for name in names:
        assert name in msg
    assert_unchanged(net, snap)


def test_unknown_allocation_lists_registered_names():
    net = make_net()
    snap = snapshot(net)
    with pytest.raises(UnknownNameError) as info:
        ap.prune(net, X, allocation="no-such-allocator", ignore=[net.head])
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "no-such-allocator" in msg
    assert "uniform" in ALLOCATORS.names()
    for name in ALLOCATORS.names():
        assert name in msg
    assert_unchanged(net, snap)


def test_unknown_name_error_message_is_readable():
    with pytest.raises(UnknownNameError) as info:
        IMPORTANCE.get("nope")
    # KeyError would repr-quote the message; ours prints it as written
    assert not str(info.value).startswith(("'", '"'))


def test_ignore_module_not_in_model():
    net, other = make_net(), make_net(1)
    snap = snapshot(net)
    with pytest.raises(ConfigError, match="ignore") as info:
        ap.prune(net, X, ignore=[other.head])
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="ignore"):
        ap.trace(net, X, ignore=[copy.deepcopy(net).head])  # a copy's module is another module
    assert_unchanged(net, snap)


@pytest.mark.parametrize("item", ["no_such_module", 3, None])
def test_ignore_bad_items(item):
    net = make_net()
    snap = snapshot(net)
    with pytest.raises(ConfigError, match="ignore"):
        ap.prune(net, X, ignore=[item])
    assert_unchanged(net, snap)


def test_ignore_by_name_is_accepted():
    net = make_net()
    res = ap.prune(net, X, ignore=["head"])
    assert net.head.out_features == 4 and not res.plan.is_empty


@pytest.mark.parametrize(
    "kw", [{"min_channels": 0}, {"round_to": 0}, {"min_channels": 1.5}, {"round_to": True}]
)
def test_bad_min_channels_round_to(kw):
    net = make_net()
    snap = snapshot(net)
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=name):
        ap.prune(net, X, ignore=[net.head], **kw)
    assert_unchanged(net, snap)


# --------------------------------------------------------------------------------------------------
# example inputs the model cannot run
# --------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "wrong_channels": torch.randn(1, 4, 8, 8),
    "wrong_rank": torch.randn(3, 8),
    "unknown_keyword": {"y": torch.randn(1, 3, 8, 8)},
    "too_many_args": (torch.randn(1, 3, 8, 8), torch.randn(1)),
}


@pytest.mark.parametrize("which", list(BAD_INPUTS))
def test_trace_bad_inputs_is_trace_error(which):
    net = make_net()
    snap = snapshot(net)
    with pytest.raises(TraceError) as info:
        ap.trace(net, BAD_INPUTS[which], ignore=[net.head])
    assert "example_inputs" in str(info.value)
    assert_unchanged(net, snap)  # hooks removed, modes restored


@pytest.mark.parametrize("which", list(BAD_INPUTS))
def test_prune_bad_inputs_is_trace_error(which):
    net = make_net()
    snap = snapshot(net)
    with pytest.raises(TraceError):
        ap.prune(net, BAD_INPUTS[which], ratio=0.5, ignore=[net.head])
    assert_unchanged(net, snap)


def test_trace_error_from_inside_forward():
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            self.c(x)
            raise RuntimeError("boom in forward")

    net = Fails()
    snap = snapshot(net)
    with pytest.raises(TraceError, match="boom in forward") as info:
        ap.trace(net, X, ignore=[net.head])
    assert isinstance(info.value, RuntimeError)
    assert_unchanged(net, snap)


# --------------------------------------------------------------------------------------------------
# plans that do not fit the model
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _good_plan() -> ap.Plan:  # a Plan is frozen (immutable): safe to share
    net = make_net()
    return ap.prune(net, X, ratio=0.5, ignore=[net.head]).plan


@pytest.mark.parametrize(
    "removals,match",
    [
        ({"c9.weight": {0: (0,)}}, "c9.weight"),  # tensor the model does not have
        ({"c1.weight": {0: (16,)}}, "index 16"),  # index past the end
        ({"c1.weight": {4: (0,)}}, "dim 4"),  # dim the tensor does not have
        ({"c1.weight": {0: tuple(range(16))}}, "all 16"),  # removes every channel
        ({"bn.running_mean": {0: (3, 99)}}, "99"),  # a buffer, out of range
    ],
)
def test_plan_mismatch(removals, match):
    net = make_net()
    snap, y0 = snapshot(net), eval_out(net, X)
    plan = ap.Plan(removals)
    with pytest.raises(PlanMismatchError, match=match) as info:
        ap.apply_plan(net, plan, X)
    assert isinstance(info.value, PlanError) and isinstance(info.value, ValueError)
    with pytest.raises(PlanMismatchError):
        ap.apply_plan(net, plan)  # unchecked replay checks the plan too
    with pytest.raises(PlanMismatchError):
        ap.mask(net, plan)
    assert_unchanged(net, snap, X, y0)


def test_plan_for_another_architecture():
    plan = _good_plan()

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 16, 3)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    other = Other()
    snap = snapshot(other)
    with pytest.raises(PlanMismatchError, match="does not have"):
        ap.apply_plan(other, plan)
    assert_unchanged(other, snap)


def test_plan_replayed_on_already_pruned_model():
    net = make_net()
    res = ap.prune(net, X, ratio=0.5, ignore=[net.head])
    snap = snapshot(net)
    with pytest.raises(PlanMismatchError):
        ap.apply_plan(net, res.plan, X)
    assert_unchanged(net, snap)


# --------------------------------------------------------------------------------------------------
# malformed plan JSON
# --------------------------------------------------------------------------------------------------


def _plan_dict() -> dict:
    return json.loads(_good_plan().to_json())


def _mutate(kind: str) -> str:
    d = _plan_dict()
    name = min(d["removals"])
    dim = next(iter(d["removals"][name]))
    if kind == "not_json":
        return "{this is not json"
    if kind == "empty":
        return ""
    if kind == "top_level_list":
        return json.dumps([d])
    if kind == "wrong_version":
        d["version"] = 2
    elif kind == "version_string":
        d["version"] = "1"
    elif kind == "no_version":
        del d["version"]
    elif kind == "negative_index":
        d["removals"][name][dim] = [-1] + d["removals"][name][dim]
    elif kind == "duplicate_index":
        idx = d["removals"][name][dim]
        d["removals"][name][dim] = idx + [idx[0]]
    elif kind == "float_index":
        d["removals"][name][dim] = [0.5]
    elif kind == "bool_index":
        d["removals"][name][dim] = [True]
    elif kind == "non_integer_dim":
        d["removals"][name]["x"] = [0]
    elif kind == "indices_not_list":
        d["removals"][name][dim] = 3
    elif kind == "removals_not_object":
        d["removals"] = [1, 2]
    elif kind == "no_removals":
        del d["removals"]
    elif kind == "dims_not_object":
        d["removals"][name] = [0, 1]
    elif kind == "group_missing_field":
        d["groups"] = [{"name": "c1", "size": 16}]
    elif kind == "group_bad_size":
        d["groups"] = [{"name": "c1", "size": "big", "removed": [0]}]
    else:  # pragma: no cover
        raise AssertionError(kind)
    return json.dumps(d)


@pytest.mark.parametrize(
    "kind",
    [
        "not_json",
        "empty",
        "top_level_list",
        "wrong_version",
        "version_string",
        "no_version",
        "negative_index",
        "duplicate_index",
        "float_index",
        "bool_index",
        "non_integer_dim",
        "indices_not_list",
        "removals_not_object",
        "no_removals",
        "dims_not_object",
        "group_missing_field",
        "group_bad_size",
    ],
)
def test_malformed_plan_json(kind):
    text = _mutate(kind)
    with pytest.raises(PlanError) as info:
        ap.Plan.from_json(text)
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, PlanMismatchError)  # malformed, not "does not fit"


def test_plan_error_messages_name_the_problem():
    with pytest.raises(PlanError, match="version"):
        ap.Plan.from_json(_mutate("wrong_version"))
    with pytest.raises(PlanError, match="non-negative"):
        ap.Plan.from_json(_mutate("negative_index"))
    with pytest.raises(PlanError, match="repeats"):
        ap.Plan.from_json(_mutate("duplicate_index"))
    with pytest.raises(PlanError, match="JSON"):
        ap.Plan.from_json(_mutate("not_json"))


def test_valid_plan_json_round_trip():
    plan = _good_plan()
    again = ap.Plan.from_json(plan.to_json(indent=2))
    assert again == plan or again.to_dict() == plan.to_dict()
    assert ap.Plan.from_json(again.to_json()).to_json() == plan.to_json()


# --------------------------------------------------------------------------------------------------
# surgery that fails leaves the model exactly as it was
# --------------------------------------------------------------------------------------------------


class HardCodedWidth(nn.Module):
    """Computes a size from a constant (16) on a channel dim that pruning shrinks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = x.view(x.shape[0], 16, -1).mean(-1)
        return self.head(x)


def _hard_coded(train: bool) -> HardCodedWidth:
    torch.manual_seed(0)
    net = HardCodedWidth()
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8))  # non-trivial running stats (train mode)
    net.train(train)
    return net


@pytest.mark.parametrize("train", [True, False])
def test_surgery_failure_restores_model_exactly(train):
    net = _hard_coded(train)
    snap, y0 = snapshot(net), eval_out(net, X)
    grads_before = [p.grad for p in net.parameters()]
    res = ap.prune(net, X, ratio=0.5, ignore=[net.head])  # the only group cut breaks it: kept whole
    assert res.plan.is_empty and "surgery check" in res.reason and "breaks the model" in res.reason
    assert_unchanged(net, snap, X, y0)
    assert [p.grad for p in net.parameters()] == grads_before
    # the model still trains and runs as before
    out = net(X)
    assert out.shape == (2, 4)


def test_surgery_failure_then_successful_prune_with_ignore():
    net = _hard_coded(False)
    res = ap.prune(net, X, ratio=0.5, ignore=[net.head])
    assert res.plan.is_empty and "surgery check" in res.reason
    # freezing the width the code fixes (the producer of those channels) makes the prune valid
    res = ap.prune(net, X, ratio=0.5, ignore=[net.head, net.bn])
    assert res.plan.is_empty and net.c1.out_channels == 16


class OutputFromWidth(nn.Module):
    """The output's shape depends on the pruned width: the shape check after surgery catches it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        logits = self.head(x.mean((2, 3)))
        return logits.unsqueeze(1).expand(-1, 16 // x.shape[1], -1)


def test_surgery_output_shape_change_restores_model():
    torch.manual_seed(0)
    net = OutputFromWidth().eval()
    snap, y0 = snapshot(net), eval_out(net, X)
    res = ap.prune(net, X, ratio=0.5, ignore=[net.head])
    assert res.plan.is_empty and "output shapes" in res.reason
    assert_unchanged(net, snap, X, y0)


def test_apply_plan_failure_restores_model():
    net = _hard_coded(False)
    # a valid plan (made on a copy whose hard-coded view the trace could not see)
    good = ap.Plan(
        {
            "c1.weight": {0: (0, 1)},
            "c1.bias": {0: (0, 1)},
            "bn.weight": {0: (0, 1)},
            "bn.bias": {0: (0, 1)},
            "bn.running_mean": {0: (0, 1)},
            "bn.running_var": {0: (0, 1)},
            "head.weight": {1: (0, 1)},
        }
    )
    snap, y0 = snapshot(net), eval_out(net, X)
    with pytest.raises(SurgeryError):
        ap.apply_plan(net, good, X)
    assert_unchanged(net, snap, X, y0)


def test_failed_prune_with_tied_weights_restores_ties():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.fc = nn.Linear(16, 16)
            self.out = nn.Linear(16, 20, bias=False)
            self.out.weight = self.emb.weight  # weight tying

        def forward(self, ids):
            h = F.relu(self.fc(self.emb(ids)))
            return self.out(h.view(h.shape[0], h.shape[1], 16))

    torch.manual_seed(0)
    net = Tied()
    ids = torch.randint(0, 20, (2, 5))
    snap, y0 = snapshot(net), eval_out(net, ids)
    res = ap.prune(net, ids, ratio=0.5)  # the hard-coded 16 in view() breaks after the cut
    assert res.plan.is_empty and "surgery check" in res.reason
    assert_unchanged(net, snap, ids, y0)
    assert net.out.weight is net.emb.weight  # the tie survives the roll back
    assert dict(net.named_parameters(remove_duplicate=False))["out.weight"] is net.emb.weight


def _mlp_and_plan() -> tuple[nn.Module, ap.Plan]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    plan = ap.Plan({"0.weight": {0: (1, 3)}, "0.bias": {0: (1, 3)},
                    "2.weight": {0: (0, 5, 7), 1: (1, 3)}, "2.bias": {0: (0, 5, 7)}, "4.weight": {1: (0, 5, 7)}})
    return net, plan


def test_surgery_releases_old_weights_while_checking_and_rolls_back_exactly():
    import weakref

    net, plan = _mlp_and_plan()
    x = torch.randn(2, 8)
    snap, y0 = snapshot(net), eval_out(net, x)
    old = weakref.ref(net[2].weight)  # not a strong reference: the old storage may be released
    seen = []

    def check():
        seen.append(old().numel())  # the model is never held twice in memory
        raise RuntimeError("boom")

    with pytest.raises(SurgeryError, match="boom"):
        ap.remove(net, plan, check=check, release=True)
    assert seen == [0]
    assert_unchanged(net, snap, x, y0)


def test_committed_surgery_keeps_the_values_of_old_weights_held_elsewhere():
    net, plan = _mlp_and_plan()
    held = net[2].weight
    before = held.detach().clone()
    ap.remove(net, plan, release=True)
    assert net[2].weight.shape == (13, 14)
    assert torch.equal(held, before)  # what the caller kept still reads the old values
    rows = [i for i in range(16) if i not in (0, 5, 7)]
    cols = [i for i in range(16) if i not in (1, 3)]
    assert torch.equal(net[2].weight, before[rows][:, cols])


def test_small_plans_keep_old_weights_whole_unless_asked():
    net, plan = _mlp_and_plan()
    old = net[2].weight
    seen = []
    ap.remove(net, plan, check=lambda: seen.append(old.numel()))
    assert seen == [256]  # below RELEASE_BYTES nothing is released (no slices to copy: faster)


def test_committed_release_drops_every_reference_to_the_old_weights(monkeypatch):
    import sys
    import weakref

    surgery = sys.modules["adaprune.surgery.remove"]
    monkeypatch.setattr(surgery, "RELEASE_BYTES", 0)  # the automatic choice releases even a tiny model
    rebuilt = []
    joined = surgery._Cut.joined
    monkeypatch.setattr(surgery._Cut, "joined", lambda self, kept: rebuilt.append(1) or joined(self, kept))
    net, plan = _mlp_and_plan()
    old = weakref.ref(net[2].weight)
    ap.remove(net, plan, check=lambda: rebuilt.append(old().numel()))
    assert rebuilt == [0]  # released while checking, and not rebuilt: nothing of ours still held it
    assert old() is None
