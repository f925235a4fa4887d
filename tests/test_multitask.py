"""``ap.MultiTask``: one model judged by several tasks, each with its own tolerance and direction.

On a two-head digits network (classification: accuracy, higher is better; a regression target derived
from the image: MSE, lower is better):

- multi-task adapt keeps BOTH tasks within their tolerances, where adapt guided by the classification
  task alone ruins the regression (fails if the MultiTask judged only its first task);
- every accepted step is within every task's tolerance, in each metric's own direction, and a
  rollback names the task that caused it;
- a task without a tolerance, a tolerance or weight for no task, a bad name: clear ConfigErrors;
- per-task importance is normalised per task before it is combined (a task's loss scale does not
  decide), ``combine="max"`` keeps what any task needs;
- a killed multi-task run resumes to the same plan.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

import adaprune as ap
from adaprune.errors import ConfigError, RunDirError
from adaprune.examples.multihead import HeadTask, tasks, trained
from adaprune.multitask import task_scores

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"digit": 0.03, "ink": 0.05}


@pytest.fixture(scope="module")
def base() -> tuple[torch.nn.Module, dict[str, Any]]:
    return trained(0)


def drops(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each task's drop in its own direction (accuracy falling, MSE rising: positive)."""
    return {"digit": before["digit/accuracy"] - after["digit/accuracy"], "ink": after["ink/mse"] - before["ink/mse"]}


def test_multitask_adapt_keeps_every_task_where_single_task_adapt_breaks_the_other(base) -> None:
    model, data = base
    x = data["xv"][:1]
    multi = copy.deepcopy(model)
    res = ap.adapt(multi, x, ap.MultiTask(tasks(data), TOL), ap.Budget(macs=0.5), finetune_steps=20, max_iterations=12)
    assert res.costs_after["macs"] < 0.6 * res.costs_before["macs"]
    assert set(res.after) >= {"digit/accuracy", "ink/mse"}
    assert all(d <= TOL[n] for n, d in drops(res.before, res.after).items()), (res.before, res.after)
    for h in res.history:  # every accepted step within every task's tolerance, each in its own direction
        if h.accepted:
            assert all(d <= TOL[n] + 1e-9 for n, d in drops(res.before, h.metrics).items()), h.reason
    assert any(not h.accepted and "task 'ink'" in h.reason and "exceeds tolerance 0.05" in h.reason for h in res.history)
    assert all("task 'digit'" in h.reason and "task 'ink'" in h.reason for h in res.history if h.accepted)

    single = copy.deepcopy(model)
    only = tasks(data)
    ap.adapt(single, x, only["digit"], ap.Budget(macs=0.5), tolerance=TOL["digit"], finetune_steps=20, max_iterations=12)
    check = tasks(data)
    ink_single = check["ink"].evaluate(single)["mse"] - check["ink"].evaluate(model)["mse"]
    assert ink_single > 5 * TOL["ink"], ink_single  # guided by one task, the other is ruined


def test_bad_tolerances_weights_and_names_are_named(base) -> None:
    _, data = base
    t = tasks(data)
    with pytest.raises(ConfigError, match="task 'ink' has no tolerance"):
        ap.MultiTask(t, {"digit": 0.01})
    with pytest.raises(ConfigError, match="tolerance names 'depth'"):
        ap.MultiTask(t, {**TOL, "depth": 0.1})
    with pytest.raises(ConfigError, match="weights must be > 0"):
        ap.MultiTask(t, TOL, weights={"ink": 0.0})
    with pytest.raises(ConfigError, match="without '/'"):
        ap.MultiTask({"a/b": t["digit"]}, {"a/b": 0.1})
    with pytest.raises(ConfigError, match="combine"):
        ap.MultiTask(t, TOL, combine="mean")
    with pytest.raises(ConfigError, match=r"tolerance\['ink'\]"):
        ap.MultiTask(t, {"digit": 0.01, "ink": -1.0})
    with pytest.raises(ConfigError, match=r"losses\['ink'\] is 'mse'; expected a function"):
        ap.MultiTask(t, TOL, losses={"ink": "mse"})
    with pytest.raises(ConfigError, match="task 'digit' of the MultiTask has no evaluate_part"):
        ap.adapt(copy.deepcopy(base[0]), data["xv"][:1], ap.MultiTask(t, TOL), ap.Budget(macs=0.5),
                 ignore=["cls", "reg.2"], probe_data=0.5)
    mt = ap.MultiTask(t, TOL)
    assert mt.metric == "digit/accuracy" and mt.higher_is_better
    assert [(c.name, c.metric, c.higher_is_better, c.tolerance) for c in mt.criteria()] == \
        [("digit", "digit/accuracy", True, 0.03), ("ink", "ink/mse", False, 0.05)]


