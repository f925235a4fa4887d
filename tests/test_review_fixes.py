"""Regression tests for a hostile-input review: plans built directly, reconstruct's arguments and NaN
calibration, export_onnx's arguments, apply_plan on a model that does not run, long report histories,
the length of UnsaveableConfigError messages, and Cost's fields."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from torch import nn

import adaprune as ap
from adaprune.errors import (
    AdapruneError,
    ArgumentTypeError,
    ConfigError,
    NonFiniteArgumentError,
    NonFiniteError,
    PlanError,
    TraceError,
)
from adaprune.plan import GroupCut, Plan

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Each tensor's object id and a copy of its values."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: (id(t), t.detach().clone()) for n, t in named}


def assert_unchanged(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    after = state(model)
    assert after.keys() == before.keys()
    for name, (ident, values) in before.items():
        assert after[name][0] == ident, f"{name} is a new tensor"
        assert torch.equal(after[name][1], values), f"{name} changed"


def one_line(exc: BaseException, limit: int = 600) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) <= limit, text
    return text


# -- 1. Plan(...) and GroupCut(...) built directly are checked --------------------------------------------


@pytest.mark.parametrize(
    ("removals", "fragment"),
    [
        ({"0.weight": {0: (-1,)}}, "removals['0.weight'][0]"),  # would remove the last channel
        ({"0.weight": {0: (1.5,)}}, "removals['0.weight'][0]"),  # would remove channel 1
        ({"0.weight": {0: (1, 1)}}, "repeats an index"),
        ({"0.weight": {0: ("a",)}}, "removals['0.weight'][0]"),
        ({"0.weight": {0: (True,)}}, "removals['0.weight'][0]"),
        ({"0.weight": {0: torch.tensor([0.5])}}, "removals['0.weight'][0]"),
        ({"0.weight": {0: np.array([1.0, 2.0])}}, "removals['0.weight'][0]"),
        ({"0.weight": {0: np.array([[1]])}}, "removals['0.weight'][0]"),
        ({"0.weight": {0: [torch.tensor(1)]}}, "removals['0.weight'][0]"),
        ({"0.weight": {0: 3}}, "removals['0.weight'][0]"),
        ({"0.weight": {-1: (1,)}}, "removals['0.weight'] has a dim -1"),
        ({"0.weight": {"0": (1,)}}, "removals['0.weight'] has a dim '0'"),
        ({"0.weight": {1.0: (1,)}}, "removals['0.weight'] has a dim 1.0"),
        ({"0.weight": [1, 2]}, "removals['0.weight']"),
        ({5: {0: (1,)}}, "tensor name 5"),
        ("x", "removals='x'"),
        ([("0.weight", {0: (1,)})], "removals=[("),
    ],
)
def test_plan_built_directly_refuses_malformed_removals(removals, fragment):
    with pytest.raises(PlanError) as info:
        Plan(removals)
    assert fragment in one_line(info.value, 300)


def test_plan_built_directly_refuses_bad_groups_and_group_cuts():
    for args, fragment in [
        ((5, 4, (1,)), "name=5"),
        (("g", -1, ()), "size=-1"),
        (("g", True, ()), "size=True"),
        (("g", 4, (4,)), "index 4 is not below the group's size 4"),
        (("g", 4, (1, 1)), "repeats an index"),
        (("g", 4, (1.5,)), "GroupCut 'g': removed"),
    ]:
        with pytest.raises(PlanError) as info:
            GroupCut(*args)
        assert fragment in one_line(info.value), (args, str(info.value))
    with pytest.raises(PlanError, match="tuple of GroupCut"):
        Plan({}, groups=("not a cut",))  # type: ignore[arg-type]


def test_plan_built_directly_normalises_what_it_accepts():
    plan = Plan(
        {
            "0.weight": {np.int64(0): [np.int64(5), 2, np.int32(3)]},
            "0.bias": {0: torch.tensor([5, 3, 2])},
            "2.weight": {1: np.array([3, 2, 5], dtype=np.uint8)},
            "extra": {0: range(2)},
        },
        [GroupCut("g", np.int64(16), [5, 3, 2])],
    )
    assert plan.removals == {"0.weight": {0: (2, 3, 5)}, "0.bias": {0: (2, 3, 5)}, "2.weight": {1: (2, 3, 5)},
                             "extra": {0: (0, 1)}}
    for dims in plan.removals.values():
        for d, idx in dims.items():
            assert type(d) is int and type(idx) is tuple and all(type(i) is int for i in idx)
    assert isinstance(plan.groups, tuple) and plan.groups[0] == GroupCut("g", 16, (2, 3, 5))
    assert type(plan.groups[0].size) is int
    # a sorted tuple of ints is kept as it is (no copy for the plans of large models)
    idx = tuple(range(0, 20000, 2))
    assert Plan({"w": {0: idx}}).removals["w"][0] is idx
    # what it accepts round-trips through JSON, and replays
    assert Plan.from_json(plan.to_json()) == plan
    net = mlp()
    ap.apply_plan(net, Plan({k: v for k, v in plan.removals.items() if k != "extra"}), X)
    assert net[0].out_features == 13


def test_plan_from_dict_keeps_its_messages_and_the_constructor_refuses_the_same():
    for idx, message in [([1, -1], "must be a list of non-negative integers"), ((1,), "must be a list"),
                         ([2, 2], "repeats an index"), ([True], "must be a list")]:
        with pytest.raises(PlanError, match=message) as info:
            Plan.from_dict({"version": 1, "removals": {"w": {"0": idx}}})
        assert "plan removals['w']['0']" in str(info.value)
        if isinstance(idx, list):
            with pytest.raises(PlanError, match="Plan removals\\['w'\\]\\[0\\]"):
                Plan({"w": {0: tuple(idx)}})
    assert Plan.from_dict({"version": 1, "removals": {"w": {"0": [3, 1]}}}).removals == {"w": {0: (1, 3)}}


def test_a_plan_that_loads_is_the_only_kind_save_can_write(tmp_path):
    """Before: ap.save wrote a plan with a negative index, and ap.load refused its own save."""
    with pytest.raises(PlanError):
        Plan(removals={"0.weight": {0: (-1,)}, "0.bias": {0: (-1,)}, "2.weight": {1: (-1,)}})
    net = mlp()
    plan = Plan(removals={"0.weight": {0: [np.int64(15)]}, "0.bias": {0: (15,)}, "2.weight": {1: (15,)}})
    ap.apply_plan(net, plan, X)
    ap.save(net, tmp_path, plan=plan)
    loaded = ap.load(tmp_path, mlp)
    torch.testing.assert_close(loaded(X), net(X))


def test_mask_with_float_indices_is_refused_when_the_plan_is_built():
    with pytest.raises(PlanError):
        ap.mask(mlp(), Plan({"0.weight": {0: (1.0, 2.0)}}))


# -- 2. reconstruct's arguments, and NaN calibration batches ------------------------------------------------


def _cut_pair():
    original = mlp()
    pruned = copy.deepcopy(original)
    plan = Plan({"0.weight": {0: tuple(range(8))}, "0.bias": {0: tuple(range(8))}, "2.weight": {1: tuple(range(8))}})
    ap.remove(pruned, plan)
    return pruned, original, plan


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"pruned": "x"}, ArgumentTypeError, "pruned"),
        ({"original": {"a": 1}}, ArgumentTypeError, "original"),
        ({"batches": "abc"}, ArgumentTypeError, "batches='abc'"),
        ({"batches": 5}, ArgumentTypeError, "batches=5"),
        ({"ridge": math.nan}, NonFiniteArgumentError, "ridge"),
        ({"ridge": "0.1"}, ArgumentTypeError, "ridge"),
        ({"max_features": 0}, ConfigError, "max_features=0"),
        ({"max_features": 2.5}, ArgumentTypeError, "max_features=2.5"),
        ({"removals": 5}, ArgumentTypeError, "removals=5"),
        ({"removals": {"0.weight": {0: (1.5,)}}}, PlanError, "removals['0.weight'][0]"),
    ],
)
def test_reconstruct_checks_its_arguments(kwargs, error, fragment):
    pruned, original, plan = _cut_pair()
    before = state(pruned)
    args = {"pruned": pruned, "original": original, "batches": [(X, None)], "removals": plan.removals} | kwargs
    with pytest.raises(error) as info:
        ap.reconstruct(args.pop("pruned"), args.pop("original"), args.pop("batches"), args.pop("removals"), **args)
    assert fragment in one_line(info.value)
    assert_unchanged(pruned, before)


def test_reconstruct_takes_a_plan_for_its_removals():
    pruned, original, plan = _cut_pair()
    report = ap.reconstruct(pruned, original, [(X, None)], plan, ridge=0.01)
    assert set(report.refit) == {"2"}


def test_prune_refit_on_nan_calibration_is_a_non_finite_error_and_changes_nothing(capfd):
    net = mlp()
    before = state(net)
    bad = X.clone()
    bad[3, 1] = math.nan
    with pytest.raises(NonFiniteError) as info:
        ap.prune(net, X, ratio=0.5, refit=True, calibration=[(X, None), (bad, None)])
    text = one_line(info.value)
    assert "layer '2'" in text and "batch 1 (of 2)" in text, text
    assert not isinstance(info.value, RuntimeError)
    assert_unchanged(net, before)
    assert net[0].out_features == 16
    out, err = capfd.readouterr()
    assert "oneMKL" not in out + err and "INTERNAL ASSERT" not in out + err


def test_reconstruct_on_nan_leaves_the_pruned_model_as_it_was():
    pruned, original, plan = _cut_pair()
    before = state(pruned)
    bad = X.clone()
    bad[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="layer '2'.*batches 0, 1 \\(of 2\\)"):
        ap.reconstruct(pruned, original, [bad, bad], plan.removals)
    assert_unchanged(pruned, before)


# -- 3. export_onnx's arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"path": 5}, ArgumentTypeError, "path=5"),
        ({"path": None}, ArgumentTypeError, "path=None"),
        ({"path": ""}, ConfigError, "path=''"),
        ({"opset": 0}, ConfigError, "opset=0"),
        ({"opset": 99}, ConfigError, "opset=99"),
        ({"opset": "17"}, ArgumentTypeError, "opset='17'"),
        ({"opset": 17.0}, ArgumentTypeError, "opset=17.0"),
        ({"example_inputs": None}, ArgumentTypeError, "example_inputs=None"),
        ({"model": nn.Linear}, ArgumentTypeError, "not the class"),
        ({"example_inputs": torch.randn(2, 5)}, TraceError, "failed to run on example_inputs"),
    ],
)
def test_export_onnx_checks_its_arguments_first(kwargs, error, fragment, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = mlp()
    args = {"model": net, "example_inputs": X, "path": tmp_path / "m.onnx", "opset": 17} | kwargs
    with pytest.raises(error) as info:
        ap.export_onnx(args["model"], args["example_inputs"], args["path"], opset=args["opset"])
    assert fragment in one_line(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []
    assert net.training
    _, err = capfd.readouterr()
    assert "graph(" not in err and len(err.splitlines()) < 5, err[-2000:]  # no exporter dump of the IR


def test_export_onnx_opset_range_is_torchs():
    from torch.onnx import _constants

    low, high = _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    for bad in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"in \\[{low}, {high}\\]"):
            ap.export_onnx(mlp(), X, "unused.onnx", opset=bad)


# -- 4. apply_plan on a model that does not run on the inputs ---------------------------------------------


def test_apply_plan_on_a_model_that_does_not_run_is_a_trace_error():
    net = mlp()
    before = state(net)
    plan = Plan({"0.weight": {0: (1,)}, "0.bias": {0: (1,)}, "2.weight": {1: (1,)}})
    with pytest.raises(TraceError) as info:
        ap.apply_plan(net, plan, torch.randn(2, 5))
    assert "failed to run on example_inputs" in one_line(info.value)
    assert "mat1 and mat2" in str(info.value)
    assert_unchanged(net, before)


# -- 5. long report histories -------------------------------------------------------------------------------


def _report(rows: int) -> dict:
    from adaprune import report
    from adaprune.adapt import StepRecord

    costs = {"macs": 1000.0, "params": 100.0, "bytes": 400.0, "energy": 5.0, "latency": 2.0}
    history = [
        StepRecord(i, 0.2, {"g": 1}, {"accuracy": 0.96 - 1e-4 * i}, {k: v * (1 - 1e-3 * i) for k, v in costs.items()},
                   i % 4 != 3, "r")
        for i in range(rows)
    ]
    res = SimpleNamespace(history=history, before={"accuracy": 0.96}, after={"accuracy": 0.9}, costs_before=costs,
                          costs_after=costs, message="m", budget_met=True)
    widths = {"conv": {"kind": "Conv2d", "width": 16}}
    return report.build(res, tolerance=0.02, budget=ap.Budget(latency=0.75), widths_before=widths,
                        widths_after=widths)


def _labels(monkeypatch, data: dict) -> list[str]:
    from adaprune.report import plots

    texts: list[str] = []
    real = Axes.annotate

    def annotate(self, text, *args, **kwargs):
        texts.append(text)
        return real(self, text, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(Axes, "annotate", annotate)
        assert plots.pareto(data) is not None
    return texts


def test_pareto_labels_a_bounded_number_of_points_and_every_step_of_a_short_history(monkeypatch):
    from adaprune.report import plots

    texts = _labels(monkeypatch, _report(400))  # 300 accepted steps, two panels (MACs, latency)
    assert 0 < len(texts) <= 2 * plots.LABELS
    assert {"0", "398"} <= set(texts)  # the front's ends are numbered
    short = _labels(monkeypatch, _report(12))  # as before: every accepted step, on both panels
    assert sorted(short, key=int) == sorted([str(i) for i in range(12) if i % 4 != 3] * 2, key=int)


# -- 6. UnsaveableConfigError messages are short ----------------------------------------------------------


def test_unsaveable_config_messages_are_one_short_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    from adaprune.surgery.hf_config import UnsaveableConfigError, UnsaveableConfigWarning

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, num_labels=3)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    removals = {}
    for i in range(2):  # the last head of each layer: BERT derives the head size, so it cannot be stated
        p = f"bert.encoder.layer.{i}.attention."
        for proj in ("query", "key", "value"):
            removals[f"{p}self.{proj}.weight"] = {0: tuple(range(48, 64))}
            removals[f"{p}self.{proj}.bias"] = {0: tuple(range(48, 64))}
        removals[f"{p}output.dense.weight"] = {1: tuple(range(48, 64))}
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UnsaveableConfigWarning):
        ap.apply_plan(model, Plan(removals), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(UnsaveableConfigError) as info:
        model.save_pretrained(tmp_path / "out")
    text = one_line(info.value, 300)
    for fragment in ("BertConfig", "num_attention_heads=3", "adaprune.save(", "adaprune.load("):
        assert fragment in text, text


def test_unsaveable_config_messages_name_a_few_layers_then_count_the_rest():
    from adaprune.surgery.hf_config import Proposal, message, why
    from adaprune.surgery.hf_describe import entries

    sizes = {f"model.layers.{i}.mlp": {"ffn": 1000 + 7 * (i % 9)} for i in range(80)}
    sizes |= {f"model.layers.{i}.self_attn": {"heads": 8 + i % 5} for i in range(80)}
    prop = Proposal(differs={"ffn": entries(sizes, "ffn"), "heads": entries(sizes, "heads")})
    reason = why(prop, [], None)
    assert reason.startswith("sizes differ per layer: layers 0, 9, 18, 27, ...: 1000 FFN neurons")
    assert reason.endswith("more") and " and 1" in reason, reason
    config = type("LlamaConfig", (), {})()
    text = message(config, nn.Module(), reason)
    assert "\n" not in text and len(text) <= 300, (len(text), text)
    assert "adaprune.save(" in text and "adaprune.load(" in text


# -- 7. Cost's fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "fragment"),
    [
        ((math.nan, 0, 0), NonFiniteArgumentError, "Cost(macs=nan)"),
        (("1", 0, 0), ArgumentTypeError, "Cost(macs='1')"),
        ((-1, 0, 0), ConfigError, "Cost(macs=-1)"),
        ((0, math.inf, 0), NonFiniteArgumentError, "Cost(params=inf)"),
        ((0, 0, True), ArgumentTypeError, "Cost(bytes=True)"),
        ((0, 0, None), ArgumentTypeError, "Cost(bytes=None)"),
    ],
)
def test_cost_refuses_what_is_not_a_count(args, error, fragment):
    with pytest.raises(error) as info:
        ap.Cost(*args)
    assert fragment in one_line(info.value)
    assert isinstance(info.value, AdapruneError)


def test_cost_converts_numpy_scalars_and_counts_are_valid():
    cost = ap.Cost(np.int64(10), np.float32(2.5), 0)
    assert (cost.macs, cost.params, cost.bytes) == (10, 2.5, 0)
    assert type(cost.macs) is int and type(cost.params) is float
    counted = ap.count(mlp(), X)
    assert counted.macs > 0 and counted.params == 4 * 16 + 16 + 16 * 3 + 3
