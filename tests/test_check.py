"""``ap.check``: a deployed pruned model against its updated dense parent, on new data (issue 16).

The key behaviour on a real task (sklearn digits): a small CNN is pruned and fine-tuned, then its dense
parent is updated (fine-tuned on original and inverted digits). On the original digits the pruned model is
still within tolerance of the update; on the inverted digits it is not. A cut made deliberately harmful
(most of one layer) is ranked first among the groups that hurt.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ArgumentTypeError, ConfigError, NonFiniteError, PlanMismatchError
from adaprune.examples.digits import DigitsCNN, load_digits_data, train
from adaprune.plan import plan_from_choice
from adaprune.updates import DriftReport


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], params: list[nn.Parameter]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert list(model.parameters()) == params  # the same objects, in the same order
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def inverted(loader):
    return [(1 - x, y) for x, y in loader]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(one_thread_module):
    """One torch thread for the module (the first training step is several times slower with more)."""


@pytest.fixture(scope="module")
def digits():
    """v1 trained on digits; ``res``: v1 pruned (25% of every group) and fine-tuned; v2: v1 updated on
    original + inverted digits; tasks on the original and on the inverted digits."""
    torch.manual_seed(0)
    data = load_digits_data(0)
    v1 = DigitsCNN(8)
    train(v1, data, epochs=3, seed=0)
    small = copy.deepcopy(v1)
    res = ap.prune(small, data.x_train[:64], ratio=0.25, ignore=[small.fc])
    train(small, data, epochs=2, lr=1e-3, seed=1)
    mix = copy.deepcopy(data)
    mix.x_train, mix.y_train = torch.cat([data.x_train, 1 - data.x_train]), torch.cat([data.y_train, data.y_train])
    v2 = copy.deepcopy(v1)
    train(v2, mix, epochs=3, lr=1e-3, seed=2)
    orig = ap.ClassificationTask(data.loader("train"), data.loader("val"))
    inv = ap.ClassificationTask(inverted(data.loader("train")), inverted(data.loader("val")))
    return {"data": data, "v1": v1, "v2": v2, "res": res, "orig": orig, "inv": inv}


def test_drift_shows_on_the_shifted_data_and_not_on_the_original(digits) -> None:
    res, v2 = digits["res"], digits["v2"]
    same = ap.check(res, v2, digits["orig"], 0.05, ignore=[v2.fc])
    shifted = ap.check(res, v2, digits["inv"], 0.05, ignore=[v2.fc])
    assert isinstance(same, DriftReport)
    assert same.within and same.criteria[0].within, same.summary()
    assert same.criteria[0].interval is not None and same.criteria[0].judged == same.criteria[0].interval.high <= 0.05
    assert not shifted.within, shifted.summary()
    row = shifted.criteria[0]
    assert row.metric == "accuracy" and row.interval is not None and row.interval.low > 0.3  # far out, not noise
    assert row.dense > 0.8 and row.pruned < 0.5
    assert row.drop == pytest.approx(row.dense - row.pruned)
    assert row.interval.n == len(digits["data"].y_val)
    cut = {g.name: len(g.removed) for g in res.plan.groups if g.removed}
    assert shifted.removed == cut and {h.group for h in shifted.harms} == set(cut)
    assert not shifted.unmapped and not shifted.not_measured and not shifted.notes
    text = shifted.summary()
    assert "within tolerance: no" in text and "warm_start=plan" in text and shifted.harms[0].group in text
    assert "within tolerance: yes" in same.summary() and "warm_start" not in same.summary()


def test_harms_rank_a_deliberately_harmful_cut_first_and_leave_dense_bit_identical(digits) -> None:
    v1, v2, x = digits["v1"], digits["v2"], digits["data"].x_train[:64]
    graph = ap.trace(v1, x, ignore=[v1.fc])
    # one channel of every group, and 30 of the 32 channels of the last conv, which hurt least at 25%
    choice = {g.name: (0,) for g in graph.groups} | {"features.10": tuple(range(30))}
    plan = plan_from_choice(graph, choice)
    pruned = ap.apply_plan(copy.deepcopy(v1), plan, x)
    before, params = snapshot(v2), list(v2.parameters())
    with torch.no_grad():
        out = v2(x)
    report = ap.check(pruned, v2, digits["inv"], 0.02, plan=plan, example_inputs=x, ignore=[v2.fc])
    assert_unchanged(v2, before, params)
    with torch.no_grad():
        assert torch.equal(v2(x), out)
    assert report.harms[0].group == "features.10", report.summary()
    assert report.harms[0].removed == 30 and report.harms[0].size == 32
    harms = [h.harm for h in report.harms]
    assert harms == sorted(harms, reverse=True) and harms[0] > harms[1]
    # a group's harm is its cut alone, masked on the dense model: measured again by hand here
    group = report.harms[1].group
    handle = ap.mask(v2, plan_from_choice(ap.trace(v2, x, ignore=[v2.fc]), {group: choice[group]}))
    try:
        alone = digits["inv"].evaluate(v2)["accuracy"]
    finally:
        handle.undo()
    assert report.harms[1].drops["accuracy"] == pytest.approx(report.criteria[0].dense - alone)
    assert report.harms[1].harm == pytest.approx(report.harms[1].drops["accuracy"] / 0.02)
    assert "features.10 (30 of 32 channels" in report.summary()


class CrossEntropy(ap.Task):
    """Mean cross-entropy on fixed batches, lower is better, with per-example values."""

    metric, higher_is_better = "loss", False

    def __init__(self, batches) -> None:
        self.batches = batches

    def evaluate(self, model):
        return self.evaluate_examples(model)[0]

    def evaluate_examples(self, model):
        model.eval()
        with torch.no_grad():
            per = torch.cat([nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in self.batches])
        return {"loss": float(per.double().mean())}, per.double()


def test_a_lower_is_better_metric_drops_when_it_rises(digits) -> None:
    res, v2 = digits["res"], digits["v2"]
    task = CrossEntropy(inverted(digits["data"].loader("val")))
    report = ap.check(res, v2, task, 0.5, example_inputs=digits["data"].x_train[:8], ignore=[v2.fc])
    row = report.criteria[0]
    assert not row.higher_is_better and row.pruned > row.dense + 1.0
    assert row.drop == pytest.approx(row.pruned - row.dense) and row.interval is not None and row.interval.low > 0.5
    assert not report.within
    for h in report.harms:  # a loss rise is a positive drop
        masked = ap.mask(v2, plan_from_choice(ap.trace(v2, digits["data"].x_train[:8], ignore=[v2.fc]),
                                              {h.group: tuple(next(g.removed for g in res.plan.groups
                                                                   if g.name == h.group))}))
        try:
            loss = task.evaluate(v2)["loss"]
        finally:
            masked.undo()
        assert h.drops["loss"] == pytest.approx(loss - row.dense)
    # the pruned model against itself (a copy) as the dense parent: its plan cannot map onto the cut model
    with pytest.raises(ap.errors.PlanMismatchError, match="nothing of the plan maps"):
        ap.check(res, copy.deepcopy(res.model), task, 0.0, example_inputs=digits["data"].x_train[:8])


def test_multitask_criteria_keep_their_own_tolerances(digits) -> None:
    res, v2 = digits["res"], digits["v2"]
    both = ap.MultiTask({"orig": digits["orig"], "inv": digits["inv"]}, tolerance={"orig": 0.05, "inv": 0.4})
    report = ap.check(res, v2, both, 0.001, ignore=[v2.fc])
    rows = {r.name: r for r in report.criteria}
    assert set(rows) == {"orig", "inv"}
    assert rows["orig"].tolerance == 0.05 and rows["inv"].tolerance == 0.4
    assert rows["orig"].within and not rows["inv"].within and not report.within
    assert rows["inv"].metric == "inv/accuracy" and rows["inv"].interval is not None
    for h in report.harms:  # the worst over the tasks, each in units of its own tolerance
        assert set(h.drops) == {"orig", "inv"}
        assert h.harm == pytest.approx(max(h.drops["orig"] / 0.05, h.drops["inv"] / 0.4))
    assert "task 'inv' inv/accuracy drop" in report.summary()
    assert "| inv |" in report.markdown() and "| orig |" in report.markdown()


def test_a_plan_that_does_not_fully_map_is_listed(digits, tmp_path) -> None:
    res, v1 = digits["res"], digits["v1"]
    wider = copy.deepcopy(v1)  # the update widened the last conv: 32 -> 40 channels
    wider.features[10], wider.features[11], wider.fc = nn.Conv2d(16, 40, 3, padding=1), nn.BatchNorm2d(40), nn.Linear(40, 10)
    path = tmp_path / "plan.json"
    path.write_text(res.plan.to_json())
    report = ap.check(res.model, wider, digits["orig"], 0.05, plan=path, ignore=[wider.fc])
    assert report.unmapped and any("features.10.weight" in u and "from 32 to 40" in u for u in report.unmapped)
    assert "features.10" not in report.removed and {h.group for h in report.harms} == set(report.removed)
    assert report.removed == {g.name: len(g.removed) for g in res.plan.groups if g.removed and g.name != "features.10"}
    assert "not mapped onto the dense model" in report.summary() and "### Not mapped" in report.markdown()
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["unmapped"] == report.unmapped


def test_max_groups_measures_the_largest_cuts_and_names_the_rest(digits) -> None:
    res, v2 = digits["res"], digits["v2"]
    report = ap.check(res, v2, digits["orig"], 0.05, ignore=[v2.fc], max_groups=2)
    assert len(report.harms) == 2 and len(report.not_measured) == len(report.removed) - 2
    assert min(h.removed for h in report.harms) >= max(report.removed[g] for g in report.not_measured)
    assert "not measured (max_groups): 2 groups" in report.summary()
    assert ap.check(res, v2, digits["orig"], 0.05, ignore=[v2.fc], max_groups=0).harms == []


def test_a_plan_that_is_not_the_pruned_models_is_noted(digits) -> None:
    res, v2 = digits["res"], digits["v2"]
    graph = ap.trace(digits["v1"], digits["data"].x_train[:8], ignore=[digits["v1"].fc])
    other = plan_from_choice(graph, {"features.0": (0, 1, 2, 3)})
    report = ap.check(res.model, v2, digits["orig"], 0.05, plan=other, ignore=[v2.fc])
    assert report.notes and "does not fit the plan" in report.notes[0] and "features.0.weight" in report.notes[0]


def test_bert_mechanics_the_dense_model_is_left_as_it_was() -> None:
    transformers = pytest.importorskip("transformers")
    from adaprune.surgery.hf_config import UnsaveableConfigWarning

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    base = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}

    class Agreement(ap.Task):
        """Cosine of the model's token states with the dense model's (set by set_teacher); higher is better."""

        metric, higher_is_better = "agreement", True
        teacher: nn.Module | None = None

        def set_teacher(self, model):
            self.teacher = model
            with torch.no_grad():
                self.target = model(**x).last_hidden_state

        def evaluate(self, model):
            with torch.no_grad():
                out = model(**x).last_hidden_state
            return {"agreement": float(nn.functional.cosine_similarity(out, self.target, dim=-1).mean())}

    small = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsaveableConfigWarning)
        res = ap.prune(small, x, ratio=0.25, ignore=[small.pooler])
    dense = copy.deepcopy(base)  # the update: every weight moved a little
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.01 * torch.randn_like(p))
    task = Agreement()
    before, params = snapshot(dense), list(dense.parameters())
    report = ap.check(res, dense, task, 0.01, example_inputs=x, ignore=[dense.pooler])
    assert task.teacher is dense
    assert_unchanged(dense, before, params)
    cut = {g.name for g in res.plan.groups if g.removed}
    assert len(cut) == 4 and set(report.removed) == cut  # heads and FFN neurons of both layers
    assert {h.group for h in report.harms} == cut and all(math.isfinite(h.harm) and h.harm > 0 for h in report.harms)
    row = report.criteria[0]
    assert row.interval is None and row.judged == row.drop == pytest.approx(1.0 - row.pruned)
    assert row.dense == pytest.approx(1.0) and report.within == (row.drop <= 0.01)


def test_resnet18_max_groups_on_a_residual_network() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = tv.models.resnet18(num_classes=10).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    task = ap.ClassificationTask([(x, y)], [(x, y)])
    small = copy.deepcopy(base)
    res = ap.prune(small, x, ratio=0.3, ignore=[small.fc])
    before, params = snapshot(base), list(base.parameters())
    report = ap.check(res, base, task, 0.05, ignore=[base.fc], max_groups=3)
    assert_unchanged(base, before, params)
    assert not report.unmapped and report.removed == {g.name: len(g.removed) for g in res.plan.groups if g.removed}
    assert len(report.harms) == 3 and len(report.not_measured) == len(report.removed) - 3
    assert report.criteria[0].dense == pytest.approx(task.evaluate(base)["accuracy"])


class Scored(ap.Task):
    """A task whose metric is whatever ``score(model)`` says (for the error paths)."""

    metric, higher_is_better = "score", True

    def __init__(self, score, calibration=None) -> None:
        self.score, self._calibration = score, calibration

    def evaluate(self, model):
        return {"score": self.score(model)}

    def calibration(self):
        return self._calibration


class MetricLess:
    """A task protocol object without a metric."""

    higher_is_better = True

    def evaluate(self, model):
        return {"accuracy": 1.0}


def test_bad_inputs_are_typed_errors_naming_the_argument(digits) -> None:
    res, v2, x = digits["res"], digits["v2"], digits["data"].x_train[:8]
    task = digits["orig"]
    cases = [
        ((("model.pt", v2, task), {}), ArgumentTypeError, "pruned"),
        (((res, v2.state_dict(), task), {}), ArgumentTypeError, "dense"),
        (((res.model, v2, task), {}), ConfigError, "plan="),
        (((res, v2, MetricLess()), {}), ArgumentTypeError, "'metric'"),
        (((res, v2, task, 1.5), {}), ConfigError, "tolerance"),
        (((res, v2, task, -0.1), {}), ConfigError, "tolerance"),
        (((res, v2, task, "0.1"), {}), ArgumentTypeError, "tolerance"),
        (((res, v2, task), {"confidence": 1.0}), ConfigError, "confidence"),
        (((res, v2, task), {"max_groups": -1}), ConfigError, "max_groups"),
        (((res, v2, task), {"max_groups": 1.5}), ArgumentTypeError, "max_groups"),
        (((res, v2, task), {"plan": 3}), ArgumentTypeError, "plan"),
        (((res, res.model, task), {}), ConfigError, "same model"),
        (((res, v2, Scored(lambda m: 1.0)), {}), ConfigError, "example_inputs="),
    ]
    for (args, kwargs), error, fragment in cases:
        with pytest.raises(error) as info:
            ap.check(*args, **kwargs)
        assert fragment in str(info.value), (fragment, str(info.value))
    with pytest.raises(PlanMismatchError):  # a plan of another model: nothing maps
        ap.check(res.model, nn.Sequential(nn.Linear(64, 10)), task, plan=res.plan, example_inputs=torch.randn(2, 64))

    class NoMetric(ap.Task):
        metric, higher_is_better = "score", True

        def evaluate(self, model):
            return {"other": 1.0}

    with pytest.raises(ConfigError, match="without the metric 'score'"):
        ap.check(res, v2, NoMetric(), example_inputs=x)


def test_non_finite_metrics_and_a_failing_task_leave_the_dense_model_as_it_was(digits) -> None:
    res, v2, x = digits["res"], digits["v2"], digits["data"].x_train[:8]
    before, params = snapshot(v2), list(v2.parameters())
    with pytest.raises(NonFiniteError, match="dense model"):
        ap.check(res, v2, Scored(lambda m: math.nan if m is v2 else 1.0), example_inputs=x, ignore=[v2.fc])
    report = ap.check(res, v2, Scored(lambda m: 1.0 if m is v2 else math.nan), example_inputs=x, ignore=[v2.fc])
    assert not report.within and math.isnan(report.criteria[0].drop)
    assert "not within tolerance" in report.summary()
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["criteria"][0]["drop"] is None
    calls = []

    def score(model):  # fails while the second group is masked
        calls.append(model)
        if len(calls) == 4:
            raise RuntimeError("evaluation failed")
        return 0.5

    with pytest.raises(RuntimeError, match="evaluation failed"):
        ap.check(res, v2, Scored(score, [(x, None)]), ignore=[v2.fc])  # inputs from the calibration batches
    assert_unchanged(v2, before, params)