def test_importance_is_normalised_per_task_then_combined(base) -> None:
    model, data = base
    graph = ap.trace(model, data["xv"][:1], ignore=["cls", "reg.2"])

    class Scaled(HeadTask):  # the same task with its loss 1000x larger
        def loss_fn(self, output: Any, y: torch.Tensor) -> torch.Tensor:
            return 1000.0 * super().loss_fn(output, y)

    t = tasks(data)
    big = Scaled("reg", data["x"], data["t"], data["xv"], data["tv"])
    plain = task_scores(ap.MultiTask(t, TOL), "taylor", model, graph.groups, ap.importance.default_loss)
    scaled = task_scores(ap.MultiTask({"digit": t["digit"], "ink": big}, TOL), "taylor", model, graph.groups,
                         ap.importance.default_loss)
    for g in plain:
        torch.testing.assert_close(plain[g], scaled[g], rtol=1e-4, atol=1e-7)
    one = {n: task_scores(task, "taylor", model, graph.groups, task.loss_fn) for n, task in t.items()}
    biggest = task_scores(ap.MultiTask(t, TOL, combine="max"), "taylor", model, graph.groups, ap.importance.default_loss)
    for n, scores in one.items():
        scale = float(torch.cat([s.reshape(-1) for s in scores.values()]).abs().mean())
        for g in scores:
            assert bool((biggest[g] >= scores[g] / scale - 1e-6).all()), (n, g)


def test_a_killed_multitask_run_resumes_to_the_same_plan(base, tmp_path) -> None:
    model, data = base
    x = data["xv"][:1]
    options: dict[str, Any] = {"finetune_steps": 10, "max_iterations": 6}
    reference = ap.adapt(copy.deepcopy(model), x, ap.MultiTask(tasks(data), TOL), ap.Budget(macs=0.6),
                         run_dir=tmp_path / "ref", **options)

    class Stop(ap.MultiTask):
        calls = 0

        def evaluate_criteria(self, m: torch.nn.Module) -> Any:
            type(self).calls += 1
            if type(self).calls == 8:
                raise KeyboardInterrupt
            return super().evaluate_criteria(m)

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        ap.adapt(copy.deepcopy(model), x, Stop(tasks(data), TOL), ap.Budget(macs=0.6), run_dir=run_dir, **options)
    from adaprune.errors import RunDirError

    for other in (ap.MultiTask(tasks(data), {**TOL, "ink": 5.0}), tasks(data)["digit"]):  # another judge: refused
        with pytest.raises(RunDirError, match="tasks differ"):
            ap.adapt(copy.deepcopy(model), x, other, ap.Budget(macs=0.6), run_dir=run_dir, resume=True, **options)
    resumed = ap.adapt(copy.deepcopy(model), x, ap.MultiTask(tasks(data), TOL), ap.Budget(macs=0.6), run_dir=run_dir,
                       resume=True, **options)
    assert resumed.plan.to_dict() == reference.plan.to_dict()
    assert [h.reason for h in resumed.history] == [h.reason for h in reference.history]


