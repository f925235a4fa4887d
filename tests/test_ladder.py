"""``ap.ladder`` end to end on sklearn digits (a small conv-BN network trained here).

- every rung meets its budget, widths never grow down the ladder, ``use(k)`` and ``export(k)`` agree,
  the ladder holds one set of weights (its parameters are the full model's, plus per-rung BatchNorm
  statistics), and every rung has its own BatchNorm statistics;
- the widths are adaptive: a layer made artificially sensitive keeps more channels at every rung than
  uniform pruning keeps at the same budget (fails when the allocation is uniform);
- the joint recovery (sandwich rule, in-place distillation) trains the smallest rung: after the same
  optimizer steps its training loss is lower than when only the full model is trained (fails when the
  recovery trains rung 0 alone);
- a ladder that fails part-way leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import adaprune as ap
from adaprune.errors import ConfigError
from adaprune.ladder import ladder
from adaprune.ladder import recovery as rec
from adaprune.ladder.nested import NestedWidths, norm_buffers
from sensitive_task import SensitiveLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def task_of(data: Any) -> ap.ClassificationTask:
    return ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_rungs_meet_budgets_nest_and_share_one_set_of_weights(trained) -> None:
    base, data = trained
    model = copy.deepcopy(base)
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lad = ladder(model, data.x_val[:1], task_of(data), ignore=[model.fc], finetune_steps=20)
    assert len(lad) == 4 and lad.finetune_steps == 20 and lad.current == 0
    assert [r.budget for r in lad.rungs] == [None, ap.Budget(macs=0.75), ap.Budget(macs=0.5), ap.Budget(macs=0.25)]
    macs = [r.costs["macs"] for r in lad.rungs]
    for r in lad.rungs[1:]:
        assert r.budget_met and r.costs["macs"] <= r.budget.macs * macs[0] * (1 + 1e-9), r
    assert macs == sorted(macs, reverse=True)
    for small, large in zip(lad.rungs[1:], lad.rungs):
        assert all(small.widths[g] <= large.widths[g] for g in large.widths)
    x = data.x_val[:16]
    for k in (3, 1, 2, 0):
        torch.testing.assert_close(outputs(lad.use(k), x), outputs(lad.export(k), x), rtol=1e-4, atol=1e-5)
        held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in lad.model.parameters()}
        assert sum(held.values()) <= full_bytes  # views of the full parameters at every rung
    assert sum(p.numel() * p.element_size() for p in lad.model.parameters()) == full_bytes
    names = norm_buffers(model)
    assert names and all(set(n) == set(names) for n in lad.nested.norms)
    last = "features.11.running_mean"  # the last BatchNorm: its inputs depend on every narrowed layer
    stats = [lad.nested.norms[k][last] for k in range(4)]
    assert all(not torch.allclose(stats[0][: s.numel()], s) for s in stats[1:])  # each rung its own
    assert lad.rungs[0].metrics["accuracy"] > 0.8


def test_widths_are_adaptive_a_sensitive_layer_is_kept_wider_than_uniform(trained) -> None:
    base, data = trained
    layer = "features.7"
    width = base.get_submodule(layer).out_channels
    model = copy.deepcopy(base)
    lad = ladder(model, data.x_val[:1], SensitiveLayer(task_of(data), layer, width), ignore=[model.fc])
    for r in lad.rungs[1:]:
        uniform = copy.deepcopy(base)
        ap.prune(uniform, data.x_val[:1], budget=r.budget, ignore=[uniform.fc], allocation="uniform")
        kept = lad.export(r.index).get_submodule(layer).out_channels
        assert kept > uniform.get_submodule(layer).out_channels, (r.index, kept)
    assert lad.rungs[-1].widths != lad.rungs[1].widths


def test_the_joint_recovery_follows_the_seed_not_the_callers_generator(trained) -> None:
    """The recovery's shuffled batches are drawn from a generator seeded by ``seed``: the same ladder twice,
    whatever the caller drew in between, and the caller's generator is left where it was."""
    base, data = trained

    def built(seed: int) -> list[dict[str, float]]:
        lad = ladder(copy.deepcopy(base), data.x_val[:1], task_of(data), [ap.Budget(macs=0.5)], ignore=["fc"],
                     finetune_steps=6, seed=seed)
        return [r.metrics for r in lad.rungs]

    torch.manual_seed(1)
    first = built(0)
    torch.rand(7)
    state = torch.random.get_rng_state()
    assert built(0) == first
    assert torch.equal(torch.random.get_rng_state(), state)
    assert built(1) != first  # (the seed does decide)


