"""Executors: sensitivity and adapt's probes on Ray workers give what the local executor gives, a killed worker
is restarted and its candidate run again, and the choice of executor is checked."""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaprune as ap
from adaprune.adapt.alternatives import WorkerThreadsWarning
from adaprune.errors import ArgumentTypeError, ConfigError, NonFiniteError
from adaprune.plan import plan_from_choice
from adaprune.scale import Failed, LocalExecutor, get_executor

ray = pytest.importorskip("ray")
# one Ray cluster per test process, its tests on one xdist worker (make test runs --dist loadgroup)
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.usefixtures("one_thread")]

torch.manual_seed(0)
X = torch.randn(96, 3, 12, 12)
Y = torch.randint(0, 5, (96,))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


class ShuffledLoss:
    """The loss over shuffled batches, dropping the last partial one: its value depends on the generator's
    state, so only evaluations started from the same seed agree. Optionally records the process it ran in,
    and kills that process once (a worker dying in the middle of a call) when ``marker`` does not exist."""

    def __init__(self, log: Path | None = None, marker: Path | None = None) -> None:
        self.log, self.marker, self.driver = log, marker, os.getpid()

    def __call__(self, model: nn.Module) -> float:
        if self.log is not None:
            (self.log / f"{os.getpid()}-{os.urandom(4).hex()}").touch()
        if self.marker is not None and os.getpid() != self.driver and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        loader = DataLoader(TensorDataset(X, Y), batch_size=40, shuffle=True, drop_last=True)
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(model(a), b)) for a, b in loader)


@pytest.fixture(scope="module")
def executor():
    with ap.RayExecutor(workers=2) as ex:
        yield ex


def table(result: ap.Sensitivity) -> list:
    return [(r.cluster, r.ratio, r.metric) for r in result.rows]


def test_sensitivity_on_ray_is_the_local_table_and_runs_on_both_workers(executor, tmp_path) -> None:
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local = ap.sensitivity(model, X[:2], ShuffledLoss(), ratios=(0.25, 0.5), cluster=False)
    log = tmp_path / "log"
    log.mkdir()
    remote = ap.sensitivity(model, X[:2], ShuffledLoss(log), ratios=(0.25, 0.5), cluster=False, executor=executor)
    assert remote.baseline == local.baseline and table(remote) == table(local)
    assert len(table(local)) == 4 and len({m for _, _, m in table(local)}) == 4
    pids = {p.name.split("-")[0] for p in log.iterdir()}
    assert len(list(log.iterdir())) == 5  # the baseline and 4 probes, each evaluated once
    assert pids == {str(p) for p in executor.pids()} and str(os.getpid()) not in pids
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_without_the_shared_seed_the_tables_would_differ() -> None:
    """What the equality above rests on: the evaluation draws random numbers, so unseeded calls differ."""
    model = cnn()
    assert ShuffledLoss()(model) != ShuffledLoss()(model)


def test_a_killed_worker_is_restarted_and_the_table_is_the_same(executor, tmp_path) -> None:
    model = cnn()
    local = ap.sensitivity(model, X[:2], ShuffledLoss(), ratios=(0.25, 0.5), cluster=False)
    before = set(executor.pids())
    marker = tmp_path / "died"
    remote = ap.sensitivity(model, X[:2], ShuffledLoss(marker=marker), ratios=(0.25, 0.5), cluster=False,
                            executor=executor)
    assert marker.exists()  # a worker did die, in the middle of the call
    assert table(remote) == table(local) and remote.baseline == local.baseline
    after = set(executor.pids())
    assert len(after) == 2 and len(after - before) == 1  # one of them is a new process