def test_a_head_is_scored_by_its_own_task_only(base) -> None:
    model, data = base
    graph = ap.trace(model, data["xv"][:1], ignore=["cls", "reg.2"])
    t = tasks(data)
    heads = {"digit": ["cls"], "ink": ["reg"]}
    own = ap.MultiTask(t, TOL, heads=heads)
    shared = ap.MultiTask(t, TOL)
    from adaprune.multitask import head_owners

    owners = head_owners(own, model, graph.groups)
    head = [g for g, n in owners.items() if n == "ink"]
    assert head and all(g not in owners for g in (x.name for x in graph.groups) if g not in head)  # the trunk: shared
    with_heads = task_scores(own, "activation", model, graph.groups, ap.importance.default_loss)
    without = task_scores(shared, "activation", model, graph.groups, ap.importance.default_loss)
    ink_only = task_scores(t["ink"], "activation", model, graph.groups, ap.importance.default_loss)
    scale = float(torch.cat([s.reshape(-1) for s in ink_only.values()]).abs().mean())
    for g in head:  # the digit task's inputs flow through the ink head too: without heads= they count
        torch.testing.assert_close(with_heads[g], (ink_only[g] / scale).float())
        assert not torch.allclose(without[g], with_heads[g])
    with pytest.raises(ConfigError, match="heads\\['ink'\\] names 'regression'"):
        task_scores(ap.MultiTask(t, TOL, heads={"ink": ["regression"]}), "activation", model, graph.groups,
                    ap.importance.default_loss)
    for overlap in ({"digit": ["cls", "reg"], "ink": ["reg"]}, {"digit": ["reg.0"], "ink": ["reg"]}):
        with pytest.raises(ConfigError, match="in the head of task 'digit' .* in that of task 'ink'"):
            ap.MultiTask(t, TOL, heads=overlap)
    for fine in ({"digit": ["cls", "cls"], "ink": "reg"}, {"digit": ["reg2"], "ink": ["reg"]},
                 {"digit": ["cls", "cls.0"], "ink": ["reg"]}):  # within one task, or a name that only starts alike
        ap.MultiTask(t, TOL, heads=fine)


def test_refits_scores_and_fine_tuning_heed_every_task(base) -> None:
    """A refit that ruins one task is dropped though another gained; a head whose task has no calibration
    batches is still scored (by the others); a task that fine-tunes but has no training batches is named when
    the MultiTask is asked to fine-tune, and tasks that only evaluate are asked for no steps."""
    from adaprune.adapt.controller import AdaptConfig, Controller

    model, data = base
    mt = ap.MultiTask(tasks(data), TOL)
    c = Controller(model, data["xv"][:1], mt, ap.Budget(macs=0.5), AdaptConfig(confidence=0.0), [], None)
    plain = ({"digit/accuracy": 0.900, "ink/mse": 0.01}, {})
    assert c.worse(({"digit/accuracy": 0.901, "ink/mse": 5.0}, {}), plain)  # ink ruined: the refit is worse
    assert not c.worse(({"digit/accuracy": 0.901, "ink/mse": 0.009}, {}), plain)

    class NoBatches(HeadTask):
        def calibration(self) -> None:  # type: ignore[override]
            return None

        def training_batches(self) -> None:  # type: ignore[override]
            return None

    t = tasks(data)
    blind = NoBatches("reg", data["x"], data["t"], data["xv"], data["tv"])
    graph = ap.trace(model, data["xv"][:1], ignore=["cls", "reg.2"])
    scores = task_scores(ap.MultiTask({"digit": t["digit"], "ink": blind}, TOL, heads={"ink": ["reg"]}), "taylor",
                         model, graph.groups, ap.importance.default_loss)
    assert set(scores) == {g.name for g in graph.groups}
    assert ap.MultiTask(t, TOL).fine_tunes
    mixed = ap.MultiTask({"digit": t["digit"], "ink": blind}, TOL)
    assert mixed.fine_tunes  # 'ink' fine-tunes on its own but has no batches: named, not skipped in silence
    work = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="task 'ink' has no training batches"):
        ap.adapt(work, data["xv"][:1], mixed, ap.Budget(macs=0.5), ignore=["cls", "reg.2"], finetune_steps=5,
                 max_iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(work.state_dict().values(), model.state_dict().values()))

    class Judge:  # evaluates only: a MultiTask of such tasks takes no fine-tuning steps
        metric, higher_is_better = "mse", False

        def evaluate(self, m: torch.nn.Module) -> dict[str, float]:
            return blind.evaluate(m)

    assert not ap.MultiTask({"a": Judge(), "b": Judge()}, {"a": 1.0, "b": 1.0}).fine_tunes


