"""Fault injection: a full disk, a kill at every write point, and two runs on one run directory.

Every file adaprune writes goes through :mod:`adaprune.fs`, whose steps are module-level
indirections: ``fs._write_all`` (the bytes), a writer callable handed to ``fs.write_atomic`` (the
weights, a plot), ``fs._fsync`` and ``fs._replace``. The tests wrap them and count the calls of an
uninterrupted run (the *write points*), then fail or kill the run at every one of them:

- disk full: the k-th point raises ``OSError(ENOSPC)`` (a write leaves half its bytes first). The
  call fails with :class:`~adaprune.errors.StorageError`, and what was on disk before is still usable:
  the previous save loads and gives the old model's outputs, the run directory resumes to the plan of
  an uninterrupted run, the previous report files are whole. One real full disk on a small tmpfs too.
- kill: in a forked child of a driver process (this file run as a script), the k-th point calls
  ``os._exit(137)`` just before or just after the real call. After each kill the directory holds a
  loadable save (the old or the new one) or a run that resumes to the uninterrupted run's plan.
- concurrency: a second :class:`RunDir` on a locked directory (same process, another process, a
  second ``adaprune adapt``) is refused with :class:`RunDirLockedError` naming the holder's pid; the
  lock is free once the holder exits, even by SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import adaprune as ap
from adaprune import fs, report
from adaprune.adapt import ControllerState
from adaprune.adapt.rundir import RunDir
from adaprune.errors import RunDirLockedError, StorageError

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
KILLED = 137


# -- a tiny model, task and run ---------------------------------------------------------------------
def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
_G = torch.Generator().manual_seed(0)
_XS, _YS = torch.randn(16, 4, generator=_G), torch.randint(0, 2, (16,), generator=_G)
BATCHES = [(_XS[:8], _YS[:8]), (_XS[8:], _YS[8:])]


def adapt(run_dir: Path, resume: bool = False, model: nn.Module | None = None) -> ap.AdaptResult:
    """The run every fault test interrupts: three steps at most, one fine-tuning step each."""
    task = ap.ClassificationTask(BATCHES, BATCHES)
    return ap.adapt(tiny() if model is None else model, X, task, ap.Budget(macs=0.3), 0.5, ignore=["2"],
                    run_dir=run_dir, resume=resume, max_iterations=3, finetune_steps=1)


def old_and_new() -> tuple[nn.Module, ap.PruneResult]:
    """The model of the previous save (unpruned, seed 1) and the result the new save writes (pruned)."""
    return tiny(1), ap.prune(tiny(2), X, ratio=0.5, ignore=["2"])


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


# -- write points ---------------------------------------------------------------------------------
_TMP = re.compile(r"^\.(.+)" + re.escape(fs.TMP_MARK) + r".*$")


def _name(path: Any) -> str:
    """The file a write point is about (a temporary file is named after its target)."""
    name = Path(str(path)).name
    m = _TMP.match(name)
    if m:
        name = m.group(1)
    return name


def _fd_name(fd: int) -> str:
    try:
        return _name(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return "?"


Hook = Callable[[int, str, str, "Callable[[], None] | None"], None]


@contextmanager
def write_points(hook: Hook) -> Iterator[list[str]]:
    """Wrap every write step of :mod:`adaprune.fs`: ``hook(k, label, when, partial)`` runs just before
    (``when="before"``) and just after (``"after"``) the k-th step; ``partial``, for a write, writes
    half of its bytes. Yields the labels of the steps seen so far (``"replace state.json"`` ...)."""
    labels: list[str] = []
    real = fs._replace, fs._fsync, fs._write_all, fs.write_atomic
    real_replace, real_fsync, real_write_all, real_atomic = real

    def point(label: str, call: Callable[[], Any], partial: Callable[[], None] | None = None) -> Any:
        k = len(labels)
        labels.append(label)
        hook(k, label, "before", partial)
        out = call()
        hook(k, label, "after", None)
        return out

    def replace(src: Any, dst: Any) -> None:
        point(f"replace {_name(dst)}", lambda: real_replace(src, dst))

    def fsync(fd: int) -> None:
        point(f"fsync {_fd_name(fd)}", lambda: real_fsync(fd))

    def write_all(fd: int, data: bytes) -> None:
        point(f"write {_fd_name(fd)}", lambda: real_write_all(fd, data),
              lambda: real_write_all(fd, data[: len(data) // 2]))

    def write_atomic(path: Any, data: Any, *, what: str = "") -> Path:
        if callable(data):
            writer = data

            def half(tmp: str) -> None:
                writer(tmp)
                os.truncate(tmp, os.path.getsize(tmp) // 2)

            def data(tmp: str) -> None:
                point(f"write {_name(tmp)}", lambda: writer(tmp), lambda: half(tmp))

        return real_atomic(path, data, what=what)

    fs._replace, fs._fsync, fs._write_all, fs.write_atomic = replace, fsync, write_all, write_atomic
    try:
        yield labels
    finally:
        fs._replace, fs._fsync, fs._write_all, fs.write_atomic = real


def count_points(run: Callable[[], Any]) -> list[str]:
    """The write points of an uninterrupted ``run()``."""
    with write_points(lambda k, label, when, partial: None) as labels:
        run()
    return list(labels)


@contextmanager
def disk_full_at(k: int) -> Iterator[list[str]]:
    """The k-th write point fails as a full disk does: ``OSError(ENOSPC)`` (a write leaves half of
    its bytes first)."""

    def hook(i: int, label: str, when: str, partial: Callable[[], None] | None) -> None:
        if i == k and when == "before":
            if partial is not None:
                partial()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with write_points(hook) as labels:
        yield labels


def killed_at(k: int, when: str) -> Hook:
    def hook(i: int, label: str, moment: str, partial: Callable[[], None] | None) -> None:
        if i == k and moment == when:
            os._exit(KILLED)

    return hook


# -- disk full, injected at every write point ---------------------------------------------------------
def test_disk_full_at_every_point_of_a_save_keeps_the_previous_save(tmp_path):
    old, new = old_and_new()
    want_old, want_new = outputs(old), outputs(new.model)
    probe = tmp_path / "probe"
    ap.save(old, probe)
    points = count_points(lambda: ap.save(new, probe))
    commit = points.index(f"replace {ap.io.META}")  # the commit point: adaprune.json names the new files
    assert 0 < commit < len(points) - 1 and any(p.startswith("write model") for p in points[:commit]), points
    failures = 0
    for k, label in enumerate(points):
        d = tmp_path / f"k{k}"
        ap.save(old, d)
        failed = None
        with disk_full_at(k):
            try:
                ap.save(new, d)
            except OSError as exc:  # a StorageError (an OSError too): checked below
                failed = exc
        if failed is not None:
            failures += 1
            assert isinstance(failed, StorageError), (label, failed)
            assert failed.errno == errno.ENOSPC and "\n" not in str(failed), (label, failed)
        committed = failed is None or k > commit
        got = outputs(ap.load(d, tiny))
        assert torch.equal(got, want_new if committed else want_old), f"disk full at {k}: {label}"
        assert not [n for n in os.listdir(d) if fs.is_temporary(n)], f"temporary files left at {k}: {label}"
        ap.save(new, d)  # and the directory takes the next save
        assert torch.equal(outputs(ap.load(d, tiny)), want_new)
    assert failures == len(points) - points.count("fsync probe")  # only a directory's fsync is best effort


def test_a_failed_rename_after_the_commit_point_is_a_storage_error(tmp_path):
    old, new = old_and_new()
    ap.save(old, tmp_path)
    points = count_points(lambda: ap.save(new, tmp_path))
    after = next(k for k, p in enumerate(points) if k > points.index(f"replace {ap.io.META}") and p.startswith("replace"))
    ap.save(old, tmp_path)
    with disk_full_at(after), pytest.raises(StorageError):
        ap.save(new, tmp_path)


def test_disk_full_at_every_point_of_an_adapt_run_leaves_it_resumable(tmp_path):
    reference = adapt(tmp_path / "straight").plan.to_dict()
    points = count_points(lambda: adapt(tmp_path / "count"))
    assert sum(p == "replace state.json" for p in points) >= 3, points
    failures = 0
    for k, label in enumerate(points):
        d = tmp_path / f"k{k}"
        model = tiny()
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with disk_full_at(k):
            try:
                adapt(d, model=model)
            except StorageError as exc:
                failures += 1
                assert exc.errno == errno.ENOSPC, (label, exc)
                now = model.state_dict()
                assert all(torch.equal(now[n], t) for n, t in before.items()), f"model changed at {k}: {label}"
        if (d / "state.json").exists():
            RunDir(d).load()  # the last committed state is whole
        resumed = adapt(d, resume=True)
        assert resumed.plan.to_dict() == reference, f"disk full at {k}: {label}"
    assert failures == len(points) - points.count("fsync count")  # only a directory's fsync is best effort


def _small_report(title: str) -> dict[str, Any]:
    """A valid report with one plot (the widths), so rendering it is quick."""
    return {"format": "adaprune-report", "version": 1, "title": title, "metric": "accuracy", "message": title,
            "before": {}, "after": {}, "costs_before": {"macs": 10.0}, "costs_after": {"macs": 5.0},
            "layers": [{"name": "fc", "kind": "Linear", "before": 8, "after": 4}]}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_while_the_cli_writes_the_report(tmp_path):
    """``adaprune report RUN_DIR`` on a full disk: exit 1 with one line naming StorageError; every
    report file is its previous version or its new one, whole."""
    from typer.testing import CliRunner

    from adaprune.cli import app
    from adaprune.cli.jobs import REPORT_NAMES

    new = report.load_json(report.save_json(_small_report("new"), tmp_path / "new.json"))
    expected = tmp_path / "expected"
    report.render(new, expected)
    want_new = _files(expected)

    def fresh(d: Path) -> dict[str, bytes]:
        RunDir(d).open(names=REPORT_NAMES).close()
        report.write(report.load_json(report.save_json(_small_report("old"), d / report.JSON)), d)
        report.save_json(new, d / report.JSON)
        return {k: v for k, v in _files(d).items() if k.startswith(("report.", "plots"))}

    probe = tmp_path / "probe"
    fresh(probe)
    points = count_points(lambda: CliRunner().invoke(app, ["report", str(probe)]))
    assert any(p.startswith("replace report.html") for p in points), points
    failures = 0
    for k, label in enumerate(points):
        d = tmp_path / f"k{k}"
        want_old = fresh(d)
        with disk_full_at(k):
            result = CliRunner().invoke(app, ["report", str(d)])
        if result.exit_code != 0:
            assert result.exit_code == 1, (label, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: StorageError"), (label, result.output)
        failures += result.exit_code != 0
        for name, old_bytes in want_old.items():
            if name == report.JSON:
                continue
            now = (d / name).read_bytes()
            assert now in (old_bytes, want_new[name]), f"{name} is neither version after disk full at {k}: {label}"
    assert failures >= len(points) // 2  # the fault reached the command (fsyncs of directories are best effort)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 256 kB tmpfs holding a save of a tiny model (seed 1); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        ap.save(tiny(1), mnt / "save")
        yield mnt / "save"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


BIG = (4, 1 << 16)  # a Linear(4, 65536) + Linear(65536, 2): 1.3 MB of weights, more than the disk


def big() -> nn.Module:
    return nn.Sequential(nn.Linear(*BIG), nn.ReLU(), nn.Linear(BIG[1], 2))


def test_a_real_full_disk_keeps_the_previous_save(small_disk):
    with pytest.raises(StorageError) as info:  # safetensors' own error for a full disk, too
        ap.save(big(), small_disk)
    assert info.value.errno == errno.ENOSPC and "disk space" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(outputs(ap.load(small_disk, tiny)), outputs(tiny(1)))
    assert not [n for n in os.listdir(small_disk) if fs.is_temporary(n)]
    ap.save(tiny(2), small_disk)  # space is free again: the next save fits
    assert torch.equal(outputs(ap.load(small_disk, tiny)), outputs(tiny(2)))


# -- a kill at every write point ------------------------------------------------------------------------
def save_scenario(d: Path, hook: Hook) -> list[str]:
    """A save replacing an existing one (only the replacing save is watched)."""
    old, new = old_and_new()
    ap.save(old, d)
    with write_points(hook) as labels:
        ap.save(new, d)
    return labels


def adapt_scenario(d: Path, hook: Hook) -> list[str]:
    with write_points(hook) as labels:
        adapt(d)
    return labels


SCENARIOS = {"save": save_scenario, "adapt": adapt_scenario}


def drive(name: str, root: Path) -> None:
    """The driver (this file run as a script): count the scenario's write points in an uninterrupted
    run, then, for every point and both sides of it, fork a child that is killed there. One import
    of torch for all the kills; ``root/points.json`` records the points and the children's exit codes."""
    torch.set_num_threads(1)
    scenario = SCENARIOS[name]
    labels = scenario(root / "uninterrupted", lambda *args: None)
    exits = {}
    for k in range(len(labels)):
        for when in ("before", "after"):
            d = root / f"{k:03d}-{when}"
            pid = os.fork()
            if pid == 0:  # the child: killed at point k, or exits 0 / 3 if it never gets there
                code = 3
                try:
                    signal.alarm(120)
                    scenario(d, killed_at(k, when))
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            exits[d.name] = os.waitstatus_to_exitcode(status)
    (root / "points.json").write_text(json.dumps({"labels": labels, "exits": exits}))