class Refuses:
    """Evaluates to a number, except with more than half of the first conv's channels zero: a typed error."""

    def __call__(self, model: nn.Module) -> float:
        alive = int((model[0].weight.detach().flatten(1).abs().sum(1) > 0).sum())
        if alive <= 6:
            raise NonFiniteError("the loss is NaN")
        return float(alive)


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_an_evaluation_error_comes_back_as_its_type_or_as_failed(executor, kind) -> None:
    runner = LocalExecutor() if kind == "local" else executor
    model = cnn()
    graph = ap.trace(model, X[:2], ignore=[model[6]])
    conv = next(g for g in graph.groups if any(s.module == "0" for s in g.slots))
    plans = [ap.Plan(), plan_from_choice(ap.Graph([conv]), {conv.name: list(range(6))})]
    assert runner.map(model, plans[:1], Refuses()) == [12.0]
    got = runner.map(model, plans, Refuses(), catch=(NonFiniteError,))
    assert got[0] == 12.0 and isinstance(got[1], Failed) and isinstance(got[1].error, NonFiniteError)
    with pytest.raises(NonFiniteError, match="NaN"):
        runner.map(model, plans, Refuses())


def small_task() -> ap.ClassificationTask:
    # (shuffled by the global generator, which adapt seeds per step: a resumed run draws the same batches)
    train = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(X, Y), batch_size=48)
    return ap.ClassificationTask(train, val, lr=0.01)


class Wrapped:
    """A protocol task (a ClassificationTask inside) whose evaluation (or with ``in_finetune`` its fine-tuning)
    kills its process once on a worker (with ``marker``), or whose ``stop_at``-th fine-tuning is interrupted (a
    run stopped in the middle). Where it ran (a process id per call) goes to ``log`` when given."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, marker: Path | None = None, stop_at: int = 0, in_finetune: bool = False,
                 log: Path | None = None) -> None:
        self.inner, self.marker, self.driver = small_task(), marker, os.getpid()
        self.stop_at, self.tunes, self.in_finetune, self.log = stop_at, 0, in_finetune, log

    def dies(self, where: bool) -> None:
        if self.log is not None:
            (self.log / f"{os.getpid()}-{os.urandom(4).hex()}").touch()
        if where and self.marker is not None and os.getpid() != self.driver and not self.marker.exists():
            self.marker.touch()
            os._exit(1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.dies(not self.in_finetune)
        return self.inner.evaluate(model)

    def finetune(self, model: nn.Module, steps: int) -> None:
        self.dies(self.in_finetune)
        self.tunes += 1
        if self.tunes == self.stop_at:
            raise KeyboardInterrupt
        self.inner.finetune(model, steps)

    def calibration(self):
        return self.inner.calibration()

def run(task, tmp_path: Path, name: str, **kw) -> ap.AdaptResult:
    options = {"tolerance": 0.5, "max_iterations": 3, "finetune_steps": 2, "probe_budget": 4, "seed": 3}
    return ap.adapt(cnn(), X[:2], task, ap.Budget(macs=0.5), ignore=["6"], run_dir=tmp_path / name,
                    **{**options, **kw})


def steps(result: ap.AdaptResult) -> list:
    return [(h.accepted, h.metrics, h.costs) for h in result.history]


def test_adapt_on_ray_gives_the_local_plan_and_history_even_when_a_worker_dies(executor, tmp_path) -> None:
    local = run(small_task(), tmp_path, "local")
    remote = run(small_task(), tmp_path, "ray", executor=executor)
    assert remote.plan.to_json() == local.plan.to_json() and not local.plan.is_empty
    assert steps(remote) == steps(local) and remote.evaluations == local.evaluations
    marker = tmp_path / "died"
    local = run(Wrapped(), tmp_path, "local2")
    dying = run(Wrapped(marker), tmp_path, "dying", executor=executor)
    assert marker.exists() and dying.plan.to_json() == local.plan.to_json() and steps(dying) == steps(local)


def test_a_steps_alternative_sizes_run_on_the_workers_to_the_local_run_even_when_one_dies(executor, tmp_path) -> None:
    # (adaprune.adapt.alternatives: each size is cut, fine-tuned and measured on a worker)
    options = {"alternatives": 3, "step": 0.6, "max_step": 0.6, "tolerance": 0.05, "confidence": 0}
    local = run(Wrapped(), tmp_path, "local", **options)
    assert len(local.history) > len({h.step for h in local.history})  # several sizes in a step
    log, marker = tmp_path / "log", tmp_path / "died"
    log.mkdir()
    remote = run(Wrapped(marker, in_finetune=True, log=log), tmp_path, "ray", executor=executor, **options)
    assert marker.exists() and remote.plan.to_json() == local.plan.to_json()
    assert steps(remote) == steps(local) and remote.evaluations == local.evaluations
    assert remote.optimizer_steps == local.optimizer_steps == 2 * len(local.history)
    assert len({p.name.split("-")[0] for p in log.iterdir()} - {str(os.getpid())}) >= 2  # fine-tuned on the workers


def test_a_steps_sizes_on_one_thread_workers_give_the_run_of_a_caller_at_two(executor) -> None:
    # (each size runs at the caller's thread count wherever it runs: fine-tuning compounds last-bit differences)
    torch.manual_seed(0)
    x = torch.randn(160, 3, 12, 12)
    y = (x.mean((2, 3)) @ torch.randn(3, 5)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))

    def task() -> ap.ClassificationTask:
        return ap.ClassificationTask(DataLoader(TensorDataset(x[:112], y[:112]), batch_size=16, shuffle=True),
                                     DataLoader(TensorDataset(x[112:], y[112:]), batch_size=48), lr=0.01)

    torch.manual_seed(2)
    task().finetune(model, 150)
    options = {"tolerance": 0.02, "ignore": ["8"], "alternatives": 2, "step": 0.6, "max_step": 0.6,
               "finetune_steps": 20, "max_iterations": 3, "probe_budget": 4, "confidence": 0, "seed": 1}
    torch.set_num_threads(2)  # (the one_thread fixture puts it back)
    local = ap.adapt(copy.deepcopy(model), x[:2], task(), ap.Budget(macs=0.05), **options)
    with pytest.warns(WorkerThreadsWarning, match=r"RayExecutor\(threads=2\)") as caught:  # (1 CPU reserved each)
        remote = ap.adapt(copy.deepcopy(model), x[:2], task(), ap.Budget(macs=0.05), executor=executor, **options)
    assert [w.filename for w in caught if w.category is WorkerThreadsWarning] == [__file__]  # once, at the call
    assert len(local.history) > len({h.step for h in local.history})
    assert [h.metrics for h in remote.history] == [h.metrics for h in local.history]
    assert remote.plan.to_json() == local.plan.to_json()


class Unpickled(Wrapped):
    """A task that notes in ``loads`` each time a process unpickles it (a worker loading it from the object store)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        (self.loads / f"{os.getpid()}-{os.urandom(4).hex()}").touch()


