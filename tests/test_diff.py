"""``ap.diff`` / ``adaprune diff``: two plans of one model compared group by group.

- on torchvision's resnet18 and a tiny Hugging Face BERT: a plan against itself differs nowhere (its
  kept-by-both costs equal the channels' count times one channel's exact cost); two different plans give
  the counts and Jaccard of the kept sets, and the costs of the predictor differences, computed here;
- a plan of another model is refused; what does not map is reported; plans read from files and results;
- the reports escape names; ``to_dict`` survives JSON;
- ``adaprune diff`` on two real adapt runs counts what the runs counted.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from collections import OrderedDict

import pytest
import torch
import yaml
from torch import nn

import adaprune as ap
from adaprune.cost.predict import CostPredictor
from adaprune.errors import ArgumentTypeError, ConfigError, PlanMismatchError
from adaprune.plan import Plan, plan_from_choice
from adaprune.updates import PlanDiff
from cli_helpers import config, invoke

pytestmark = pytest.mark.usefixtures("one_thread")

def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64), ["fc"]


def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["pooler"]


@pytest.fixture(scope="module")
def resnet_case():
    model, x, ignore = resnet()
    return model, x, ignore, ap.trace(model, x, ignore=ignore)


@pytest.fixture(scope="module")
def bert_case():
    model, x, ignore = bert()
    return model, x, ignore, ap.trace(model, x, ignore=ignore)


@pytest.fixture(params=["resnet18", "bert"])
def case(request):
    return request.getfixturevalue("resnet_case" if request.param == "resnet18" else "bert_case")


def choices(graph: ap.Graph, seed: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Two plans' removed channels on the first four groups: both cut the 1st and 4th, only A the 2nd, only B
    the 3rd; random, but never all of a group, and overlapping where both cut."""
    rng = random.Random(seed)
    g = graph.groups[:4]
    assert len(g) == 4

    def some(size: int) -> list[int]:
        return sorted(rng.sample(range(size), rng.randint(1, max(1, size // 2))))

    return ({g[0].name: some(g[0].size), g[1].name: some(g[1].size), g[3].name: some(g[3].size)},
            {g[0].name: some(g[0].size), g[2].name: some(g[2].size), g[3].name: some(g[3].size)})


def predictor(model, x, graph):
    pred = CostPredictor(model, x)

    def cost(removed):
        c = pred(plan_from_choice(graph, removed))
        return {"macs": c.macs, "params": c.params}

    return cost


def minus(a, b):
    return {k: a[k] - b[k] for k in a}


def test_a_plan_against_itself_differs_nowhere(case):
    model, x, ignore, graph = case
    removed = choices(graph, 0)[0]
    d = ap.diff(plan_from_choice(graph, removed), plan_from_choice(graph, removed), model, x, ignore=ignore)
    assert [g.group for g in d.groups] == [g.name for g in graph.groups if g.name in removed]
    cost = predictor(model, x, graph)
    zero = {"macs": 0, "params": 0}
    for row in d.groups:
        kept = row.size - len(removed[row.group])
        assert (row.both, row.only_a, row.only_b, row.jaccard) == (kept, 0, 0, 1.0)
        assert row.cost_only_a == row.cost_only_b == zero
        # a plan cannot remove all it keeps of a group: costed with one channel put back, which for channels
        # that cost alike is their count times one channel's exact cost
        one = minus(cost(removed), cost({**removed, row.group: [*removed[row.group], min(
            set(range(row.size)) - set(removed[row.group]))]}))
        assert one["macs"] > 0 and row.cost_both == {k: kept * v for k, v in one.items()}
    assert d.same and d.costs["a"] == d.costs["b"] == d.costs["both"] == cost(removed)
    assert (d.total.only_a, d.total.only_b, d.total.jaccard) == (0, 0, 1.0)
    assert d.total.cost_only_a == d.total.cost_only_b == zero and not d.dropped
    assert "keep the same channels" in d.summary()


def test_two_plans_give_the_counts_and_costs_of_their_sets(case):
    model, x, ignore, graph = case
    ra, rb = choices(graph, 1)
    d = ap.diff(plan_from_choice(graph, ra), plan_from_choice(graph, rb), model, x, ignore=ignore, names=("old", "new"))
    assert [g.group for g in d.groups] == [g.name for g in graph.groups if g.name in ra or g.name in rb]
    cost = predictor(model, x, graph)
    sizes = {g.name: g.size for g in graph.groups}
    exact = 0
    shared = {}
    for row in d.groups:
        every = set(range(sizes[row.group]))
        ka, kb = every - set(ra.get(row.group, ())), every - set(rb.get(row.group, ()))
        shared[row.group] = sorted(every - (ka & kb))
        assert (row.size, row.both, row.only_a, row.only_b) == (len(every), len(ka & kb), len(ka - kb), len(kb - ka))
        assert row.jaccard == pytest.approx(len(ka & kb) / len(ka | kb))
        if ka & kb and ka - kb:  # neither set is all A keeps there: one removal each, exactly
            also = {**ra, row.group: sorted(every - (ka & kb))}
            assert row.cost_only_a == minus(cost(ra), cost(also)) and row.cost_only_a["macs"] > 0
            assert row.cost_both == minus(cost(ra), cost({**ra, row.group: sorted(every - (ka - kb))}))
            exact += 1
        if ka & kb and kb - ka:
            assert row.cost_only_b == minus(cost(rb), cost({**rb, row.group: sorted(every - (ka & kb))}))
            exact += 1
        if not ka - kb:
            assert row.cost_only_a == {"macs": 0, "params": 0}
    assert exact >= 2
    t = d.total
    assert (t.both, t.only_a, t.only_b) == tuple(sum(getattr(r, k) for r in d.groups) for k in ("both", "only_a", "only_b"))
    assert t.jaccard == pytest.approx(t.both / (t.both + t.only_a + t.only_b)) and 0 < t.jaccard < 1
    # totals: the plans' costs, and the model of the channels both keep (A = both + only A, B = both + only B)
    assert d.costs["a"] == cost(ra) and d.costs["b"] == cost(rb) and d.costs["both"] == cost(shared)
    assert t.cost_both == cost(shared) and t.cost_only_a == minus(cost(ra), cost(shared))
    assert t.cost_only_b == minus(cost(rb), cost(shared))
    real = ap.count(model, x)
    assert d.costs["original"] == {"macs": real.macs, "params": real.params}
    assert not d.same and "differ in" in d.summary() and "old" in d.summary() and "new" in d.summary()


def test_a_plan_of_another_model_and_bad_arguments_are_refused(resnet_case, bert_case):
    model, x, ignore, graph = resnet_case
    plan = plan_from_choice(graph, choices(graph, 0)[0])
    bert_graph = bert_case[3]
    other = plan_from_choice(bert_graph, choices(bert_graph, 0)[0])
    with pytest.raises(PlanMismatchError, match=r"plan_b \('b'\).*different model.*dense model both plans"):
        ap.diff(plan, other, model, x, ignore=ignore)
    with pytest.raises(ArgumentTypeError, match="plan_a"):
        ap.diff(42, plan, model, x)
    with pytest.raises(ArgumentTypeError, match="names"):
        ap.diff(plan, plan, model, x, names="ab")
    with pytest.raises(ConfigError, match="different names"):
        ap.diff(plan, plan, model, x, names=("v1", "v1"))
    with pytest.raises(ArgumentTypeError, match="nn.Module"):
        ap.diff(plan, plan, model.state_dict(), x)
    with pytest.raises(ConfigError, match="not a diff"):
        PlanDiff.from_dict({"names": ["a", "b"]})


def test_what_does_not_map_is_reported_and_plans_come_from_files_and_results(resnet_case, tmp_path):
    model, x, ignore, graph = resnet_case
    removed = choices(graph, 0)[0]
    plan = plan_from_choice(graph, removed)
    extra = Plan({**plan.removals, "gone.weight": {0: (1,)}}, plan.groups, plan.sizes)
    d = ap.diff(extra, plan, model, x, ignore=ignore, names=("v1", "v2"))
    assert d.dropped == ["v1: module 'gone' (1 tensor: weight): not in the updated model"]
    assert not d.same and "1 part of the plans did not map" in d.summary()
    assert "not mapped: v1: module 'gone' (1 tensor: weight)" in d.markdown() and "did not map" in d.html()
    assert all(r.only_a == r.only_b == 0 for r in d.groups)  # the rest mapped whole

    (tmp_path / "plan.json").write_text(plan.to_json())
    res = ap.prune(copy.deepcopy(model), x, ratio=0.3, ignore=ignore)
    ap.save(res, tmp_path / "saved")
    same = ap.diff(tmp_path / "plan.json", str(tmp_path / "plan.json"), model, x, ignore=ignore)
    assert same.same and [g.group for g in same.groups] == list(removed)
    saved = ap.diff(res, tmp_path / "saved", model, x, ignore=ignore)
    assert saved.same and saved.costs["a"]["macs"] == ap.count(res.model, x).macs < saved.costs["original"]["macs"]


def test_reports_escape_names_and_the_dict_survives_json(resnet_case):
    net = nn.Sequential(OrderedDict([("conv|<i>", nn.Conv2d(3, 8, 3)), ("act", nn.ReLU()), ("head", nn.Conv2d(8, 4, 1))]))
    x = torch.randn(1, 3, 8, 8)
    graph = ap.trace(net, x, ignore=["head"])
    assert [g.name for g in graph.groups] == ["conv|<i>"]
    d = ap.diff(plan_from_choice(graph, {"conv|<i>": [0, 1]}), plan_from_choice(graph, {"conv|<i>": [1, 2, 3]}), net, x,
                ignore=["head"], names=("old|<a>", "new & <b>"))
    assert (d.groups[0].both, d.groups[0].only_a, d.groups[0].only_b) == (4, 2, 1)
    md = d.markdown()
    assert "| conv\\|<i> | 8 |" in md and "only old\\|<a>" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]  # the costs table (head + 4 rows) and the
    bounds = [len(re.findall(r"(?<!\\)\|", line)) for line in rows]  # groups table (head, group, total)
    assert bounds == [4] * 5 + [13] * 3  # 3 and 12 columns: names add no cell boundary
    page = d.html()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "conv|&lt;i&gt;" in page and "old|&lt;a&gt;" in page and "new &amp; &lt;b&gt;" in page
    assert not any(raw in page for raw in ("<i>", "<a>", "<b>", "& <"))

    model, x, ignore, graph = resnet_case
    ra, rb = choices(graph, 2)
    d = ap.diff(plan_from_choice(graph, ra), plan_from_choice(graph, rb), model, x, ignore=ignore)
    data = json.loads(json.dumps(d.to_dict()))
    assert data == d.to_dict() and data["summary"] == d.summary() and data["names"] == ["a", "b"]
    assert PlanDiff.from_dict(data) == d


def test_cli_diff_of_two_runs(workdir, tmp_path):
    from adaprune.cli.jobs import load_inputs
    from adaprune.examples.digits import DigitsCNN

    assert "diff" in invoke("--help").output
    runs, after = {}, {}
    for name, macs in (("diff-a", 0.8), ("diff-b", 0.6)):
        cfg = config(workdir, name, budget={"macs": macs}, options={"finetune_steps": 0, "max_iterations": 2, "step": 0.3},
                     report={"latency": False, "onnx": False})
        result = invoke("adapt", cfg, "--json")
        assert result.exit_code == 0, result.output
        runs[name], after[name] = workdir / "runs" / name, json.loads(result.stdout)
    a, b = runs["diff-a"], runs["diff-b"]
    result = invoke("diff", a, b, "--json", "--out", tmp_path / "diff.md")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["names"] == ["diff-a", "diff-b"] and data["out"] == str(tmp_path / "diff.md")
    # the model rebuilt from RUN_A's config, on its inputs, counts what each run counted
    for key, name in (("a", "diff-a"), ("b", "diff-b")):
        assert data["costs"][key] == {k: after[name]["costs_after"][k] for k in ("macs", "params")}
        assert data["costs"]["original"] == {k: after[name]["costs_before"][k] for k in ("macs", "params")}
    assert data["total"]["only_a"] > 0 and data["costs"]["a"]["macs"] > data["costs"]["b"]["macs"]
    expected = ap.diff(a, b, DigitsCNN(8), load_inputs(a / "inputs.safetensors"), ignore=["fc"], names=("diff-a", "diff-b"))
    assert PlanDiff.from_dict(data) == expected
    assert (tmp_path / "diff.md").read_text() == expected.markdown()

    shown = invoke("diff", a, b, "--out", tmp_path / "diff.html")
    assert shown.exit_code == 0, shown.output
    assert "Jaccard" in shown.stdout and "diff-a and diff-b differ in" in " ".join(shown.stdout.split())
    assert (tmp_path / "diff.html").read_text() == expected.html()

    other = workdir / "runs" / "diff-c"
    shutil.copytree(b, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["kwargs"]["width"] = 4
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused = invoke("diff", a, other)
    assert refused.exit_code == 2 and "another model" in refused.stderr and "width=4" in refused.stderr
    for args, words in (((a, b, "--out", tmp_path / "diff.txt"), ".md"), ((a, tmp_path / "nope"), "RUN_B"),
                        ((tmp_path, b), "config.yaml")):
        bad = invoke("diff", *args)
        assert bad.exit_code == 2 and words in bad.stderr, bad.output
