"""Noise-aware acceptance (:mod:`adaprune.adapt.noise`): a step is judged by the upper end of the paired
confidence interval of its metric drop, computed from the task's per-example values.

- the interval, the number of examples a tolerance needs and the checks of the per-example values, by hand;
- a task whose pruned models flip many examples both ways (point drop within the tolerance, interval
  far past it) gets no step accepted; with ``confidence=0`` the same steps are judged by the point drop;
- on a real task (digits, ClassificationTask's 0/1 correctness) every accepted step's interval ends
  within the tolerance, the history and the report show it;
- a validation set too small for the tolerance warns (SmallValidationWarning, also kept in state.json);
- a resumed run takes the original model's per-example values from the state and ends with the plan
  of a straight run.
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
from adaprune.adapt.noise import (
    SmallValidationWarning,
    check_examples,
    needed_examples,
    paired_interval,
    resolvable,
    z_value,
)
from adaprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

Z90 = 1.6448536269514722  # the two-sided 90% normal quantile


# -- the interval, by hand ---------------------------------------------------------------------

def test_z_value() -> None:
    assert z_value(0.9) == pytest.approx(Z90)
    assert z_value(0.95) == pytest.approx(1.959963984540054)
    assert z_value(0.0) == 0.0


def test_paired_interval_worked_example() -> None:
    """d = [1, 0, 1, 0, 0]: mean 0.4, sample variance 1.2 / 4 = 0.3, se = sqrt(0.3 / 5)."""
    original = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    pruned = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    iv = paired_interval(original, pruned, 1.0, 0.9)
    se = math.sqrt(0.3 / 5)
    assert iv.n == 5
    assert iv.drop == pytest.approx(0.4)
    assert iv.se == pytest.approx(se)
    assert iv.low == pytest.approx(0.4 - Z90 * se)
    assert iv.high == pytest.approx(0.4 + Z90 * se)
    assert "0.4000" in iv.describe() and "over 5 examples" in iv.describe()


def test_paired_interval_is_paired() -> None:
    """The same examples, shifted by the same amount everywhere: the drop is exact (se 0), however
    spread the values themselves are."""
    original = torch.tensor([0.1, 5.0, -3.0, 2.0], dtype=torch.float64)
    iv = paired_interval(original, original - 0.25, 1.0, 0.9)
    assert iv.drop == pytest.approx(0.25)
    assert iv.se == pytest.approx(0.0, abs=1e-12)
    assert iv.low == pytest.approx(0.25) and iv.high == pytest.approx(0.25)


def test_paired_interval_sign_for_lower_is_better() -> None:
    """A loss (lower is better) that rises by 1 on every example is a drop of +1 with sign -1."""
    original = torch.tensor([1.0, 2.0, 3.0])
    pruned = torch.tensor([2.0, 3.0, 4.5])
    iv = paired_interval(original, pruned, -1.0, 0.9)
    d = torch.tensor([1.0, 1.0, 1.5], dtype=torch.float64)
    se = float(d.std()) / math.sqrt(3)
    assert iv.drop == pytest.approx(float(d.mean()))
    assert iv.high == pytest.approx(float(d.mean()) + Z90 * se)
    # the same values read as higher-is-better: an improvement, a negative drop
    assert paired_interval(original, pruned, 1.0, 0.9).drop == pytest.approx(-float(d.mean()))


def test_paired_interval_of_one_example() -> None:
    iv = paired_interval(torch.tensor([1.0]), torch.tensor([0.0]), 1.0, 0.9)
    assert (iv.drop, iv.low, iv.high, iv.se, iv.n) == (1.0, 1.0, 1.0, 0.0, 1)


def test_zero_confidence_is_the_point_drop() -> None:
    iv = paired_interval(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]), 1.0, 0.0)
    assert iv.low == iv.high == iv.drop == pytest.approx(1 / 3)


def test_needed_examples() -> None:
    # n >= 2 z^2 spread / tolerance: 2 * 1.6449^2 / 0.02 = 270.55
    assert needed_examples(0.02, 1.0, 0.9) == 271
    assert needed_examples(0.01, 1.0, 0.9) == 542
    assert needed_examples(0.02, 0.5, 0.9) == 136  # spread halves, so do the examples needed
    assert needed_examples(0.0, 1.0, 0.9) == 0
    assert needed_examples(0.02, 0.0, 0.9) == 0


def test_resolvable() -> None:
    ok = torch.tensor([0.0, 1.0] * 136)[:271]
    assert resolvable(ok, 0.02, 0.9) == ""
    small = ok[:270]
    said = resolvable(small, 0.02, 0.9)
    assert "270 examples" in said and "271" in said and "tolerance=0.02" in said
    assert resolvable(torch.ones(5), 0.02, 0.9) == ""  # constant values: nothing to resolve
    assert resolvable(small, 0.02, 0.0) == ""  # no interval, nothing to resolve


def test_check_examples_accepts_and_converts() -> None:
    values = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float32)
    out = check_examples(values, 0.75, "accuracy", 4)
    assert out is not None and out.dtype == torch.float64 and out.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert check_examples(values, 0.75, "accuracy", None) is not None  # the original: any count
    assert check_examples(None, 0.75, "accuracy", 4) is None


@pytest.mark.parametrize(
    "values, metric, expected, match",
    [
        (torch.tensor([1.0, 0.0, 1.0]), 2 / 3, 4, "3 per-example values, the original model had 4"),
        (torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5, 4, "mean of the per-example values"),
        (torch.tensor([1.0, math.nan, 1.0, 1.0]), 0.75, 4, "non-finite"),
        (torch.tensor([1.0, math.inf, 1.0, 1.0]), 0.75, 4, "non-finite"),
        (torch.ones(2, 2), 1.0, 4, "1-D"),
        (torch.tensor(1.0), 1.0, 1, "1-D"),
        (torch.zeros(0), 0.0, None, "non-empty"),
        ([1.0, 0.0], 0.5, 2, "1-D tensor"),
    ],
)
def test_check_examples_refuses(values: object, metric: float, expected: int | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_examples(values, metric, "accuracy", expected)


# -- a noisy task: the point drop is small, the interval is wide -----------------------------------

def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Flipping(ap.Task):
    """Per-example 0/1 values that do not depend on the weights: the model with all its parameters
    (the original, and every probe, which masks without removing) gets ``base``; any pruned model gets
    ``base`` with ``down`` right examples made wrong and ``up`` wrong ones made right, a point drop of
    ``(down - up) / n`` with a wide paired interval when both are large."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, full: int, n: int = 400, down: int = 40, up: int = 38) -> None:
        self.full = full
        g = torch.Generator().manual_seed(0)
        self.base = (torch.rand(n, generator=g) < 0.5).double()
        right, wrong = self.base.nonzero().flatten(), (self.base == 0).nonzero().flatten()
        self.pruned = self.base.clone()
        self.pruned[right[:down]] = 0.0
        self.pruned[wrong[:up]] = 1.0
        self.point = (down - up) / n

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        values = self.base if n_params(model) == self.full else self.pruned
        return {"accuracy": float(values.mean())}, values.clone()


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))