def test_a_worker_loads_the_task_once_for_the_probes_and_once_for_the_sizes(executor, tmp_path) -> None:
    # (it keeps the last few functions: the probes' and the sizes' no longer evict each other every step)
    log = tmp_path / "unpickled"
    log.mkdir()
    task = Unpickled()
    task.loads = log
    result = run(task, tmp_path, "loads", executor=executor, alternatives=2, step=0.15, max_step=0.15, tolerance=0.5,
                 confidence=0, max_iterations=4)
    assert len({h.step for h in result.history}) >= 3
    loads: dict[str, int] = {}
    for p in log.iterdir():
        loads[p.name.split("-")[0]] = loads.get(p.name.split("-")[0], 0) + 1
    assert loads and max(loads.values()) <= 2, loads


def test_a_run_stopped_on_ray_resumes_locally_to_the_same_plan(executor, tmp_path) -> None:
    whole = run(Wrapped(), tmp_path, "whole")
    with pytest.raises(KeyboardInterrupt):
        run(Wrapped(stop_at=2), tmp_path, "parts", executor=executor)
    resumed = run(Wrapped(), tmp_path, "parts", resume=True)
    assert len(whole.history) > 1 and resumed.plan.to_json() == whole.plan.to_json()
    assert steps(resumed) == steps(whole)


def test_the_executor_is_checked() -> None:
    assert isinstance(get_executor(None)[0], LocalExecutor) and get_executor("local")[1]
    ex = LocalExecutor()
    assert get_executor(ex) == (ex, False)
    with pytest.raises(ConfigError, match="'local', 'ray'"):
        get_executor("dask")
    with pytest.raises(ArgumentTypeError, match="executor="):
        ap.sensitivity(cnn(), X[:2], ShuffledLoss(), executor=3)
    with pytest.raises(ConfigError, match="workers"):
        ap.RayExecutor(workers=0)
    with pytest.raises(ArgumentTypeError, match="threads"):
        ap.RayExecutor(threads=1.5)


