"""Every public entry point checks its arguments' types and ranges up front.

Each bad argument raises one exact :mod:`adaprune.errors` class whose one-line message names the
argument, stays short however large the value, and leaves the model exactly as it was. NumPy scalars
are accepted wherever a Python number is, and converted to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune._check import NonFiniteArgumentError
from adaprune.adapt import AdaptConfig
from adaprune.allocate import Limits
from adaprune.errors import ArgumentTypeError, ConfigError, NonFiniteError, UnknownNameError
from adaprune.importance import Context, get_importance
from small_nets import Net

NAN, INF = float("nan"), float("inf")
HUGE_LIST = list(range(10**6))
HUGE_STR = "x" * 10_000_000
TYPE, VALUE, NONFINITE, UNKNOWN = ArgumentTypeError, ConfigError, NonFiniteArgumentError, UnknownNameError


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 3])
BATCHES = [(X, Y), (X, Y)]


def state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, tuple[int, ...]]]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, tuple(p.shape)) for n, p in model.named_parameters()],
    )


def assert_same(model: nn.Module, before: Any) -> None:
    values, shapes = state(model)
    assert shapes == before[1]
    assert list(values) == list(before[0])
    for k, v in before[0].items():
        assert values[k].shape == v.shape and torch.equal(values[k], v), k


def expect(cls: type[Exception], call: Callable[[Net], Any], name: str) -> str:
    """``call(model)`` raises exactly ``cls``, naming ``name`` in one short line; the model is unchanged."""
    net = make_net()
    before = state(net)
    with pytest.raises(cls) as info:
        call(net)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    assert name in msg, msg
    assert len(msg) < 300 and "\n" not in msg, msg
    assert_same(net, before)
    return msg


def task(**kw: Any) -> ap.ClassificationTask:
    return ap.ClassificationTask(kw.pop("train", BATCHES), kw.pop("val", BATCHES), **kw)


# ---------------------------------------------------------------------------------------------
# AdaptConfig and adapt
# ---------------------------------------------------------------------------------------------
CONFIG_CASES = [
    ("tolerance", "x", TYPE), ("tolerance", True, TYPE), ("tolerance", NAN, NONFINITE),
    ("tolerance", INF, NONFINITE), ("tolerance", -0.5, VALUE), ("tolerance", HUGE_LIST, TYPE),
    ("finetune_steps", 2.5, TYPE), ("finetune_steps", True, TYPE), ("finetune_steps", -1, VALUE),
    ("seed", "a", TYPE), ("seed", NAN, TYPE), ("reconstruct", "yes", TYPE), ("reconstruct", 1, TYPE),
    ("importance", 3, TYPE), ("importance", HUGE_STR, UNKNOWN), ("importance", lambda m, g, c: {}, TYPE),
    ("step", NAN, NONFINITE), ("min_step", INF, NONFINITE), ("max_step", NAN, NONFINITE),
    ("grow", NAN, NONFINITE), ("grow", 0.5, VALUE), ("shrink", INF, NONFINITE), ("shrink", 1.0, VALUE),
    ("probe_ratio", NAN, NONFINITE), ("max_group_ratio", -INF, NONFINITE), ("min_width", NAN, NONFINITE),
    ("reconstruct_ridge", NAN, NONFINITE), ("reconstruct_ridge", "0.1", TYPE),
    ("max_iterations", 0, VALUE), ("max_iterations", 3.0, TYPE), ("latency_repeats", 0, VALUE),
    ("min_channels", 0, VALUE), ("round_to", HUGE_STR, TYPE), ("step", HUGE_STR, TYPE), ("seed", 2**40, VALUE),
    ("tolerance", 10**400, VALUE),
]


@pytest.mark.parametrize("field,value,cls", CONFIG_CASES)
def test_adapt_config_fields(field, value, cls):
    expect(cls, lambda net: AdaptConfig(**{field: value}), field)


@pytest.mark.parametrize("field,value,cls", [c for c in CONFIG_CASES if c[0] != "tolerance"][::3])
def test_adapt_options_go_through_the_config(field, value, cls):
    expect(cls, lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), **{field: value}), field)


def test_adapt_config_accepts_numpy_scalars():
    cfg = AdaptConfig(tolerance=np.float32(0.5), finetune_steps=np.int64(3), seed=np.int64(7),
                      reconstruct=np.bool_(False), step=np.float64(0.2), reconstruct_ridge=np.float16(0.5))
    assert (cfg.tolerance, cfg.finetune_steps, cfg.seed, cfg.reconstruct, cfg.step) == (0.5, 3, 7, False, 0.2)
    assert type(cfg.tolerance) is float and type(cfg.finetune_steps) is int and type(cfg.seed) is int
    assert type(cfg.reconstruct) is bool and type(cfg.reconstruct_ridge) is float


ADAPT_CASES = {
    "model-int": (TYPE, "model", lambda net: ap.adapt(3, X, task(), ap.Budget(macs=0.5))),
    "model-class": (TYPE, "model", lambda net: ap.adapt(Net, X, task(), ap.Budget(macs=0.5))),
    "inputs-none": (TYPE, "example_inputs", lambda net: ap.adapt(net, None, task(), ap.Budget(macs=0.5))),
    "task-object": (TYPE, "task", lambda net: ap.adapt(net, X, object(), ap.Budget(macs=0.5))),
    "task-metric": (TYPE, "metric", lambda net: ap.adapt(net, X, _with(task(), metric=3), ap.Budget(macs=0.5))),
    "task-evaluate": (TYPE, "evaluate", lambda net: ap.adapt(net, X, _with(task(), evaluate=1), ap.Budget(macs=0.5))),
    "budget-dict": (TYPE, "budget", lambda net: ap.adapt(net, X, task(), {"macs": 0.5})),
    "tolerance-str": (TYPE, "tolerance", lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), "x")),
    "tolerance-nan": (NONFINITE, "tolerance", lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), NAN)),
    "ignore-int": (TYPE, "ignore", lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), ignore=3)),
    "resume-str": (TYPE, "resume", lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), resume="yes")),
    "run_dir-int": (TYPE, "run_dir", lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), run_dir=3)),
    "unknown-option": (VALUE, "adapt", lambda net: ap.adapt(net, X, task(), ap.Budget(macs=0.5), **{"y" * 9999: 1})),
}


def _with(obj: Any, **attrs: Any) -> Any:
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


@pytest.mark.parametrize("case", list(ADAPT_CASES))
def test_adapt_arguments(case):
    cls, name, call = ADAPT_CASES[case]
    expect(cls, call, name)


def test_adapt_with_an_empty_train_loader_blames_the_train_loader():
    expect(VALUE, lambda net: ap.adapt(net, X, task(train=[]), ap.Budget(macs=0.5), finetune_steps=0),
           "train_loader yielded no batches")


# ---------------------------------------------------------------------------------------------
# Limits and Budget
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,cls,name", [
    ({"max_ratio": "x"}, TYPE, "max_ratio"), ({"max_ratio": NAN}, NONFINITE, "max_ratio"),
    ({"max_ratio": HUGE_LIST}, TYPE, "max_ratio"), ({"max_ratio": True}, TYPE, "max_ratio"),
    ({"min_channels": np.float32(2)}, TYPE, "min_channels"), ({"round_to": HUGE_STR}, TYPE, "round_to"),
])
def test_limits(kw, cls, name):
    expect(cls, lambda net: Limits(**kw), name)


def test_limits_accept_numpy():
    lim = Limits(max_ratio=np.float32(0.5), min_channels=np.int64(2), round_to=np.int32(4))
    assert (lim.max_ratio, lim.min_channels, lim.round_to) == (0.5, 2, 4)
    assert type(lim.max_ratio) is float and type(lim.min_channels) is int and type(lim.round_to) is int


@pytest.mark.parametrize("kw,cls,name", [
    ({"macs": "0.5"}, TYPE, "macs"), ({"macs": HUGE_LIST}, TYPE, "macs"), ({"params": NAN}, NONFINITE, "params"),
    ({"bytes": INF}, NONFINITE, "bytes"), ({"energy": -1}, VALUE, "energy"), ({"macs": 0.5, "backend": 3}, TYPE, "backend"),
    ({"macs": 0.5, "backend": HUGE_STR}, VALUE, "backend"), ({"macs": 0.5, "threads": 1.5}, TYPE, "threads"),
    ({"macs": 0.5, "threads": 0}, VALUE, "threads"), ({"macs": 0.5, "threads": True}, TYPE, "threads"),
])
def test_budget(kw, cls, name):
    expect(cls, lambda net: ap.Budget(**kw), name)


def test_budget_accepts_numpy():
    b = ap.Budget(macs=np.float32(0.5), params=np.int64(1000), threads=np.int64(2))
    assert (b.macs, b.params, b.threads) == (0.5, 1000, 2)
    assert type(b.macs) is float and type(b.threads) is int
    assert "np." not in repr(b)  # plain numbers (the run directory's config is compared by repr)


# ---------------------------------------------------------------------------------------------
# ClassificationTask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,cls,name", [
    ({"lr": INF}, NONFINITE, "lr"), ({"lr": 0.0}, VALUE, "lr"), ({"lr": HUGE_LIST}, TYPE, "lr"),
    ({"temperature": NAN}, NONFINITE, "temperature"), ({"alpha": "x"}, TYPE, "alpha"),
    ({"alpha": 1.5}, VALUE, "alpha"), ({"weight_decay": -1}, VALUE, "weight_decay"),
    ({"weight_decay": NAN}, NONFINITE, "weight_decay"), ({"calibration_batches": 0}, VALUE, "calibration_batches"),
    ({"calibration_batches": 2.0}, TYPE, "calibration_batches"), ({"distill": "yes"}, TYPE, "distill"),
    ({"train": 3}, TYPE, "train_loader"), ({"val": None}, TYPE, "val_loader"),
    ({"train": HUGE_STR}, TYPE, "train_loader"), ({"val": {"x": 1}}, TYPE, "val_loader"),
    ({"train": (b for b in BATCHES)}, TYPE, "train_loader"),
])
def test_classification_task_arguments(kw, cls, name):
    expect(cls, lambda net: task(**kw), name)


def test_classification_task_accepts_a_map_style_dataset():
    class Batches:  # indexable, without __iter__ (iterated by index until IndexError)
        def __getitem__(self, i):
            return BATCHES[i]

    t = task(train=Batches(), val=Batches())
    assert len(t.calibration()) == 2 and 0.0 <= t.evaluate(make_net())["accuracy"] <= 1.0


def test_classification_task_accepts_numpy():
    t = task(lr=np.float32(1e-3), alpha=np.float64(0.25), temperature=np.int64(2), calibration_batches=np.int64(1),
             distill=np.bool_(True))
    assert type(t.lr) is float and type(t.calibration_batches) is int and t.distill is True


def test_finetune_nan_loss_names_the_step_and_lr():
    bad = [(torch.full_like(X, NAN), Y)]
    msg = expect(NonFiniteError, lambda net: task(train=bad).finetune(net, 3), "step 0")
    assert "lr" in msg and "loss" in msg


@pytest.mark.parametrize("steps,cls", [("3", TYPE), (2.5, TYPE), (True, TYPE), (HUGE_LIST, TYPE)])
def test_finetune_steps(steps, cls):
    expect(cls, lambda net: task().finetune(net, steps), "steps")


def test_empty_train_loader_is_reported_by_finetune_and_calibration():
    expect(VALUE, lambda net: task(train=[]).finetune(net, 2), "train_loader yielded no batches")
    expect(VALUE, lambda net: task(train=[]).calibration(), "train_loader yielded no batches")


@pytest.mark.parametrize("val,where", [
    ([X], "batch 0"), ([(X, Y), (X, Y, Y)], "batch 1"), ([(X, torch.zeros(2, 3))], "batch 0"),
    ([(X, Y), (X, torch.tensor([0, 9]))], "batch 1"), ([(X, torch.tensor([0.5, 1.5]))], "batch 0"),
])
def test_evaluate_bad_batches_name_val_loader(val, where):
    msg = expect(VALUE, lambda net: task(val=val).evaluate(net), "val_loader")
    assert where in msg


def test_finetune_bad_batches_name_train_loader():
    msg = expect(VALUE, lambda net: task(train=[(X, torch.zeros(2, 3))]).finetune(net, 1), "train_loader")
    assert "batch 0" in msg


# ---------------------------------------------------------------------------------------------
# ignore
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore,cls", [
    (3, TYPE), ({"head": 1}, TYPE), (b"head", TYPE), (HUGE_LIST, TYPE), (HUGE_STR, VALUE), ("h", VALUE),
    ([HUGE_STR], VALUE), ([3], TYPE), (3.5, TYPE),
])
def test_bad_ignore(ignore, cls):
    expect(cls, lambda net: ap.prune(net, X, ratio=0.5, ignore=ignore), "ignore")
    expect(cls, lambda net: ap.trace(net, X, ignore=ignore), "ignore")


@pytest.mark.parametrize("which", ["name", "module", "generator"])
def test_ignore_one_name_or_one_module(which):
    net = make_net()
    ignore = {"name": "head", "module": net.head, "generator": (m for m in [net.head])}[which]
    res = ap.prune(net, X, ratio=0.5, ignore=ignore)
    assert net.head.out_features == 4 and not res.plan.is_empty


# ---------------------------------------------------------------------------------------------
# prune, plan_for, apply_plan, trace, count, mask
# ---------------------------------------------------------------------------------------------
def _crit(model, groups, ctx):
    return {g.name: torch.arange(g.size, dtype=torch.float64) for g in groups}


PRUNE_CASES = {
    "model-str": (TYPE, "model", lambda net: ap.prune("net", X, ratio=0.5)),
    "model-class": (TYPE, "model", lambda net: ap.prune(Net, X, ratio=0.5)),
    "model-state_dict": (TYPE, "model", lambda net: ap.prune(net.state_dict(), X, ratio=0.5)),
    "inputs-none": (TYPE, "example_inputs", lambda net: ap.prune(net, None, ratio=0.5)),
    "ratio-str": (TYPE, "ratio", lambda net: ap.prune(net, X, ratio="a")),
    "ratio-huge": (TYPE, "ratio", lambda net: ap.prune(net, X, ratio=HUGE_LIST)),
    "ratio-nan": (NONFINITE, "ratio", lambda net: ap.prune(net, X, ratio=NAN)),
    "ratio-one": (VALUE, "ratio", lambda net: ap.prune(net, X, ratio=1.0)),
    "importance-int": (TYPE, "importance", lambda net: ap.prune(net, X, importance=3)),
    "importance-huge": (UNKNOWN, "importance", lambda net: ap.prune(net, X, importance=HUGE_STR)),
    "allocation-int": (TYPE, "allocation", lambda net: ap.prune(net, X, allocation=3)),
    "allocation-huge": (UNKNOWN, "allocation", lambda net: ap.prune(net, X, allocation=HUGE_STR)),
    "budget-str": (TYPE, "budget", lambda net: ap.prune(net, X, budget="macs")),
    "calibration-int": (TYPE, "calibration", lambda net: ap.prune(net, X, calibration=3)),
    "calibration-str": (TYPE, "calibration", lambda net: ap.prune(net, X, calibration=HUGE_STR)),
    "loss-int": (TYPE, "loss", lambda net: ap.prune(net, X, loss=3)),
    "max_ratio-str": (TYPE, "max_ratio", lambda net: ap.prune(net, X, max_ratio="x")),
    "min_channels-float": (TYPE, "min_channels", lambda net: ap.prune(net, X, min_channels=2.5)),
    "refit-str": (TYPE, "refit", lambda net: ap.prune(net, X, refit="yes", calibration=BATCHES)),
    "plan_for-model": (TYPE, "model", lambda net: ap.planner.plan_for(3, ap.trace(net, X), ratio=0.5)),
    "plan_for-graph": (TYPE, "graph", lambda net: ap.planner.plan_for(net, "g", ratio=0.5)),
    "plan_for-ratio": (TYPE, "ratio", lambda net: ap.planner.plan_for(net, ap.trace(net, X), ratio="0.5")),
    "plan_for-importance": (TYPE, "importance", lambda net: ap.planner.plan_for(net, ap.trace(net, X), ratio=0.5,
                                                                             importance=[1])),
    "apply_plan-model": (TYPE, "model", lambda net: ap.apply_plan(3, ap.Plan())),
    "apply_plan-plan": (TYPE, "plan", lambda net: ap.apply_plan(net, {"removals": {}})),
    "apply_plan-plan-huge": (TYPE, "plan", lambda net: ap.apply_plan(net, HUGE_STR)),
    "apply_plan-result": (TYPE, "result.plan", lambda net: ap.apply_plan(net, ap.prune(make_net(), X))),
    "trace-model": (TYPE, "model", lambda net: ap.trace(3, X)),
    "trace-inputs": (TYPE, "example_inputs", lambda net: ap.trace(net, None)),
    "trace-swapped": (TYPE, "example_inputs", lambda net: ap.trace(net, net)),
    "trace-on_meta": (TYPE, "on_meta", lambda net: ap.trace(net, X, on_meta="yes")),
    "count-model": (TYPE, "model", lambda net: ap.count(HUGE_LIST, X)),
    "count-inputs": (TYPE, "example_inputs", lambda net: ap.count(net, None)),
    "mask-model": (TYPE, "model", lambda net: ap.mask(None, ap.Plan())),
    "mask-plan": (TYPE, "plan", lambda net: ap.mask(net, "plan.json")),
}


@pytest.mark.parametrize("case", list(PRUNE_CASES))
def test_entry_point_arguments(case):
    cls, name, call = PRUNE_CASES[case]
    expect(cls, call, name)


def test_prune_accepts_numpy():
    net = make_net()
    res = ap.prune(net, X, ratio=np.float32(0.5), max_ratio=np.float64(0.9), min_channels=np.int64(2),
                   round_to=np.int32(1), ignore=[net.head])
    assert res.ratio == 0.5 and type(res.ratio) is float and net.c1.out_channels == 8


# ---------------------------------------------------------------------------------------------
# sensitivity and sparsify
# ---------------------------------------------------------------------------------------------
def _metric(value):
    return lambda model: value


SENS_CASES = {
    "model": (TYPE, "model", lambda net: ap.sensitivity(3, X, _metric(1.0))),
    "inputs": (TYPE, "example_inputs", lambda net: ap.sensitivity(net, None, _metric(1.0))),
    "evaluate-int": (TYPE, "evaluate", lambda net: ap.sensitivity(net, X, 3)),
    "evaluate-returns-str": (TYPE, "evaluate", lambda net: ap.sensitivity(net, X, _metric("x"))),
    "evaluate-returns-huge": (TYPE, "evaluate", lambda net: ap.sensitivity(net, X, _metric(HUGE_LIST))),
    "evaluate-returns-nan": (NonFiniteError, "evaluate", lambda net: ap.sensitivity(net, X, _metric(NAN))),
    "evaluate-nan-when-masked": (NonFiniteError, "evaluate", lambda net: ap.sensitivity(
        net, X, _nan_after_first(), ignore=[net.head])),
    "ratios-float": (TYPE, "ratios", lambda net: ap.sensitivity(net, X, _metric(1.0), 0.5)),
    "ratios-huge": (VALUE, "ratios", lambda net: ap.sensitivity(net, X, _metric(1.0), HUGE_LIST)),
    "ratios-str": (TYPE, "ratios", lambda net: ap.sensitivity(net, X, _metric(1.0), ["a"])),
    "ratios-nan": (NONFINITE, "ratios", lambda net: ap.sensitivity(net, X, _metric(1.0), [NAN])),
    "importance": (TYPE, "importance", lambda net: ap.sensitivity(net, X, _metric(1.0), importance=2)),
    "cluster": (TYPE, "cluster", lambda net: ap.sensitivity(net, X, _metric(1.0), cluster="no")),
    "cache": (TYPE, "cache", lambda net: ap.sensitivity(net, X, _metric(1.0), cache=3)),
    "graph": (TYPE, "graph", lambda net: ap.sensitivity(net, X, _metric(1.0), graph="g")),
    "ignore": (TYPE, "ignore", lambda net: ap.sensitivity(net, X, _metric(1.0), ignore=3)),
    "sparsify-model": (TYPE, "model", lambda net: ap.sparsify(3, sparsity=0.5)),
    "sparsify-sparsity-str": (TYPE, "sparsity", lambda net: ap.sparsify(net, sparsity="0.5")),
    "sparsify-sparsity-nan": (NONFINITE, "sparsity", lambda net: ap.sparsify(net, sparsity=NAN)),
    "sparsify-sparsity-one": (VALUE, "sparsity", lambda net: ap.sparsify(net, sparsity=1.0)),
    "sparsify-pattern-int": (TYPE, "pattern", lambda net: ap.sparsify(net, pattern=3)),
    "sparsify-pattern-huge": (VALUE, "pattern", lambda net: ap.sparsify(net, pattern=HUGE_STR)),
    "sparsify-importance": (VALUE, "importance", lambda net: ap.sparsify(net, sparsity=0.5, importance=HUGE_STR)),
    "sparsify-importance-int": (TYPE, "importance", lambda net: ap.sparsify(net, sparsity=0.5, importance=3)),
    "sparsify-scope": (VALUE, "scope", lambda net: ap.sparsify(net, sparsity=0.5, scope="all")),
    "sparsify-ignore": (TYPE, "ignore", lambda net: ap.sparsify(net, sparsity=0.5, ignore=3)),
    "sparsify-calibration": (TYPE, "calibration", lambda net: ap.sparsify(net, sparsity=0.5, calibration=1)),
}


def _nan_after_first() -> Callable[[nn.Module], float]:
    calls: list[int] = []

    def evaluate(model: nn.Module) -> float:
        calls.append(1)
        return 1.0 if len(calls) == 1 else NAN  # the baseline is fine, a masked model gives NaN

    return evaluate


@pytest.mark.parametrize("case", list(SENS_CASES))
def test_sensitivity_and_sparsify_arguments(case):
    cls, name, call = SENS_CASES[case]
    expect(cls, call, name)


def test_sensitivity_accepts_numpy_metrics_and_ratios():
    net = make_net()
    res = ap.sensitivity(net, X, lambda m: np.float32(0.5), [np.float32(0.5)], ignore=[net.head])
    assert res.baseline == 0.5 and type(res.baseline) is float and all(r.ratio == 0.5 for r in res.rows)


# ---------------------------------------------------------------------------------------------
# importance criteria: the output of every criterion is checked; data criteria name the batch
# ---------------------------------------------------------------------------------------------
def _scores(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    def criterion(model, groups, ctx):
        return {g.name: fn(g) for g in groups}

    return criterion


CRITERION_CASES = {
    "too-few": (VALUE, _scores(lambda g: torch.ones(g.size - 1)), "expected"),
    "too-many": (VALUE, _scores(lambda g: torch.ones(g.size, 2)), "expected"),
    "list": (TYPE, _scores(lambda g: [1.0] * g.size), "tensor"),
    "nan": (NonFiniteError, _scores(lambda g: torch.full((g.size,), NAN)), "NaN"),
    "complex": (TYPE, _scores(lambda g: torch.ones(g.size, dtype=torch.complex64)), "dtype"),
    "missing": (VALUE, lambda model, groups, ctx: {}, "no scores"),
    "not-a-dict": (TYPE, lambda model, groups, ctx: HUGE_LIST, "dict"),
}


@pytest.mark.parametrize("case", list(CRITERION_CASES))
def test_custom_criterion_output_is_checked(case):
    cls, crit, what = CRITERION_CASES[case]
    msg = expect(cls, lambda net: ap.prune(net, X, ratio=0.5, importance=crit, ignore=[net.head]), "importance")
    assert what in msg and "criterion" in msg
    if case != "not-a-dict":
        assert "group" in msg


def test_too_few_scores_give_expected_and_got_sizes():
    msg = expect(VALUE, lambda net: ap.prune(net, X, ratio=0.5, importance=_scores(lambda g: torch.ones(3)),
                                             ignore=[net.head]), "expected 16")
    assert "got 3" in msg


def test_checked_criterion_wraps_the_callable():
    wrapped = get_importance(_crit)
    assert wrapped.__wrapped__ is _crit
    assert hasattr(get_importance("l2"), "score")  # attributes of the criterion are reachable


DATA = ["taylor", "activation", "apoz", "wanda"]


@pytest.mark.parametrize("name", DATA)
def test_data_criterion_inputs_the_model_cannot_run(name):
    calib = [(X, Y), (torch.randn(2, 5, 8, 8), Y)]
    msg = expect(VALUE, lambda net: ap.prune(net, X, ratio=0.5, importance=name, calibration=calib,
                                             ignore=[net.head]), "calibration")
    assert "batch 1" in msg and name in msg


@pytest.mark.parametrize("labels", [torch.zeros(2, 3, dtype=torch.long), torch.tensor([0.5, 0.2]), None,
                                    torch.tensor([0, 7])])
def test_taylor_labels_the_loss_cannot_take(labels):
    calib = [(X, Y), (X, labels)]
    msg = expect(VALUE, lambda net: ap.prune(net, X, ratio=0.5, importance="taylor", calibration=calib,
                                             ignore=[net.head]), "calibration")
    assert "batch 1" in msg and "taylor" in msg


@pytest.mark.parametrize("calib,cls", [(3, TYPE), ([X], VALUE), (HUGE_STR, TYPE)])
def test_context_calibration_must_be_batches(calib, cls):
    msg = expect(cls, lambda net: get_importance("activation")(net, ap.trace(net, X).groups,
                                                               Context(calib)), "calibration")
    assert "activation" in msg