def test_a_step_whose_interval_passes_the_tolerance_is_rolled_back() -> None:
    """The point drop (0.005) is well within the tolerance (0.02); the interval's upper end is not: a
    controller that judged the point drop would accept every one of these steps."""
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    task = Flipping(n_params(model))
    iv = paired_interval(task.base, task.pruned, 1.0, 0.9)
    assert task.point <= 0.02 < iv.high  # the premise
    res = ap.adapt(model, X, task, ap.Budget(macs=0.5), tolerance=0.02, max_iterations=3)
    assert len(res.history) == 3
    for h in res.history:
        assert h.cuts and not h.accepted, h.reason
        assert res.before["accuracy"] - h.metrics["accuracy"] == pytest.approx(task.point)  # within tolerance
        assert h.interval == pytest.approx([iv.low, iv.high])
        assert "exceeds tolerance" in h.reason and "over 400 examples" in h.reason
    assert not res.budget_met and res.plan.is_empty
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_confidence_zero_judges_the_point_drop() -> None:
    """``confidence=0``: the same steps are judged by their point drop and accepted; the interval is
    still recorded, as the point drop at both ends."""
    model = mlp()
    task = Flipping(n_params(model))
    res = ap.adapt(model, X, task, ap.Budget(macs=0.5), tolerance=0.02, max_iterations=3, confidence=0.0)
    accepted = [h for h in res.history if h.accepted]
    assert accepted
    for h in accepted:
        assert h.interval == pytest.approx([task.point, task.point])
        assert "within tolerance" in h.reason


# -- a real task: digits, ClassificationTask's per-example correctness ---------------------------------

