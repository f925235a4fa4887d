"""Files adaprune reads and writes: atomic, never through a symlink, regular files only, bounded, typed errors.

Each test failed before ``adaprune.fs`` (the issue's families 1, 5 and 6).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune import fs
from adaprune.cli.config import CliError, load_config
from adaprune.errors import AdapruneError, ConfigError, FileFormatError, StorageError
from adaprune.io import META, PLAN, WEIGHTS, LoadError


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body takes longer than ``seconds``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(*_: object) -> None:
        raise TimeoutError(f"took more than {seconds} s: a read that never ends?")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def pruned(seed: int = 0) -> ap.PruneResult:
    model = net(seed)
    return ap.prune(model, torch.randn(2, 4), ratio=0.5, ignore=[model[2]])


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))


# -- writing ---------------------------------------------------------------------------------------
def test_save_replaces_planted_symlinks_instead_of_writing_through_them(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    out = tmp_path / "out"
    ap.save(pruned(), out)
    (out / PLAN).unlink()
    (out / PLAN).symlink_to(victim)
    ap.save(pruned(1), out)
    assert victim.read_text() == "precious"
    assert not (out / PLAN).is_symlink()
    ap.load(out, net)
    (out / META).unlink()
    (out / META).symlink_to(victim)  # metadata that is not adaprune's: the save is not replaced at all
    with pytest.raises(ConfigError, match="did not write"):
        ap.save(pruned(2), out)
    assert victim.read_text() == "precious"


def test_save_over_a_previous_save_leaves_no_temporary_files(tmp_path):
    out = tmp_path / "out"
    ap.save(pruned(0), out)
    res = ap.save(pruned(1), out)
    assert sorted(p.name for p in res.iterdir()) == [META, WEIGHTS, PLAN]
    meta = json.loads((out / META).read_text())
    assert meta["weights_file"] == WEIGHTS and meta["plan_file"] == PLAN


def test_save_does_not_overwrite_weights_it_did_not_write(tmp_path):
    (tmp_path / WEIGHTS).write_bytes(b"the user's own checkpoint")
    with pytest.raises(ConfigError, match="did not write"):
        ap.save(pruned(), tmp_path)
    assert (tmp_path / WEIGHTS).read_bytes() == b"the user's own checkpoint"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs, "_fsync", full)
    with pytest.raises(StorageError, match="No space left on device.*previous version is unchanged"):
        fs.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_save_interrupted_after_its_commit_point_loads_the_new_model(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ap.save(pruned(0), out)
    new = pruned(1)
    renames = []
    real = fs._replace

    def stop_at_first_rename_into_place(src: object, dst: object) -> None:
        if Path(str(dst)).name == WEIGHTS and not renames:
            renames.append(dst)
            raise KeyboardInterrupt  # a kill just after adaprune.json named the new files
        real(src, dst)

    monkeypatch.setattr(fs, "_replace", stop_at_first_rename_into_place)
    with pytest.raises(KeyboardInterrupt):
        ap.save(new, out)
    monkeypatch.setattr(fs, "_replace", real)
    loaded = ap.load(out, net)
    torch.testing.assert_close(loaded(X), new.model(X))
    ap.save(pruned(2), out)  # the next save finishes the interrupted one first
    assert sorted(p.name for p in out.iterdir()) == [META, WEIGHTS, PLAN]


def test_export_onnx_into_a_missing_directory_is_a_typed_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        ap.export_onnx(net(), torch.randn(1, 4), tmp_path / "nope" / "m.onnx")


# -- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("name", [WEIGHTS, PLAN, META])
def test_load_reads_only_regular_files(tmp_path, kind, name):
    out = tmp_path / "out"
    ap.save(pruned(), out)
    (out / name).unlink()
    if kind == "fifo":
        os.mkfifo(out / name)
    elif kind == "dev-zero":
        (out / name).symlink_to("/dev/zero")
    else:
        (out / name).mkdir()
    with within(20), pytest.raises(LoadError):
        ap.load(out, net)


def test_non_utf8_and_deeply_nested_files_are_one_typed_error(tmp_path):
    out = tmp_path / "out"
    ap.save(pruned(), out)
    (out / META).write_bytes(b'{"format": "adaprune", "\xff\xfe": 1}')
    with pytest.raises(LoadError, match="not UTF-8"):
        ap.load(out, net)
    (out / META).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LoadError, match="nested too deeply|not valid JSON"):
        ap.load(out, net)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"weights_sha256": 5}, "weights_sha256"),
        ({"params": "many"}, "params"),
        ({"layers": []}, "layers"),
        ({"weights_file": "../../etc/passwd"}, "weights_file"),
        ({"format_version": 2}, "format_version"),
    ],
)
def test_metadata_of_the_wrong_shape_names_the_field(tmp_path, change, field):
    out = tmp_path / "out"
    ap.save(pruned(), out)
    meta = json.loads((out / META).read_text())
    meta.update(change)
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(LoadError, match=field):
        ap.load(out, net)


def test_reads_are_bounded(tmp_path):
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(fs.MAX_JSON_BYTES + 1)
    with pytest.raises(FileFormatError, match="more than"):
        fs.read_json(big)


# -- configs ---------------------------------------------------------------------------------------
BOMB = """
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
model: {factory: "torchvision:resnet18", kwargs: {x: *h}}
data: {kind: digits}
budget: {macs: *h}
"""


def test_a_yaml_alias_bomb_fails_in_a_second_with_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with within(10), pytest.raises(CliError, match="expands to more than") as err:
        load_config(path)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_a_huge_config_value_is_shown_truncated(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("model: {factory: 'torchvision:resnet18'}\ndata: {kind: digits}\ntolerance: '" + "x" * 500_000 + "'\n")
    with within(10), pytest.raises(CliError) as err:
        load_config(path)
    assert "tolerance" in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize("content", [b"model: \xff\xfe\n", "x: [" * 5000])
def test_unreadable_configs_are_one_typed_line(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with within(10), pytest.raises(AdapruneError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_damaged_sensitivity_cache_is_recomputed_and_rewritten(tmp_path):
    model = net()
    cache = tmp_path / "cache.json"
    cache.write_bytes(b"\xff not json")
    evaluate = lambda m: float(-m(X).abs().mean())
    with pytest.warns(UserWarning, match="ignoring the sensitivity cache"):
        first = ap.sensitivity(model, X, evaluate, [0.5], ignore=[model[2]], cache=cache)
    data = json.loads(cache.read_text())
    assert set(data) == {"fingerprint", "results"}
    again = ap.sensitivity(model, X, evaluate, [0.5], ignore=[model[2]], cache=cache)
    assert again.rows == first.rows


def test_written_files_get_the_usual_permissions_and_keep_their_own(tmp_path):
    import stat

    umask = os.umask(0)
    os.umask(umask)
    new = fs.write_text(tmp_path / "new.json", "{}")
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    fs.write_text(kept, "[]")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_write_never_replaces_a_device_a_fifo_or_a_directory(tmp_path, kind):
    target = tmp_path / "cache.json"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    with within(10), pytest.raises(StorageError, match="not a file"):
        fs.write_text(target, "{}")
    assert (target.is_fifo() if kind == "fifo" else target.is_dir())


def test_a_hash_reads_no_more_than_the_files_size(tmp_path):
    out = tmp_path / "out"
    ap.save(pruned(), out)
    (out / WEIGHTS).unlink()
    (out / WEIGHTS).symlink_to("/proc/self/pagemap")  # a regular file that streams without end
    with within(20), pytest.raises(LoadError, match="hash"):
        ap.load(out, net)


def test_files_written_by_a_library_keep_the_usual_permissions(tmp_path):
    import stat

    umask = os.umask(0)
    os.umask(umask)
    out = ap.save(pruned(), tmp_path / "out")
    for name in (WEIGHTS, PLAN, META):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("theirs", [META, "plan.next.json"])
def test_save_replaces_no_file_of_its_names_without_its_own_metadata(tmp_path, theirs):
    (tmp_path / theirs).write_text('{"mine": true}')
    with pytest.raises(ConfigError, match="did not write"):
        ap.save(pruned(), tmp_path)
    assert (tmp_path / theirs).read_text() == '{"mine": true}'


def test_an_empty_path_is_refused_not_the_current_directory(tmp_path):
    with pytest.raises(ConfigError, match="empty path"):
        ap.save(pruned(), "")
    with pytest.raises(ConfigError, match="empty path"):
        ap.load("", net)
