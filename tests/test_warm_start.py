"""Warm start (issue 16): a previous plan mapped onto an updated model, tried first, grown back where needed.

The mapping (adaprune.updates.map_plan) on torchvision models built from their constructors; the warm
start itself on a trained digits CNN with a real ClassificationTask."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torchvision

import adaprune as ap
from adaprune.adapt import WarmStartWarning
from adaprune.errors import PlanError, PlanMismatchError, RunDirError
from adaprune.graph import trace
from adaprune.plan import Plan, plan_from_choice
from adaprune.updates import map_plan, plan_of

X64 = torch.randn(1, 3, 64, 64)


def every_third(graph):
    return {g.name: list(range(0, g.size, 3)) for g in graph.groups}


@pytest.fixture(scope="module")
def resnet_plan():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    return m, plan_from_choice(trace(m, X64, ignore=["fc"]), every_third(trace(m, X64, ignore=["fc"])))


# -- the plan's sizes ------------------------------------------------------------------------------
def test_plan_records_the_sizes_it_was_made_for_and_refuses_another_size(resnet_plan):
    m, plan = resnet_plan
    assert plan.size_of("conv1.weight", 0) == 64 and plan.size_of("fc.weight", 1) == 512
    again = Plan.from_json(plan.to_json())
    assert again.sizes == plan.sizes and again.removals == plan.removals
    wider = torchvision.models.resnet18(num_classes=10, width_per_group=64)  # same: accepted
    plan.check(wider)
    narrow = copy.deepcopy(m)
    ap.remove(narrow, plan_from_choice(trace(m, X64, ignore=["fc"]), {"conv1": list(range(60))}))
    with pytest.raises(PlanMismatchError, match="made for a model whose 'conv1.weight' has 64"):
        plan.check(narrow)
    with pytest.raises(PlanError, match="recorded size is 2"):
        Plan({"a.weight": {0: (0, 5)}}, (), {"a.weight": {0: 2}})
    assert "sizes" not in Plan({"a.weight": {0: (1,)}}).to_dict()  # older plans' JSON is unchanged


# -- mapping -------------------------------------------------------------------------------------
def test_a_plan_maps_onto_the_same_architecture_exactly(resnet_plan):
    m, plan = resnet_plan
    mapped = map_plan(plan, copy.deepcopy(m), X64, ignore=["fc"])
    assert mapped.complete and not mapped.extended
    assert mapped.plan.removals == plan.removals


def test_a_resized_head_maps_completely(resnet_plan):
    _, plan = resnet_plan
    mapped = map_plan(plan, torchvision.models.resnet18(num_classes=37), X64, ignore=["fc"])
    assert mapped.complete and mapped.plan.removals == plan.removals


def test_added_layers_are_cut_with_their_group_and_reported(resnet_plan):
    _, plan = resnet_plan
    deeper = torchvision.models.resnet34(num_classes=10)
    mapped = map_plan(plan, deeper, X64, ignore=["fc"])
    assert mapped.complete
    assert any("'layer1.2.conv1.weight' dim 1" in e for e in mapped.extended)  # the new block's input: residual stream
    assert "layer1.2.conv1" not in mapped.removed  # a group only the update has: not cut
    ap.remove(deeper, mapped.plan)  # and the mapped plan cuts the deeper model consistently
    assert deeper(X64).shape == (1, 10)


def test_removed_layers_and_resized_dims_are_reported_never_guessed(resnet_plan):
    _m, plan = resnet_plan
    extra = Plan({**plan.removals, "gone.weight": {0: (1, 2)}}, (), {**plan.sizes, "gone.weight": {0: 4}})
    wide = torchvision.models.resnet18(num_classes=10)  # the update doubles layer1.0's inner width
    block = wide.layer1[0]
    block.conv1, block.bn1 = torch.nn.Conv2d(64, 128, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(128)
    block.conv2 = torch.nn.Conv2d(128, 64, 3, 1, 1, bias=False)
    mapped = map_plan(extra, wide, X64, ignore=["fc"])
    assert "module 'gone' (1 tensor: weight): not in the updated model" in mapped.dropped
    assert any("'layer1.0.conv1.weight' dim 0" in d and "from 64 to 128" in d for d in mapped.dropped)
    assert "layer1.0.conv1" not in mapped.removed  # its size changed: not cut at all
    assert "conv1" in mapped.removed  # the stem kept its size: mapped
    assert "not mapped" in mapped.report()


def test_a_plan_for_another_model_is_a_mismatch(resnet_plan):
    _, plan = resnet_plan
    with pytest.raises(PlanMismatchError, match="made for a different model"):
        map_plan(plan, torchvision.models.mobilenet_v2(), X64)
    narrow = torchvision.models.resnet18(num_classes=10, width_per_group=64)
    shrunk = {n: tuple(range(0, s, 2)) for n, s in [("conv1.weight", 64)]}
    tiny = Plan({"conv1.weight": {0: shrunk["conv1.weight"]}}, (), {"conv1.weight": {0: 96}})
    with pytest.raises(PlanMismatchError, match="nothing of the plan maps"):  # every part resized
        map_plan(tiny, narrow, X64, ignore=["fc"])


def test_a_named_slot_that_does_not_map_leaves_its_group_uncut(resnet_plan):
    m, plan = resnet_plan
    bad = {**plan.removals, "bn1.weight": {0: (*plan.removals["bn1.weight"][0], 999)}}  # one index beyond
    mapped = map_plan(Plan(bad, (), {}), copy.deepcopy(m), X64, ignore=["fc"])
    assert "conv1" not in mapped.removed  # the stem's group: the BatchNorm weight it names did not map
    assert any("'bn1.weight' dim 0" in d and "beyond" in d for d in mapped.dropped)
    assert any(d.startswith("group 'conv1'") and "did not map" in d for d in mapped.dropped)
    assert not any("'bn1.weight'" in e for e in mapped.extended)
    assert mapped.notes and "no sizes" in mapped.notes[0]  # a plan without sizes: said, since sizes go unchecked
    assert "layer1.0.conv1" in mapped.removed and not map_plan(plan, copy.deepcopy(m), X64, ignore=["fc"]).notes


# -- warm start on a trained model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(trained):
    base, data = trained
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val", batch_size=512), lr=1e-3)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    res = ap.adapt(model, data.x_test[:1], task, ap.Budget(macs=0.5), 0.03, ignore=["fc"], finetune_steps=20)
    assert res.budget_met
    return base, data, task, res


def task_of(data):
    torch.manual_seed(0)
    return ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val", batch_size=512), lr=1e-3)


def test_a_plan_that_still_fits_costs_one_step(digits_run):
    base, data, _, prev = digits_run
    model = copy.deepcopy(base)
    res = ap.adapt(model, data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.03, ignore=["fc"],
                   finetune_steps=20, max_step=0.3, warm_start=prev)
    assert res.warm_start is not None and res.warm_start["outcome"] == "kept"
    assert len(res.history) == 1 and res.history[0].accepted and "warm start" in res.history[0].reason
    # its recovery: finetune_steps for each of the fewest ordinary steps (at most max_step) cutting as much
    assert 0.3 < res.history[0].step_size <= 0.6 and res.history[0].optimizer_steps == 2 * 20
    assert res.budget_met
    assert res.plan.removals == prev.plan.removals  # the previous plan, exactly
    assert res.evaluations <= 4  # the original, (the refit's two) and the step: no probes
    assert "warm start: kept" in res.summary()


def _harmful_plan(base, data):
    """A plan that removes most of the strongest channels of features.3, and a few weak ones elsewhere."""
    graph = trace(base, data.x_test[:1], ignore=["fc"])
    norms = base.features[3].weight.detach().flatten(1).norm(dim=1)
    strongest = norms.argsort(descending=True)[: int(0.75 * norms.numel())].tolist()
    choice = {"features.3": sorted(strongest)}
    for g in graph.groups:
        if g.name != "features.3":
            choice[g.name] = list(range(g.size // 4))
    return plan_from_choice(graph, choice)


def test_a_plan_the_update_breaks_grows_back_what_is_needed(trained):
    base, data = trained
    plan = _harmful_plan(base, data)
    model = copy.deepcopy(base)
    res = ap.adapt(model, data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.02, ignore=["fc"],
                   finetune_steps=5, warm_start=plan)
    w = res.warm_start
    assert w is not None and w["outcome"] in ("grown back", "abandoned")
    first = res.history[0]
    assert not first.accepted and "warm start (try 1)" in first.reason and "growing back" in first.reason
    # grown back: the half of the cut groups whose cut hurts most per cost saved, as measured on the model
    grown_first = first.reason.split("growing back ")[1].split(", ")
    assert grown_first == sorted(w["harms"], key=w["harms"].get, reverse=True)[:2]
    assert "features.3" in grown_first and "features.10" not in grown_first  # (not the largest cuts first)
    # ends within tolerance of the updated model, on the same task
    assert res.after["accuracy"] >= res.before["accuracy"] - 0.02 - 1e-9
    assert res.history[1].accepted and "features.3" not in res.history[1].cuts  # the try that held kept it whole
    assert res.budget_met  # and later steps cut where there is slack until the budget holds


def _permuted(base, removed):
    """``base`` with the output channels of features.3 reordered (the same function): the positions in
    ``removed`` now hold the channels with the largest weights, the ones the model needs most."""
    model = copy.deepcopy(base)
    conv, bn, nxt = model.features[3], model.features[4], model.features[7]
    strongest = conv.weight.detach().flatten(1).norm(dim=1).argsort(descending=True).tolist()
    order = [-1] * conv.out_channels
    for pos, ch in zip(sorted(removed), strongest):
        order[pos] = ch
    rest = iter(c for c in range(conv.out_channels) if c not in order)
    order = torch.tensor([c if c >= 0 else next(rest) for c in order])
    with torch.no_grad():
        for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(t[order])
        nxt.weight.copy_(nxt.weight[:, order])
    return model


def test_an_update_that_needs_the_pruned_channels_grows_them_back(digits_run):
    """The update reorders features.3 (a retrained model's channels have no fixed order): by index, the
    previous plan now removes the channels the model needs most. The warm start sees the tolerance broken,
    grows features.3 back (from the updated model's own weights) and ends within tolerance."""
    base, data, _, prev = digits_run
    removed = next(g.removed for g in map_plan(prev.plan, base, data.x_test[:1], ignore=["fc"]).plan.groups
                   if g.name == "features.3")
    updated = _permuted(base, removed)
    x = data.x_val
    assert torch.allclose(updated(x), base(x), atol=1e-5)  # the same function, another channel order
    res = ap.adapt(copy.deepcopy(updated), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.03,
                   ignore=["fc"], finetune_steps=2, reconstruct=False, warm_start=prev)
    w = res.warm_start
    assert not res.history[0].accepted and "warm start (try 1)" in res.history[0].reason
    assert "features.3" in w["restored"] and w["outcome"] == "grown back"
    assert max(w["harms"], key=w["harms"].get) == "features.3"
    assert res.after["accuracy"] >= res.before["accuracy"] - 0.03 - 1e-9  # within tolerance of the update
    assert res.history[1].accepted and "features.3" not in res.history[1].cuts  # grown back: its own weights


def test_unmapped_parts_are_reported_and_the_run_goes_on(digits_run):
    base, data, _, prev = digits_run
    plan = Plan({**prev.plan.removals, "head.weight": {1: (0, 1)}}, (), prev.plan.sizes)
    with pytest.warns(WarmStartWarning, match="module 'head' .1 tensor: weight.: not in the updated model"):
        res = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.03,
                       ignore=["fc"], finetune_steps=20, warm_start=plan)
    assert res.warm_start["dropped"] == ["module 'head' (1 tensor: weight): not in the updated model"]
    assert res.warm_start["outcome"] == "kept" and res.budget_met  # the rest mapped, and the run went on
    assert "1 part of the previous plan did not map" in res.summary()


def test_a_plan_for_another_model_is_refused_before_anything_runs(digits_run):
    base, data, _, _ = digits_run
    with pytest.raises(PlanMismatchError):
        ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5),
                 warm_start=Plan({"encoder.layer.0.weight": {0: (1,)}}))


