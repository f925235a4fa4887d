"""The Task base class: a subclass with only ``evaluate`` is a complete task (no fine-tune steps asked or
counted, no calibration used); a protocol object (same methods, no subclassing) runs exactly like the
subclass; bad hooks get the same errors as before; the hooks are resolved once (``as_task``), never
probed by the controller."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.adapt import recovery as recovery_module
from adaprune.errors import ArgumentTypeError, ConfigError
from adaprune.examples.digits import DigitsCNN, load_digits_data, train
from adaprune.task import Task, TaskAdapter, as_task

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS: dict[str, Any] = {"finetune_steps": 3, "max_iterations": 4, "seed": 0}


@pytest.fixture(scope="module")
def digits():
    data = load_digits_data(0)
    torch.manual_seed(0)
    model = DigitsCNN(6)
    train(model, data, epochs=2, seed=0)
    return data, model


def _inner(data) -> ap.ClassificationTask:
    return ap.ClassificationTask(data.loader("train"), data.loader("val"), calibration_batches=2)


def _adapt(model: nn.Module, data, task: Any, **options: Any) -> ap.AdaptResult:
    return ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.6), tolerance=0.05, ignore=[model.fc],
                    **{**OPTIONS, **options})


def _history(res: ap.AdaptResult) -> list[tuple[Any, ...]]:
    return [(h.step, h.step_size, h.cuts, h.metrics, h.costs, h.accepted, h.reason, h.optimizer_steps)
            for h in res.history]


# -- a subclass with only evaluate ------------------------------------------------------------------
class EvaluateOnly(Task):
    metric, higher_is_better = "accuracy", True

    def __init__(self, inner: ap.ClassificationTask) -> None:
        self.inner = inner
        self.evaluations = 0

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.evaluations += 1
        return self.inner.evaluate(model)


def test_a_subclass_with_only_evaluate_runs_without_finetune_or_calibration(digits, monkeypatch):
    data, base = digits

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the controller used calibration batches the task does not have")

    monkeypatch.setattr(recovery_module, "recalibrate_bn", refuse)
    monkeypatch.setattr(recovery_module, "reconstruct", refuse)
    task = EvaluateOnly(_inner(data))
    assert not task.fine_tunes and task.calibration() is None
    assert as_task(task) is task  # a Task is used as it is
    model = copy.deepcopy(base)
    res = _adapt(model, data, task)
    assert res.history and task.evaluations > len(res.history)
    assert res.optimizer_steps == 0
    assert all(h.optimizer_steps == 0 for h in res.history)
    assert "optimizer steps: 0" in res.summary()


def test_no_calibration_means_data_driven_importance_is_refused(digits):
    data, base = digits
    with pytest.raises(ConfigError, match="calibration="):
        _adapt(copy.deepcopy(base), data, EvaluateOnly(_inner(data)), importance="taylor")


def test_the_defaults_are_no_ops():
    task = EvaluateOnly(_inner(load_digits_data(0)))
    net = DigitsCNN(4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert task.finetune(net, 5) is None and task.set_teacher(net) is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    assert torch.allclose(task.loss(net, x, y), nn.functional.cross_entropy(net(x), y))


def test_fine_tunes_follows_an_override():
    class Tuned(EvaluateOnly):
        def finetune(self, model: nn.Module, steps: int) -> None:
            pass

    data = load_digits_data(0)
    assert Tuned(_inner(data)).fine_tunes
    task = EvaluateOnly(_inner(data))
    task.finetune = lambda model, steps: None  # type: ignore[method-assign]  (an instance's own finetune)
    assert task.fine_tunes
    assert _inner(data).fine_tunes and isinstance(_inner(data), Task)


def test_task_needs_evaluate():
    class NoEvaluate(Task):
        metric, higher_is_better = "accuracy", True

    with pytest.raises(TypeError, match="evaluate"):
        NoEvaluate()  # type: ignore[abstract]


# -- protocol objects ------------------------------------------------------------------------------
class _Methods:
    """evaluate + finetune + calibration + set_teacher, recording every call."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, inner: ap.ClassificationTask) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Any]] = []

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.calls.append(("evaluate", None))
        return self.inner.evaluate(model)

    def finetune(self, model: nn.Module, steps: int) -> None:
        self.calls.append(("finetune", steps))
        self.inner.finetune(model, steps)

    def calibration(self) -> list[tuple[Any, Any]]:
        self.calls.append(("calibration", None))
        return self.inner.calibration()

    def set_teacher(self, model: nn.Module) -> None:
        self.calls.append(("set_teacher", None))


class Plain(_Methods):
    pass


class Subclass(_Methods, Task):
    pass