def test_fine_tuning_rate_defaults_to_the_smallest_of_the_tasks_own(base) -> None:
    """Protocol tasks (not Task subclasses) are wrapped: their own ``lr`` still sets the default rate, and
    ``finetune`` steps at it (an Adam step moves a weight by about ``lr``)."""
    model, data = base
    t = tasks(data)
    t["digit"].lr, t["ink"].lr = 3e-4, np.float32(1e-5)  # (a NumPy scalar is a rate too)
    mt = ap.MultiTask(t, TOL)
    assert mt.lr == pytest.approx(1e-5)
    assert ap.MultiTask(t, TOL, lr=2e-3).lr == pytest.approx(2e-3)
    work = copy.deepcopy(model)
    mt.finetune(work, 1)
    moved = max(float((a - b).abs().max()) for a, b in zip(work.parameters(), model.parameters()))
    assert 0 < moved <= 1.5e-5


def test_a_step_draws_calibration_batches_once_for_scores_and_estimate(monkeypatch) -> None:
    """A shuffling loader gives other batches on every call: the step's importance scores and its
    first-order estimate must be computed on the same draw (one call of ``calibration()``)."""
    import importlib

    from adaprune.examples.digits import DigitsCNN, load_digits_data, train

    ctl = importlib.import_module("adaprune.adapt.controller")  # (adaprune.adapt is also the function)

    torch.manual_seed(0)
    data = load_digits_data(0)
    model = DigitsCNN(8)
    train(model, data, epochs=1, seed=0)
    seen: list[Any] = []
    real = ctl.task_scores

    def spy(task: Any, importance: Any, work: Any, groups: Any, loss: Any, batches: Any = None) -> Any:
        seen.append((importance, batches))
        return real(task, importance, work, groups, loss, batches)

    monkeypatch.setattr(ctl, "task_scores", spy)
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))
    ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.7), tolerance=0.5, ignore=[model.fc], max_iterations=1,
             probe_budget=2, reprobe=2, finetune_steps=0)
    assert [imp for imp, _ in seen] == ["l2", "taylor"], seen
    assert seen[0][1] is not None and seen[0][1] is seen[1][1]  # one draw, shared


def test_a_ladder_of_a_multitask_sizes_every_rung_to_its_budget(base) -> None:
    """The ladder's allocation runs are not judged; a MultiTask's own (tight) tolerances must not judge them
    either, or the rungs stop short of their budgets."""
    model, data = base
    tight = ap.MultiTask(tasks(data), {"digit": 0.001, "ink": 0.0001})
    lad = ap.ladder(copy.deepcopy(model), data["xv"][:1], tight, [ap.Budget(macs=0.5), ap.Budget(macs=0.25)],
                    ignore=["cls", "reg.2"])
    assert [r.budget_met for r in lad.rungs] == [True, True, True]


