"""``ap.specialize``: one adapted model per task from one base, and the overlap of what they keep.

- the overlap's storage figures equal a brute-force count of kept weights (per task, and kept by any
  task, counted once), and its per-group Jaccard equals the sets' (random plans on an MLP, 3 tasks);
- on the two-head digits net every specialised model meets the budget, keeps its own task within its
  tolerance, and the overlap report is written beside the per-task run directories;
- a task without a tolerance, a foreign file in the run directory: clear errors.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError, RunDirError
from adaprune.examples.multihead import tasks, trained
from adaprune.plan import Plan
from adaprune.specialize import overlap

pytestmark = pytest.mark.usefixtures("one_thread")


def random_plan(model: nn.Module, graph: ap.Graph, rng: random.Random) -> Plan:
    from adaprune.plan import plan_from_choice

    chosen = {g.name: sorted(rng.sample(range(g.size), rng.randrange(0, g.size))) for g in graph.groups}
    return plan_from_choice(graph, chosen)


def kept_mask(shape: tuple[int, ...], removed: dict[int, tuple[int, ...]]) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.bool)
    for d, idx in removed.items():
        if idx:
            mask.index_fill_(d, torch.tensor(idx), False)
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_counts_equal_a_brute_force_count(seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(2, 6)
    graph = ap.trace(model, x, ignore=[model[4]])
    rng = random.Random(seed)
    plans = {t: random_plan(model, graph, rng) for t in ("a", "b", "c")}
    found = overlap(model, x, plans, ignore=[model[4]])
    union, separate = 0, 0
    for name, p in model.named_parameters():
        masks = [kept_mask(tuple(p.shape), dict(plans[t].removals.get(name, {}))) for t in plans]
        separate += sum(int(m.sum()) for m in masks)
        union += int(torch.stack(masks).any(0).sum())
    assert found.params_separate == separate and found.params_shared == union
    assert found.params_original == sum(p.numel() for p in model.parameters())
    for g, cut in zip(graph.groups, found.groups):
        sets = [set(range(g.size)) - set(next(c.removed for c in plans[t].groups if c.name == g.name)) for t in plans]
        union_set = set.union(*sets)
        want = len(set.intersection(*sets)) / len(union_set) if union_set else 1.0
        assert cut.group == g.name and cut.jaccard == pytest.approx(want)
        assert cut.kept == {t: len(s) for t, s in zip(plans, sets)}


def test_specialize_gives_each_task_its_own_model_and_reports_the_overlap(tmp_path) -> None:
    model, data = trained(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tol = {"digit": 0.03, "ink": 0.05}
    out = ap.specialize(model, data["xv"][:1], tasks(data), ap.Budget(macs=0.6), tol, finetune_steps=20,
                        max_iterations=12, run_dir=tmp_path / "sp")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the base is left as it was
    check = tasks(data)
    base = {n: check[n].evaluate(model)[check[n].metric] for n in check}
    for name, res in out.results.items():
        assert res.budget_met, res.message
        got = check[name].evaluate(out.models[name])[check[name].metric]
        drop = base[name] - got if check[name].higher_is_better else got - base[name]
        assert drop <= tol[name] + 0.02, (name, drop)  # validation split: within its tolerance (and noise)
        assert (tmp_path / "sp" / name / "state.json").is_file()
    assert out.models["digit"] is not out.models["ink"]
    assert out.results["digit"].plan.to_dict() != out.results["ink"].plan.to_dict()  # each its own plan
    report = json.loads((tmp_path / "sp" / "overlap.json").read_text())
    assert report["tasks"] == ["digit", "ink"] and report["params_shared"] <= report["params_separate"]
    assert {g["group"] for g in report["groups"]} >= {"trunk.1", "trunk.3"}
    assert "Jaccard" in (tmp_path / "sp" / "overlap.md").read_text()


def test_specialize_names_what_is_wrong(tmp_path) -> None:
    model, data = trained(0, epochs=1)
    with pytest.raises(ConfigError, match="task 'ink' has no tolerance"):
        ap.specialize(model, data["xv"][:1], tasks(data), ap.Budget(macs=0.5), {"digit": 0.01})
    with pytest.raises(ConfigError, match="plain file name"):
        ap.specialize(model, data["xv"][:1], {"../x": tasks(data)["digit"]}, ap.Budget(macs=0.5))
    (tmp_path / "mine.txt").write_text("not adaprune's")
    with pytest.raises(RunDirError, match="mine.txt"):
        ap.specialize(model, data["xv"][:1], tasks(data), ap.Budget(macs=0.5), 0.05, run_dir=tmp_path)
