"""``ap.ladder(run_dir=..., resume=True)``: a build stopped part-way ends with the ladder an uninterrupted
build makes (same widths, weights, statistics and metrics), whether it stopped during the allocation of
the rungs or during the joint recovery; the model is restored as it was after the stop; a resume with
other settings or on another model is refused before anything changes; a directory holding a build is
not reused without resume or force.

The task's batches are not shuffled, so the build is deterministic and "the same ladder" is exact.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import adaprune as ap
from adaprune.errors import RunDirError
from adaprune.ladder import ladder

pytestmark = pytest.mark.usefixtures("one_thread")

RUNGS = [ap.Budget(macs=0.6), ap.Budget(macs=0.3)]


class Stopping:
    """A deterministic classification task that stops the build (KeyboardInterrupt) once: at the first
    evaluation after ``run_dir`` records ``rungs`` allocated rungs, or at training batch ``batch``."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, data: Any, run_dir: Path, rungs: int | None = None, batch: int | None = None) -> None:
        self.task = ap.ClassificationTask(data.loader("train", shuffle=False), data.loader("val"))
        self.run_dir, self.rungs, self.batch, self.stopped = run_dir, rungs, batch, False

    def _stop(self) -> None:
        self.stopped = True
        raise KeyboardInterrupt

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        state = self.run_dir / "ladder-state.json"
        if self.rungs is not None and not self.stopped and state.is_file() \
                and len(json.loads(state.read_text())["widths"]) >= self.rungs:
            self._stop()
        return self.task.evaluate(model)

    def calibration(self) -> list:
        return self.task.calibration()

    def set_teacher(self, model: torch.nn.Module) -> None:
        self.task.set_teacher(model)

    def loss(self, model: torch.nn.Module, x: Any, y: Any) -> torch.Tensor:
        return self.task.loss(model, x, y)

    def training_batches(self) -> Iterator[tuple[Any, Any]]:
        for i, pair in enumerate(self.task.training_batches()):
            if self.batch is not None and not self.stopped and i == self.batch:
                self._stop()
            yield pair


def build(base: torch.nn.Module, data: Any, task: Any, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    model = copy.deepcopy(base)
    return model, ladder(model, data.x_val[:1], task, RUNGS, ignore=["fc"], finetune_steps=12, **kwargs)


def assert_same(a: Any, b: Any, x: torch.Tensor) -> None:
    assert [r.widths for r in a.rungs] == [r.widths for r in b.rungs]
    assert [r.metrics for r in a.rungs] == [r.metrics for r in b.rungs]
    assert a.finetune_steps == b.finetune_steps == 12 and a.evaluations == b.evaluations
    for k in range(len(a)):
        sa, sb = a.use(k).state_dict(), b.use(k).state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa), k
        a.model.eval(), b.model.eval()
        with torch.no_grad():
            assert torch.equal(a.model(x), b.model(x))


@pytest.mark.parametrize("where", ["allocation", "recovery"])
def test_a_stopped_build_resumes_to_the_ladder_of_an_uninterrupted_one(trained, tmp_path, where) -> None:
    base, data = trained
    _, reference = build(base, data, Stopping(data, tmp_path / "ref"), run_dir=tmp_path / "ref", checkpoint_every=5)
    run_dir = tmp_path / "run"
    task = Stopping(data, run_dir, rungs=1) if where == "allocation" else Stopping(data, run_dir, batch=8)
    model = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        ladder(model, data.x_val[:1], task, RUNGS, ignore=["fc"], finetune_steps=12, run_dir=run_dir,
               checkpoint_every=5)
    assert task.stopped
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())  # restored
    state = json.loads((run_dir / "ladder-state.json").read_text())
    if where == "allocation":
        assert len(state["widths"]) == 1 and state["steps"] == 0
        assert [p.name for p in run_dir.glob("ladder-rung-*")] == ["ladder-rung-001.safetensors"]
    else:  # stopped at batch 8: the checkpoint after step 5 is the one to resume from
        assert len(state["widths"]) == 2 and state["steps"] == 5
        assert sorted(p.name for p in run_dir.glob("ladder-recovery-*")) == ["ladder-recovery-000000005.safetensors"]
    _, resumed = build(base, data, Stopping(data, run_dir), run_dir=run_dir, resume=True, checkpoint_every=5)
    assert_same(resumed, reference, data.x_val[:32])
    done = json.loads((run_dir / "ladder-state.json").read_text())
    assert done["steps"] == 12 and [p.name for p in run_dir.glob("ladder-recovery-*")] == \
        ["ladder-recovery-000000012.safetensors"]