def test_a_multitask_ladders_rungs_are_judged_by_every_tasks_own_tolerance(base, tmp_path) -> None:
    """A rung's ``drop`` is the first task's, but ``within_tolerance`` asks every task: a rung that keeps the
    digit within its loose tolerance and ruins the ink regression is not within tolerance."""
    model, data = base
    mt = ap.MultiTask(tasks(data), {"digit": 0.5, "ink": 0.01})
    lad = ap.ladder(copy.deepcopy(model), data["xv"][:1], mt, [ap.Budget(macs=0.5)], tolerance=0.5,
                    ignore=["cls", "reg.2"])
    rung = lad.rungs[1]
    digit_drop = lad.original["digit/accuracy"] - rung.metrics["digit/accuracy"]
    ink_rise = rung.metrics["ink/mse"] - lad.original["ink/mse"]
    assert rung.drop == pytest.approx(digit_drop) and digit_drop <= 0.5
    assert ink_rise > 0.01 and not rung.within_tolerance
    assert lad.rungs[0].within_tolerance
    loose = ap.MultiTask(tasks(data), {"digit": 1.0, "ink": 100.0})  # the tasks' own, not the ladder's 0
    lad = ap.ladder(copy.deepcopy(model), data["xv"][:1], loose, [ap.Budget(macs=0.5)], tolerance=0.0,
                    ignore=["cls", "reg.2"], run_dir=tmp_path / "lad")
    assert lad.rungs[1].drop > 0 and lad.rungs[1].within_tolerance
    with pytest.raises(RunDirError, match="tasks"):  # a resume must judge by the same tasks and tolerances
        ap.ladder(copy.deepcopy(model), data["xv"][:1], mt, [ap.Budget(macs=0.5)], tolerance=0.0,
                  ignore=["cls", "reg.2"], run_dir=tmp_path / "lad", resume=True)


def test_the_convolutional_example_pairs_a_classifier_with_a_lower_is_better_dense_task() -> None:
    """``ConvTwoHead``: the ink mask's per-pixel error is lower-is-better and far below always saying "no ink"
    (about 0.29 of the pixels have ink), every convolution is a group, and multi-task adapt meets a budget."""
    from adaprune.examples.multihead import HeadTask, conv_tasks, trained_conv

    model, data = trained_conv(0, epochs=3)
    t = conv_tasks(data)
    assert t["ink"].metric == "pixel_error" and not t["ink"].higher_is_better
    assert t["ink"].evaluate(model)["pixel_error"] < 0.5 * float(data["tv"].mean())
    graph = ap.trace(model, data["xv"][:1], ignore=["cls.2", "seg.2"])
    assert sorted(g.name for g in graph.groups) == ["deep.1", "deep.3", "seg.0", "stem.0", "stem.2"]
    res = ap.adapt(copy.deepcopy(model), data["xv"][:1], ap.MultiTask(t, {"digit": 0.5, "ink": 0.5}),
                   ap.Budget(macs=0.6), ignore=["cls.2", "seg.2"], finetune_steps=5, max_iterations=3)
    assert res.budget_met and set(res.after) >= {"digit/accuracy", "ink/pixel_error"}
    with pytest.raises(ValueError, match="kind must be"):
        HeadTask("depth", data["x"], data["t"], data["xv"], data["tv"])



def test_a_head_tasks_batches_come_in_a_fresh_order_every_pass_from_torchs_seed(base) -> None:
    """A shuffling loader's behaviour: two passes differ (so a recovery after a rollback does not replay the
    batches of the one before), and the order follows torch's seed (which adapt sets at every step)."""
    _, data = base
    t = tasks(data)["digit"]
    per_pass = len(t.x) // 64

    def draw(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [y for _, (_, y) in zip(range(2 * per_pass), t.training_batches())]

    first = draw(3)
    assert all(torch.equal(a, b) for a, b in zip(first, draw(3)))
    assert not torch.equal(torch.cat(first[:per_pass]), torch.cat(first[per_pass:]))
    assert not torch.equal(torch.cat(first), torch.cat(draw(4)))
    assert all(len(y) == 64 for y in first)
