"""``time_limit`` and ``max_evaluations``: checked before every step, they end the run with the last
accepted model and a message naming the limit; they are not run settings (a resumed run may take
others); both are validated.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.adapt import AdaptConfig, RunDir, check_resume
from adaprune.errors import ConfigError, NonFiniteError, RunDirError

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


class Fidelity(ap.Task):
    """Minus the MSE to the original outputs (deterministic: no fine-tuning); counts its evaluations and
    raises at the ``crash_at``-th (a killed run)."""

    metric, higher_is_better = "fidelity", True

    def __init__(self, reference: torch.Tensor, crash_at: int | None = None) -> None:
        self.reference, self.crash_at, self.calls = reference, crash_at, 0

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        with torch.no_grad():
            return {"fidelity": -float(nn.functional.mse_loss(model(X), self.reference))}


BASE = mlp()
with torch.no_grad():
    REFERENCE = BASE(X)
OPTIONS = {"tolerance": 0.002, "step": 0.3, "probe_ratio": 0.3}  # (a run with steps and roll backs)


def run(run_dir=None, resume=False, crash_at=None, **options):
    model = copy.deepcopy(BASE)
    task = Fidelity(REFERENCE, crash_at)
    res = ap.adapt(model, X[:2], task, ap.Budget(macs=0.3), run_dir=run_dir, resume=resume,
                   **{**OPTIONS, **options})
    return res, task


def state_of(run_dir) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def test_a_straight_run_takes_several_steps(tmp_path) -> None:
    """The premise of the tests below: without a limit, the run takes more evaluations than they allow."""
    res, task = run(tmp_path / "run")
    assert len([h for h in res.history if h.accepted]) >= 2 and any(not h.accepted for h in res.history)
    state = state_of(tmp_path / "run")
    assert state["evaluations"] == task.calls > 10
    assert state["stopped"] == res.stopped == ""


def test_max_evaluations_ends_the_run_with_the_last_accepted_model(tmp_path) -> None:
    res, task = run(tmp_path / "run", max_evaluations=10)
    state = state_of(tmp_path / "run")
    assert "max_evaluations=10" in res.message and "max_evaluations=10" in state["stopped"]
    assert state["done"] and not res.budget_met
    assert state["evaluations"] == task.calls >= 10
    assert res.stopped == state["stopped"] and res.evaluations == state["evaluations"]
    # the limit is checked before every step: the last step started below it
    straight, _ = run()
    assert len(res.history) < len(straight.history)
    assert [h.cuts for h in res.history] == [h.cuts for h in straight.history[: len(res.history)]]
    # the model is the last accepted step's
    accepted = [h for h in res.history if h.accepted]
    assert accepted
    assert res.after == accepted[-1].metrics
    assert res.costs_after == accepted[-1].costs
    assert Fidelity(REFERENCE).evaluate(res.model) == accepted[-1].metrics
    fresh = ap.apply_plan(copy.deepcopy(BASE), res.plan, X[:2])
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in res.model.parameters()]
    assert ap.count(res.model, X[:2]).macs == accepted[-1].costs["macs"]


def test_a_tiny_time_limit_ends_after_the_original_is_measured(tmp_path) -> None:
    res, task = run(tmp_path / "run", time_limit=1e-9)
    assert res.history == [] and task.calls == 1  # the original, then no step
    assert "time_limit" in res.message and "stopped" in res.message
    state = state_of(tmp_path / "run")
    assert state["stopped"].startswith("time_limit=") and state["done"] and res.stopped == state["stopped"]
    assert res.plan.is_empty
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), BASE.state_dict().values()))


def test_limits_are_not_run_settings(tmp_path) -> None:
    """A killed run resumed with other limits is accepted and ends as the straight run does."""
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        run(killed, crash_at=9, max_evaluations=1000, time_limit=3600.0)
    saved = state_of(killed)
    assert saved["step"] >= 1 and not saved["done"] and saved["evaluations"] > 0
    check_resume(RunDir(killed), copy.deepcopy(BASE), ap.Budget(macs=0.3), **OPTIONS, max_evaluations=5)
    resumed, task = run(killed, resume=True, time_limit=7200.0)
    straight, _ = run(tmp_path / "straight")
    assert resumed.plan.to_json() == straight.plan.to_json()
    assert [h.accepted for h in resumed.history] == [h.accepted for h in straight.history]
    # the evaluations go on counting from those the killed run had saved
    assert state_of(killed)["evaluations"] == saved["evaluations"] + task.calls
    # a setting that is one is still refused
    with pytest.raises(RunDirError, match="other settings"):
        run(killed, resume=True, step=0.2)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"max_evaluations": 0}, ConfigError, "max_evaluations"),
        ({"max_evaluations": -3}, ConfigError, "max_evaluations"),
        ({"max_evaluations": 2.5}, ConfigError, "max_evaluations"),
        ({"time_limit": -1}, ConfigError, "time_limit"),
        ({"time_limit": 0}, ConfigError, "time_limit"),
        ({"time_limit": float("nan")}, NonFiniteError, "time_limit"),
        ({"time_limit": "10"}, ConfigError, "time_limit"),
        ({"probe_budget": 0}, ConfigError, "probe_budget"),
        ({"confidence": 1.0}, ConfigError, "confidence"),
        ({"confidence": -0.1}, ConfigError, "confidence"),
    ],
)
def test_limits_and_new_options_are_validated(options, error, match) -> None:
    with pytest.raises(error, match=match):
        AdaptConfig(**options)
    model = copy.deepcopy(BASE)
    with pytest.raises(error, match=match):
        ap.adapt(model, X[:2], Fidelity(REFERENCE), ap.Budget(macs=0.3), **options)


def test_valid_limits_are_converted() -> None:
    import numpy as np

    cfg = AdaptConfig(max_evaluations=np.int64(7), time_limit=np.float32(1.5))
    assert cfg.max_evaluations == 7 and type(cfg.max_evaluations) is int
    assert cfg.time_limit == 1.5 and type(cfg.time_limit) is float
    assert AdaptConfig().max_evaluations is None and AdaptConfig().time_limit is None


def test_a_run_ended_by_a_limit_goes_on_when_resumed_without_it(tmp_path) -> None:
    stopped, _ = run(tmp_path / "run", max_evaluations=10)
    resumed, task = run(tmp_path / "run", resume=True)  # no limit now
    straight, _ = run()
    assert stopped.stopped and not resumed.stopped and task.calls > 0
    assert [h.cuts for h in resumed.history] == [h.cuts for h in straight.history]
    assert resumed.plan.to_json() == straight.plan.to_json()


def test_reaching_max_iterations_says_so() -> None:
    res, _ = run(max_iterations=1)
    assert "max_iterations=1" in res.message and "cannot shrink" not in res.message