def test_previous_runs_are_read_from_run_dirs_saves_and_plan_files(digits_run, tmp_path):
    base, data, _, prev = digits_run
    ap.save(prev, tmp_path / "saved")
    (tmp_path / "plan.json").write_text(prev.plan.to_json())
    for where in (tmp_path / "saved", tmp_path / "plan.json", prev, prev.plan):
        assert plan_of(where).removals == prev.plan.removals
    run = tmp_path / "run"
    ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.03, ignore=["fc"],
             finetune_steps=20, run_dir=run)
    found = plan_of(run)
    assert found.removals == prev.plan.removals and found.sizes  # the run's state records the sizes
    with pytest.raises(ap.errors.ConfigError, match="neither a run's state.json"):
        plan_of(tmp_path)


def test_a_killed_warm_start_resumes_to_the_same_plan_and_refuses_another_warm_start(trained, tmp_path):
    base, data = trained
    plan = _harmful_plan(base, data)
    kw = {"ignore": ["fc"], "finetune_steps": 5, "warm_start": plan}
    whole = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.02, **kw)
    run = tmp_path / "run"
    cut = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.02, run_dir=run,
                   max_evaluations=4, **kw)  # stops inside the warm start
    assert cut.stopped and json.loads((run / "state.json").read_text())["warm"]["tries"] >= 1
    with pytest.raises(RunDirError, match="warm-started from another plan"):
        ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.02, run_dir=run,
                 resume=True, **{**kw, "warm_start": Plan()})
    with pytest.raises(RunDirError, match="pass the same warm_start"):
        ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.02, run_dir=run,
                 resume=True, **{**kw, "warm_start": None})
    again = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.02, run_dir=run,
                     resume=True, **kw)
    assert again.plan.removals == whole.plan.removals
    assert again.warm_start == whole.warm_start