def test_a_protocol_object_runs_exactly_like_the_subclass(digits):
    data, base = digits
    results, calls, weights = [], [], []
    for cls in (Plain, Subclass):
        task = cls(_inner(data))
        model = copy.deepcopy(base)
        results.append(_adapt(model, data, task))
        calls.append(task.calls)
        weights.append(model.state_dict())
    plain, sub = results
    assert plain.history and any(h.accepted for h in plain.history)
    assert _history(plain) == _history(sub)
    assert plain.plan == sub.plan and plain.optimizer_steps == sub.optimizer_steps > 0
    assert plain.optimizer_steps == sum(steps for name, steps in calls[0] if name == "finetune")
    assert calls[0] == calls[1]
    assert [n for n, _ in calls[0]].count("set_teacher") == 1
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_adapter_delegates_present_hooks_and_defaults_missing_ones():
    class OnlyEvaluate:
        metric, higher_is_better = "score", False

        def evaluate(self, model: nn.Module) -> dict[str, float]:
            return {"score": 1.0}

    obj = OnlyEvaluate()
    task = as_task(obj)
    assert isinstance(task, TaskAdapter) and task.wrapped is obj
    assert (task.metric, task.higher_is_better) == ("score", False)
    assert not task.fine_tunes and task.calibration() is None and task.set_teacher(DigitsCNN(4)) is None
    assert task.evaluate(DigitsCNN(4)) == {"score": 1.0}
    assert as_task(task) is task  # wrapping is done once
    full = as_task(Plain(_inner(load_digits_data(0))))
    assert full.fine_tunes and full.calibration() is not None


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["evaluate", "finetune", "calibration", "set_teacher"])
@pytest.mark.parametrize("cls", [Plain, Subclass, ap.ClassificationTask])
def test_a_hook_that_is_not_callable_is_named(cls, hook):
    data = load_digits_data(0)
    task = cls(data.loader("train"), data.loader("val")) if cls is ap.ClassificationTask else cls(_inner(data))
    setattr(task, hook, 3)
    net = DigitsCNN(4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ArgumentTypeError) as info:
        ap.adapt(net, data.x_val[:1], task, ap.Budget(macs=0.5), ignore=[net.fc])
    assert str(info.value) == f"task.{hook} is an int; expected a method (see adaprune.Task)"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("missing", ["evaluate", "metric", "higher_is_better"])
def test_a_missing_required_attribute_is_named(missing):
    attrs: dict[str, Any] = {"metric": "accuracy", "higher_is_better": True, "evaluate": lambda self, m: {}}
    del attrs[missing]
    obj = type("Partial", (), attrs)()
    with pytest.raises(ArgumentTypeError, match=f"has no {missing!r}: a task needs evaluate"):
        as_task(obj)


@pytest.mark.parametrize(("attr", "value", "match"), [("metric", 3, "metric"),
                                                      ("higher_is_better", "yes", "higher_is_better")])
def test_metric_and_direction_are_checked_for_subclasses_too(attr, value, match):
    task = EvaluateOnly(_inner(load_digits_data(0)))
    setattr(task, attr, value)
    with pytest.raises(ArgumentTypeError, match=match):
        as_task(task)


def test_a_non_callable_loss_attribute_is_left_alone():
    class WithLossValue(Plain):
        loss = 0.25  # a number the task keeps, not a hook: accepted, as before

    task = as_task(WithLossValue(_inner(load_digits_data(0))))
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    net = DigitsCNN(4)
    assert torch.allclose(task.loss(net, x, y), nn.functional.cross_entropy(net(x), y))


# -- resolved once, never probed -------------------------------------------------------------------
class Recording(_Methods):
    """Records every lookup of a task attribute from outside; ``__getattr__`` answers any other name, so
    a ``hasattr`` probe would succeed (and be counted)."""

    NAMES = ("evaluate", "metric", "higher_is_better", "finetune", "calibration", "set_teacher", "evaluate_examples",
             "loss")

    def __init__(self, inner: ap.ClassificationTask) -> None:
        super().__init__(inner)
        self.looked_up: list[str] = []
        self.answered: list[str] = []  # names only __getattr__ had an answer for

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        self.calls.append(("evaluate", None))
        return self.inner.evaluate_examples(model)

    def __getattribute__(self, name: str) -> Any:
        if name in Recording.NAMES:
            object.__getattribute__(self, "looked_up").append(name)
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        object.__getattribute__(self, "answered").append(name)
        return lambda *args, **kwargs: None


def test_the_hooks_are_resolved_once_not_probed(digits):
    data, base = digits
    task = Recording(_inner(data))
    res = _adapt(copy.deepcopy(base), data, task)
    evaluations = sum(1 for name, _ in task.calls if name == "evaluate")
    assert evaluations > 3 and any(name == "finetune" for name, _ in task.calls) and res.optimizer_steps > 0
    # every attribute was looked up once, by as_task, although evaluate/finetune/calibration ran many times
    counts = {n: task.looked_up.count(n) for n in set(task.looked_up)}
    assert counts == dict.fromkeys(Recording.NAMES, 1), counts
    # the optional hooks and attributes it lacks; nothing else was probed
    assert task.answered == ["training_batches", "evaluate_part", "loss", "loss_tracks_metric", "lr"]