@pytest.fixture(scope="module")
def digits():
    from adaprune.examples.digits import load_digits_data

    data = load_digits_data(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            for xb, yb in data.loader("train", shuffle=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return data, model.eval()


class Crashing(ap.ClassificationTask):
    """A ClassificationTask that raises at its ``crash_at``-th evaluation (a killed run)."""

    def __init__(self, data, crash_at: int | None = None) -> None:
        super().__init__(data.loader("train", shuffle=True), data.loader("val"))
        self.calls, self.crash_at = 0, crash_at

    def evaluate_examples(self, model):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        return super().evaluate_examples(model)


def adapt_digits(digits, run_dir=None, resume=False, crash_at=None, **options):
    data, base = digits
    model = copy.deepcopy(base)
    options = {"tolerance": 0.03, "finetune_steps": 5, **options}
    return ap.adapt(model, data.x_val[:1], Crashing(data, crash_at), ap.Budget(macs=0.4), ignore=[model[5]],
                    run_dir=run_dir, resume=resume, **options)


def test_every_accepted_step_has_its_interval_within_the_tolerance(digits, tmp_path) -> None:
    from adaprune import report
    from adaprune.report.render import steps_table

    res = adapt_digits(digits, run_dir=tmp_path / "run")
    assert any(h.accepted for h in res.history) and any(not h.accepted for h in res.history)
    for h in res.history:
        assert h.interval is not None and len(h.interval) == 2
        low, high = h.interval
        point = res.before["accuracy"] - h.metrics["accuracy"]
        assert low <= point + 1e-12 <= high + 2e-12
        assert (high <= 0.03 + 1e-12) == h.accepted, h.reason
    # the state file and the report keep the intervals
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert [s["interval"] for s in state["history"]] == [h.interval for h in res.history]
    data = report.build(res, tolerance=0.03)
    assert [h["interval"] for h in data["history"]] == [h.interval for h in res.history]
    head, rows = steps_table(data)
    column = head.index("drop [interval]")
    for h, row in zip(res.history, rows):
        assert f"[{h.interval[0]:+.4f}, {h.interval[1]:+.4f}]" in row[column]


def test_a_resumed_run_takes_the_original_values_from_the_state(digits, tmp_path) -> None:
    """A run killed mid-way and resumed ends with the plan (and the intervals) of a straight run: the
    original model's per-example values come from state.json, not from evaluating it again."""
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        adapt_digits(digits, run_dir=killed, crash_at=14)
    state = json.loads((killed / "state.json").read_text())
    assert state["step"] >= 2 and not state["done"]
    assert len(state["baseline_examples"]) == len(digits[0].y_val)
    resumed = adapt_digits(digits, run_dir=killed, resume=True)
    straight = adapt_digits(digits, run_dir=tmp_path / "straight")
    assert resumed.plan.to_json() == straight.plan.to_json()
    assert [h.accepted for h in resumed.history] == [h.accepted for h in straight.history]
    assert all(h.interval is not None for h in resumed.history)
    assert [h.interval for h in resumed.history] == [h.interval for h in straight.history]
    assert resumed.after == straight.after


# -- too few validation examples ----------------------------------------------------------------------

def test_a_small_validation_set_warns_and_the_state_keeps_it(tmp_path) -> None:
    model = mlp()
    task = Flipping(n_params(model), n=20, down=1, up=0)  # 20 examples cannot resolve 0.01 (542 needed)
    with pytest.warns(SmallValidationWarning, match="20 examples") as caught:
        res = ap.adapt(model, X, task, ap.Budget(macs=0.5), tolerance=0.01, max_iterations=1, run_dir=tmp_path / "run")
    said = [str(w.message) for w in caught if issubclass(w.category, SmallValidationWarning)]
    assert len(said) == 1 and "542" in said[0]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["warnings"] == said == res.warnings
    assert f"warning: {said[0]}" in res.summary()


@pytest.mark.parametrize("n, tolerance, confidence", [(400, 0.02, 0.9), (20, 0.01, 0.0)])
def test_no_warning_when_the_set_resolves_the_tolerance_or_without_an_interval(
        tmp_path, n: int, tolerance: float, confidence: float) -> None:
    model = mlp()
    task = Flipping(n_params(model), n=n, down=1, up=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallValidationWarning)
        ap.adapt(model, X, task, ap.Budget(macs=0.5), tolerance=tolerance, max_iterations=1,
                 confidence=confidence, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "state.json").read_text())["warnings"] == []


def test_per_example_values_that_are_not_the_metric_are_refused() -> None:
    class Wrong(Flipping):
        def evaluate_examples(self, model):
            metrics, values = super().evaluate_examples(model)
            return {"accuracy": metrics["accuracy"] + 0.1}, values

    model = mlp()
    with pytest.raises(ConfigError, match="mean of the per-example values"):
        ap.adapt(model, X, Wrong(n_params(model)), ap.Budget(macs=0.5), tolerance=0.02, max_iterations=1)


def test_the_small_validation_warning_points_at_the_adapt_call() -> None:
    model = mlp()
    with pytest.warns(SmallValidationWarning) as caught:
        ap.adapt(model, X, Flipping(n_params(model), n=20, down=1, up=0), ap.Budget(macs=0.5), tolerance=0.01,
                 max_iterations=1)
    assert [w.filename for w in caught if w.category is SmallValidationWarning] == [__file__]