def test_warm_starts_under_a_latency_budget_and_from_unfinished_runs(digits_run, tmp_path):
    from adaprune.adapt.previous import UnfinishedRunWarning

    base, data, _, prev = digits_run
    res = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(latency=0.9), 0.03, ignore=["fc"],
                   finetune_steps=5, latency_repeats=3, max_iterations=2, warm_start=prev)  # sized by MACs
    assert res.warm_start["tries"] >= 1 and "warm start (try 1)" in res.history[0].reason
    run = tmp_path / "stopped"
    ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.03, ignore=["fc"],
             finetune_steps=5, run_dir=run, max_evaluations=2)
    with pytest.warns(UnfinishedRunWarning, match="did not finish"):
        plan_of(run)
    with pytest.raises(ap.errors.ConfigError, match="own run_dir"):
        ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), run_dir=run, force=True,
                 warm_start=run)
    (tmp_path / "other.json").write_text('{"version": 1}')
    with pytest.raises(ap.errors.ConfigError, match="warm_start: .* is not a plan JSON file"):
        ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5),
                 warm_start=tmp_path / "other.json")
    with pytest.warns(UnfinishedRunWarning):  # a run's state.json stands for its run directory
        assert plan_of(run / "state.json").removals == plan_of(run).removals


def test_a_budget_that_holds_already_leaves_the_warm_start_untried(digits_run):
    base, data, _, prev = digits_run
    res = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=1.0), 0.03, ignore=["fc"],
                   warm_start=prev)
    assert res.warm_start["outcome"] == "not tried" and not res.history and "not tried after 0 tries" in res.summary()