def test_resume_refuses_other_settings_and_another_model(trained, tmp_path) -> None:
    from adaprune.examples.digits import DigitsCNN

    base, data = trained
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build(base, data, Stopping(data, run_dir, rungs=1), run_dir=run_dir)
    before = (run_dir / "ladder-state.json").read_bytes()
    model = copy.deepcopy(base)
    with pytest.raises(RunDirError, match="other settings.*rungs"):
        ladder(model, data.x_val[:1], Stopping(data, run_dir), [ap.Budget(macs=0.5)], ignore=["fc"],
               finetune_steps=12, run_dir=run_dir, resume=True)
    with pytest.raises(RunDirError, match="other settings.*finetune_steps"):
        ladder(model, data.x_val[:1], Stopping(data, run_dir), RUNGS, ignore=["fc"], finetune_steps=3,
               run_dir=run_dir, resume=True)
    other = DigitsCNN(16)
    with pytest.raises(RunDirError, match="another model"):
        ladder(other, data.x_val[:1], Stopping(data, run_dir), RUNGS, ignore=["fc"], finetune_steps=12,
               run_dir=run_dir, resume=True)
    with pytest.raises(RunDirError, match="already holds a run .ladder-state.json.*--resume"):
        build(base, data, Stopping(data, run_dir), run_dir=run_dir)
    assert (run_dir / "ladder-state.json").read_bytes() == before  # nothing changed
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    _, fresh = build(base, data, Stopping(data, run_dir), run_dir=run_dir, force=True)  # starting over
    assert len(fresh) == 3 and json.loads((run_dir / "ladder-state.json").read_text())["steps"] == 12


def test_a_failure_during_recovery_restores_every_tensor(trained) -> None:
    # the recovery's optimizer updates the weights in place, the classifier's bias (never reordered)
    # included: the build keeps copies, not views, to put back
    base, data = trained
    model = copy.deepcopy(base)
    task = Stopping(data, Path("/nonexistent"), batch=6)
    with pytest.raises(KeyboardInterrupt):
        ladder(model, data.x_val[:1], task, RUNGS, ignore=["fc"], finetune_steps=12)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_full_disk_at_any_file_replacement_leaves_the_build_resumable(trained, tmp_path) -> None:
    """The disk fills up as each of the build's files is swapped in: a StorageError, the model as it was,
    and --resume ends with the ladder of an uninterrupted build."""
    import errno

    from adaprune.errors import StorageError
    from test_faults import count_points, disk_full_at

    base, data = trained
    kwargs: dict[str, Any] = {"finetune_steps": 4, "checkpoint_every": 0}

    def run(d: Path, **more: Any) -> Any:
        model = copy.deepcopy(base)
        return model, ladder(model, data.x_val[:1], Stopping(data, d), RUNGS, ignore=["fc"], run_dir=d, **kwargs, **more)

    _, reference = run(tmp_path / "ref")
    points = count_points(lambda: run(tmp_path / "count"))
    replaced = [k for k, p in enumerate(points) if p.startswith("replace ladder")]
    assert len(replaced) >= 7, points  # ordered, rung x2, recovery, state x4
    for k in replaced:
        d = tmp_path / f"k{k}"
        model = copy.deepcopy(base)
        with disk_full_at(k), pytest.raises(StorageError) as info:
            ladder(model, data.x_val[:1], Stopping(data, d), RUNGS, ignore=["fc"], run_dir=d, **kwargs)
        assert info.value.errno == errno.ENOSPC
        assert all(torch.equal(v, base.state_dict()[n]) for n, v in model.state_dict().items()), points[k]
        _, resumed = run(d, resume=True)
        assert [r.widths for r in resumed.rungs] == [r.widths for r in reference.rungs], points[k]
        assert [r.metrics for r in resumed.rungs] == [r.metrics for r in reference.rungs], points[k]


def test_resume_refuses_another_kind_of_run_and_resume_with_force(trained, tmp_path) -> None:
    from adaprune.errors import ConfigError

    base, data = trained
    x = data.x_val[:1]
    task = Stopping(data, tmp_path / "unused")
    with pytest.raises(ConfigError, match="contradict"):
        build(base, data, task, run_dir=tmp_path / "a", resume=True, force=True)
    adapt_dir = tmp_path / "adapt"
    ap.adapt(copy.deepcopy(base), x, task.task, ap.Budget(macs=0.8), ignore=["fc"], run_dir=adapt_dir, max_iterations=1)
    with pytest.raises(RunDirError, match=r"another kind of run \(state.json\)"):
        build(base, data, task, run_dir=adapt_dir, resume=True)
    ladder_dir = tmp_path / "ladder"
    build(base, data, Stopping(data, ladder_dir), run_dir=ladder_dir)
    with pytest.raises(RunDirError, match=r"another kind of run \(ladder-state.json\)"):
        ap.adapt(copy.deepcopy(base), x, task.task, ap.Budget(macs=0.8), ignore=["fc"], run_dir=ladder_dir, resume=True)