def test_without_ray_installed_the_message_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"adaprune\[ray\]"):
        ap.RayExecutor(workers=1).map(cnn(), [ap.Plan()], ShuffledLoss())


def test_a_cluster_too_small_for_the_workers_is_refused(executor) -> None:
    executor.pids()  # (the cluster is up)
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match=f"needs {cpus + 1} CPUs"):
        ap.RayExecutor(workers=cpus + 1).pids()


def test_ladder_allocates_its_rungs_on_ray_as_it_does_here(executor) -> None:
    rungs = [ap.Budget(macs=0.6), ap.Budget(macs=0.3)]
    local = ap.ladder(cnn(), X[:2], small_task(), rungs, tolerance=0.5, ignore=["6"])
    remote = ap.ladder(cnn(), X[:2], small_task(), rungs, tolerance=0.5, ignore=["6"], executor=executor)
    assert [r.widths for r in remote.rungs] == [r.widths for r in local.rungs]
    assert [r.metrics for r in remote.rungs] == [r.metrics for r in local.rungs]
    with pytest.raises(ConfigError, match="ladder\\(executor="):
        ap.ladder(cnn(), X[:2], small_task(), rungs, ignore=["6"], allocation={"executor": "ray"})


class RungLog:
    """A protocol task (a ClassificationTask inside) that records, per evaluation, the process it ran in and
    the first convolution's width (an exported rung is narrower than the masked full model a probe is)."""

    metric, higher_is_better = "accuracy", True

    def __init__(self, log: Path) -> None:
        self.inner, self.log = small_task(), log
        self.lr = self.inner.lr  # (the ladder's recovery reads it through as_task's adapter)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        start = time.monotonic()
        if model[0].weight.shape[0] < 12:  # a narrow rung: take long enough that two at once overlap
            time.sleep(1.0)
        (self.log / f"{os.getpid()}-{model[0].weight.shape[0]}-{os.urandom(4).hex()}").write_text(
            f"{start} {time.monotonic()}")
        return self.inner.evaluate(model)

    def training_batches(self):
        return self.inner.training_batches()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner.loss(model, x, y)

    def calibration(self):
        return self.inner.calibration()

def test_a_ladders_rungs_are_evaluated_on_the_workers_with_their_own_statistics(executor, tmp_path) -> None:
    """With BatchNorm each rung has its own statistics after the joint recovery: the workers evaluate each
    rung exported with them, and the metrics are those measured here in place."""
    def bn_cnn() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                             nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 5))

    rungs = [ap.Budget(macs=0.6), ap.Budget(macs=0.3)]
    local = ap.ladder(bn_cnn(), X[:2], small_task(), rungs, tolerance=0.5, ignore=["7"], finetune_steps=6)
    log = tmp_path / "log"
    log.mkdir()
    remote = ap.ladder(bn_cnn(), X[:2], RungLog(log), rungs, tolerance=0.5, ignore=["7"], finetune_steps=6,
                       executor=executor)
    assert [r.widths for r in remote.rungs] == [r.widths for r in local.rungs]
    assert [r.metrics for r in remote.rungs] == [r.metrics for r in local.rungs]
    assert remote.evaluations == local.evaluations
    seen = sorted((float(a), int(pid), int(w), float(b)) for pid, w, a, b in
                  ((*f.name.split("-")[:2], *f.read_text().split()) for f in log.iterdir()))
    last = seen[-3:]  # the rungs' own evaluations come last, after the joint recovery
    assert sorted(w for _, _, w, _ in last) == sorted(r.widths["0"] for r in remote.rungs)
    assert all(pid != os.getpid() for _, pid, _, _ in last)  # on the workers
    (_, _, _, end), (start, _, _, _) = [r for r in last if r[2] < 12]
    assert start < end  # the two smaller rungs at once (monotonic clocks of one machine)