def test_an_empty_previous_plan_warm_starts_nothing(digits_run):
    base, data, _, _ = digits_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", WarmStartWarning)
        res = ap.adapt(copy.deepcopy(base), data.x_test[:1], task_of(data), ap.Budget(macs=0.5), 0.03,
                       ignore=["fc"], finetune_steps=20, warm_start=Plan())
    assert res.warm_start is not None and res.warm_start["outcome"] == "abandoned" and res.budget_met


def test_cli_warm_start_reports_what_it_did_and_the_plan_diff(workdir):
    from cli_helpers import config, invoke

    first = config(workdir, "warm-a", budget={"macs": 0.6}, options={"finetune_steps": 5, "max_iterations": 4, "step": 0.3},
                   report={"latency": False, "onnx": False})
    assert invoke("adapt", first).exit_code == 0
    prev = workdir / "runs" / "warm-a"
    second = config(workdir, "warm-b", budget={"macs": 0.6}, options={"finetune_steps": 5, "max_iterations": 4, "step": 0.3},
                    report={"latency": False, "onnx": False})
    result = invoke("adapt", second, "--warm-start", prev, "--json")
    assert result.exit_code == 0, result.output
    run = workdir / "runs" / "warm-b"
    data = json.loads((run / "report.json").read_text())
    w = data["warm_start"]
    assert w["source"] == str(prev.resolve()) and w["outcome"] == "kept" and w["tries"] == 1
    assert w["diff"]["names"] == ["previous", "this run"] and w["diff"]["total"]["only_a"] == 0  # the same plan
    html = (run / "report.html").read_text()
    assert "<h2>Warm start</h2>" in html and "kept by both" in html and "the previous plan held as it was" in html
    assert "## Warm start" in (run / "report.md").read_text()
    own = invoke("adapt", second, "--warm-start", run, "--force")
    assert own.exit_code == 2 and "this run's own directory" in own.stderr


class _Settling(ap.Task):
    """A task whose verdict on a cut model depends on how much it was fine-tuned since the cut: 3 of 200
    examples lost (a point drop of 0.015, whose interval reaches past 0.02) until 2 x 20 steps, none after."""

    metric, higher_is_better = "score", True

    def __init__(self, full: int) -> None:
        self.full, self.steps = full, 0

    def finetune(self, model, steps):
        self.steps += steps

    def evaluate_examples(self, model):
        values = torch.ones(200, dtype=torch.float64)
        if sum(p.numel() for p in model.parameters()) == self.full:
            self.steps = 0  # the unpruned model: a new cut starts here
        elif self.steps < 40:
            values[:3] = 0.0
        return {"score": float(values.mean())}, values

    def evaluate(self, model):
        return self.evaluate_examples(model)[0]


def test_an_undecided_warm_try_recovers_more_before_growing_anything_back(digits_run):
    base, data, _, prev = digits_run
    task = _Settling(sum(p.numel() for p in base.parameters()))
    res = ap.adapt(copy.deepcopy(base), data.x_test[:1], task, ap.Budget(macs=0.5), 0.02, ignore=["fc"],
                   finetune_steps=20, reconstruct=False, warm_start=prev)
    first = res.history[0]
    assert first.accepted and "undecided after the first recovery" in first.reason and "recovered 20 steps more" in first.reason
    assert first.optimizer_steps == 20 + 20 and res.warm_start["outcome"] == "kept" and not res.warm_start["harms"]