@pytest.fixture(scope="module")
def kills(tmp_path_factory) -> Iterator[dict[str, Callable[[], tuple[Path, list[str], dict[str, int]]]]]:
    """The drivers, each in its own process; ``kills[name]()`` waits for one. Both start at once, so
    they overlap, except under pytest-xdist, where the two kill tests may run on different workers
    and each starts only its own."""
    procs: dict[str, tuple[Path, subprocess.Popen[str]]] = {}

    def start(name: str) -> None:
        if name not in procs:
            root = tmp_path_factory.mktemp(f"kill-{name}")
            procs[name] = (root, subprocess.Popen([sys.executable, __file__, name, str(root)], env=ENV,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def waiter(name: str) -> Callable[[], tuple[Path, list[str], dict[str, int]]]:
        def wait() -> tuple[Path, list[str], dict[str, int]]:
            start(name)
            root, proc = procs[name]
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out
            points = json.loads((root / "points.json").read_text())
            return root, points["labels"], points["exits"]

        return wait

    if "PYTEST_XDIST_WORKER" not in os.environ:
        for name in SCENARIOS:
            start(name)
    yield {name: waiter(name) for name in SCENARIOS}
    for _, proc in procs.values():
        proc.kill()


def _fingerprint(d: Path) -> tuple[tuple[str, str], ...]:
    """What a directory holds (temporary files aside): names and contents."""
    return tuple((str(p.relative_to(d)), hashlib.sha256(p.read_bytes()).hexdigest())
                 for p in sorted(d.rglob("*")) if p.is_file() and not fs.is_temporary(p.name)
                 and p.name != ".adaprune-lock")


def test_a_save_killed_at_any_write_point_leaves_the_old_or_the_new_save(kills):
    root, labels, exits = kills["save"]()
    commit = labels.index(f"replace {ap.io.META}")
    assert len(labels) >= 8 and set(exits.values()) == {KILLED}, exits  # every point was reached
    old, new = old_and_new()
    want = {"old": outputs(old), "new": outputs(new.model)}
    for k, label in enumerate(labels):
        for when in ("before", "after"):
            d = root / f"{k:03d}-{when}"
            committed = k > commit or (k == commit and when == "after")
            got = outputs(ap.load(d, tiny))
            assert torch.equal(got, want["new" if committed else "old"]), f"killed {when} {k}: {label}"
            ap.save(new, d)  # and the directory takes the next save
            assert torch.equal(outputs(ap.load(d, tiny)), want["new"]), f"killed {when} {k}: {label}"


def test_an_adapt_run_killed_at_any_write_point_resumes_to_the_same_plan(kills, tmp_path):
    reference = adapt(tmp_path / "straight")
    root, labels, exits = kills["adapt"]()
    assert sum(p == "replace state.json" for p in labels) >= 3 and set(exits.values()) == {KILLED}, exits
    checked: dict[tuple[tuple[str, str], ...], str] = {}
    for k, label in enumerate(labels):
        for when in ("before", "after"):
            d = root / f"{k:03d}-{when}"
            seen = _fingerprint(d)
            if seen in checked:  # the same files as a directory already resumed: the same outcome
                continue
            checked[seen] = d.name
            if (d / "state.json").exists():
                RunDir(d).load()  # whole and valid
            resumed = adapt(d, resume=True)
            assert resumed.plan.to_dict() == reference.plan.to_dict(), f"killed {when} {k}: {label}"
            assert [h.accepted for h in resumed.history] == [h.accepted for h in reference.history]
    assert len(checked) >= len(labels) // 2  # most kills leave a different directory


def test_a_run_killed_while_writing_its_mark_resumes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / f"..adaprune-run{fs.TMP_MARK}x1y2z3").write_bytes(b'{"format": "adap')  # what the kill left
    reference = adapt(tmp_path / "straight")
    assert adapt(run, resume=True).plan.to_dict() == reference.plan.to_dict()


# -- two runs, one run directory ------------------------------------------------------------------
def test_a_second_open_in_the_same_process_is_refused(tmp_path):
    run = tmp_path / "run"
    first = RunDir(run).open()
    try:
        with pytest.raises(RunDirLockedError, match=rf"process {os.getpid()} "):
            RunDir(run).open()
    finally:
        first.close()
    RunDir(run).open().close()  # free once the holder closes it


def test_a_busy_run_dir_is_refused_as_busy_even_when_it_holds_a_run(tmp_path):
    first = RunDir(tmp_path / "run").open()
    try:
        first.save(ControllerState(), tiny())
        with pytest.raises(RunDirLockedError):
            RunDir(tmp_path / "run").open()
    finally:
        first.close()


HOLDER = """
import sys, time
from adaprune.adapt.rundir import RunDir
RunDir(sys.argv[1]).open()
print("holding", flush=True)
time.sleep(600)
"""


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        with pytest.raises(RunDirLockedError) as info:
            RunDir(run).open()
        assert f"process {child.pid} " in str(info.value) and "\n" not in str(info.value)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        RunDir(run).open().close()  # the kernel dropped the dead holder's lock
    finally:
        child.kill()


GATE = """
import os, time
import adaprune as ap


def make(train, val, gate):
    task = ap.ClassificationTask(train, val)
    finetune = task.finetune

    def gated(model, steps):
        open(gate + ".waiting", "w").close()
        deadline = time.time() + 300
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.05)
        finetune(model, steps)

    task.finetune = gated
    return task
"""


def test_a_second_cli_run_on_a_busy_run_dir_exits_2_naming_the_holder(tmp_path):
    """While one ``adaprune adapt`` holds the run directory (its task waits at a gate), a second one,
    plain, with --resume or with --force, exits 2 with one line naming the holder's pid, and deletes
    nothing; the first then finishes."""
    (tmp_path / "gate.py").write_text(GATE)
    gate = tmp_path / "open"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"factory": "adaprune.examples.digits:DigitsCNN", "kwargs": {"width": 4}},
        "data": {"kind": "digits", "batch_size": 64},
        "task": {"factory": "gate.py:make", "kwargs": {"gate": str(gate)}},
        "budget": {"macs": 0.5}, "tolerance": 0.5, "ignore": ["fc"], "run_dir": "run",
        "options": {"finetune_steps": 1, "max_iterations": 2}, "report": {"latency": False, "onnx": False},
    }))
    cmd = [sys.executable, "-m", "adaprune.cli", "adapt", str(cfg)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seconds: list[subprocess.Popen[str]] = []
    try:
        deadline = time.time() + 240
        while not Path(f"{gate}.waiting").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate(timeout=30)
            time.sleep(0.1)
        held = _fingerprint(tmp_path / "run")
        seconds = [subprocess.Popen(cmd + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=ENV) for flags in ([], ["--resume"], ["--force"])]
        for flags, second in zip(([], ["--resume"], ["--force"]), seconds):
            _, err = second.communicate(timeout=240)
            lines = err.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flags, err)
            assert f"process {first.pid} " in lines[0] and "in use by another run" in lines[0], (flags, err)
        assert _fingerprint(tmp_path / "run") == held  # the refused runs wrote and deleted nothing
        gate.touch()
        _, err = first.communicate(timeout=240)
        assert first.returncode == 0, err
        assert json.loads((tmp_path / "run" / "state.json").read_text())["done"] is True
    finally:
        for p in (first, *seconds):
            p.kill()


if __name__ == "__main__":  # the kill driver: python tests/test_faults.py save|adapt ROOT
    drive(sys.argv[1], Path(sys.argv[2]))