def smallest_rung_loss(base: torch.nn.Module, data: Any, train_rungs: Any, steps: int = 40) -> float:
    model = copy.deepcopy(base)
    graph = ap.trace(model, data.x_val[:1], ignore=[model.fc])
    nested = NestedWidths(model, graph, [{g.name: max(1, g.size // 3) for g in graph.groups}])
    task = task_of(data)
    original = rec.sandwich
    rec.sandwich = train_rungs
    try:
        rec.joint_recovery(nested, task, steps, lr=3e-3, seed=0)
    finally:
        rec.sandwich = original
    rec.recalibrate_rungs(nested, task.calibration())
    batches = task.calibration()
    model = nested.use(1).eval()
    with torch.no_grad():
        return sum(float(task.loss(model, x, y)) for x, y in batches) / len(batches)


def test_joint_recovery_trains_the_smallest_rung(trained) -> None:
    base, data = trained
    sandwich = smallest_rung_loss(base, data, rec.sandwich)
    full_only = smallest_rung_loss(base, data, lambda n, rng: [0])
    assert sandwich < 0.8 * full_only, (sandwich, full_only)
    assert rec.sandwich(4, random.Random(0))[:2] == [0, 3] and rec.sandwich(1, random.Random(0)) == [0]


class Broken:
    """A classification task whose evaluation fails on its ``fail_at``-th call."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, task: ap.ClassificationTask, fail_at: int) -> None:
        self.task, self.calls, self.fail_at = task, 0, fail_at

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("evaluation broke")
        return self.task.evaluate(model)

    def calibration(self) -> list:
        return self.task.calibration()

    def training_batches(self) -> Iterator[tuple[Any, Any]]:
        return self.task.training_batches()


@pytest.mark.parametrize("fail_at", [2, 10_000])
def test_a_failed_ladder_leaves_the_model_as_it_was(trained, fail_at: int) -> None:
    base, data = trained
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = Broken(task_of(data), fail_at)
    if fail_at == 2:  # during allocation, after the channels were reordered
        with pytest.raises(RuntimeError, match="evaluation broke"):
            ladder(model, data.x_val[:1], task, ignore=[model.fc])
    else:  # a bad argument after nothing else failed: a typed error
        with pytest.raises(ConfigError, match="rungs= is empty"):
            ladder(model, data.x_val[:1], task, [], ignore=[model.fc])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(outputs(model, data.x_val[:16]), outputs(base, data.x_val[:16]))


def test_save_and_load_give_back_every_rung(trained, tmp_path) -> None:
    from adaprune.examples.digits import DigitsCNN
    from adaprune.io import LoadError

    base, data = trained
    model = copy.deepcopy(base)
    lad = ladder(model, data.x_val[:1], task_of(data), [ap.Budget(macs=0.6), ap.Budget(macs=0.3)],
                 ignore=[model.fc], finetune_steps=5)
    lad.use(2)
    ap.save_ladder(lad, tmp_path)
    assert lad.current == 2
    back = ap.load_ladder(tmp_path, lambda: DigitsCNN(8), data.x_val[:1])
    assert back.rungs == lad.rungs and back.ignore == ["fc"] and back.current == 0
    x = data.x_val[:16]
    for k in range(3):
        torch.testing.assert_close(outputs(back.use(k), x), outputs(lad.use(k), x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adaprune.json", "ladder.json", "model.safetensors",
                                                         "norms.safetensors", "plan.json"]
    norms = tmp_path / "norms.safetensors"
    norms.write_bytes(norms.read_bytes()[:-8])
    with pytest.raises(LoadError, match="norms.safetensors"):
        ap.load_ladder(tmp_path, lambda: DigitsCNN(8), data.x_val[:1])
