"""Run directories are adaprune's: marked, locked, never a user's files overwritten, never code run from them.

Each test here failed before run directories were marked and locked (the issue's family 1 and 2).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import adaprune as ap
from adaprune.adapt.rundir import LOCK, MARK, RunDir
from adaprune.errors import FileFormatError, RunDirError, RunDirLockedError
from cli_helpers import config, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock, whose text names the last holder) and its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def user_dir(root: Path) -> Path:
    """A directory of the user's own files with the names adaprune would write."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("mine: true\n")
    (root / "report.html").write_text("<p>my report</p>")
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "model.safetensors").write_bytes(b"my weights")
    return root


@pytest.fixture(scope="module")
def finished(workdir: Path) -> Path:
    """One finished CLI run (the tests copy it before changing anything)."""
    cfg = config(workdir, "rundir-finished")
    result = invoke("adapt", cfg, "--json")
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["run_dir"])


def copy_run(finished: Path, dest: Path) -> Path:
    shutil.copytree(finished, dest)
    return dest


# -- the CLI: a directory that is not a run -----------------------------------------------------
def test_directory_of_user_files_is_refused_and_left_as_it_was(workdir, tmp_path):
    mine = user_dir(tmp_path / "mine")
    before = snapshot(mine)
    result = invoke("adapt", config(workdir, "foreign"), "--run-dir", mine)
    assert result.exit_code == 2, result.output
    assert "not an adaprune run directory" in result.stderr and "--force" in result.stderr
    assert snapshot(mine) == before and not (mine / MARK).exists()


def test_force_never_overwrites_a_file_adaprune_did_not_write(workdir, tmp_path):
    mine = user_dir(tmp_path / "mine")
    before = snapshot(mine)
    result = invoke("adapt", config(workdir, "foreign-force"), "--run-dir", mine, "--force")
    assert result.exit_code == 2, result.output
    assert "adaprune did not write" in result.stderr and "config.yaml" in result.stderr
    assert snapshot(mine) == before


def test_force_adopts_a_directory_whose_names_are_free_and_keeps_its_files(workdir, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = invoke("adapt", config(workdir, "adopt", options={"max_iterations": 1}), "--run-dir", mine,
                    "--force", "--json")
    assert result.exit_code == 0, result.output
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / MARK).is_file()
    # starting over deletes what adaprune wrote there, and nothing else
    RunDir(mine).open(force=True).close()
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (mine / "report.json").exists() and not (mine / "model").exists()


def test_run_dir_dot_never_rewrites_the_input_config(workdir, tmp_path):
    here = tmp_path / "project"
    here.mkdir()
    cfg = yaml.safe_load(config(workdir, "dot").read_text())
    cfg["model"]["weights"] = str(workdir / "base.safetensors")
    cfg["run_dir"] = "."
    path = here / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = path.read_bytes()
    refused = invoke("adapt", path)  # a directory of the user's files
    assert refused.exit_code == 2 and "not an adaprune run directory" in refused.stderr, refused.output
    assert path.read_bytes() == before
    forced = invoke("adapt", path, "--force")  # adopted: the run writes beside the config, never over it
    assert forced.exit_code == 0, forced.output
    assert path.read_bytes() == before and (here / "report.json").is_file()
    again = invoke("adapt", path, "--force")  # starting over deletes what the run wrote, never the config
    assert again.exit_code == 0, again.output
    assert path.read_bytes() == before


def test_a_config_inside_an_empty_run_dir_is_never_written(workdir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = yaml.safe_load(config(workdir, "inside").read_text())
    cfg["model"]["weights"] = str(workdir / "base.safetensors")
    cfg["run_dir"] = "."
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = path.read_bytes()
    result = invoke("adapt", path, "--force")  # the only file is the input config, whose name adaprune writes
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == before
    resumed = invoke("adapt", path, "--resume")  # the run's own config as the input: resumable, untouched
    assert resumed.exit_code == 0, resumed.output
    assert path.read_bytes() == before


# -- the CLI: resume, force, export ---------------------------------------------------------------
def test_resume_with_changed_settings_changes_nothing(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    cfg = config(workdir, "changed", budget={"macs": 0.6})
    before = snapshot(run)
    result = invoke("adapt", cfg, "--run-dir", run, "--resume")
    assert result.exit_code == 2, result.output
    assert "other settings" in result.stderr and "budget" in result.stderr
    assert snapshot(run) == before


def test_resume_on_another_model_changes_nothing(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    cfg = yaml.safe_load(config(workdir, "wider").read_text())
    cfg["model"]["kwargs"] = {"width": 12}
    cfg["model"].pop("weights")
    path = workdir / "wider.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = snapshot(run)
    result = invoke("adapt", path, "--run-dir", run, "--resume")
    assert result.exit_code == 2 and "another model" in result.stderr, result.output
    assert snapshot(run) == before


def test_an_interrupted_forced_run_leaves_nothing_of_the_previous_run_to_export(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    from adaprune.cli.jobs import ADAPT_NAMES

    text = (run / "config.yaml").read_text().replace("macs: 0.75", "macs: 0.6")
    with RunDir(run).open(force=True, names=ADAPT_NAMES) as rd:  # a --force run with a new budget, killed
        rd.write("config.yaml", text.encode())                   # right after it wrote its config
    assert not (run / "model").exists() and not (run / "report.json").exists()
    assert (run / "notes.txt").read_text() == "mine"
    result = invoke("export", run, "--onnx", "--repeats", "1")
    assert result.exit_code == 2 and "did not finish" in result.stderr, result.output


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from adaprune.examples.digits import DigitsCNN

def make(**kwargs):
    return DigitsCNN(**kwargs)
"""


def test_export_never_imports_code_named_in_a_run_directory(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "ran.txt"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["factory"] = f"{tmp_path / 'evil.py'}:make"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    refused = invoke("export", run, "--onnx", "--repeats", "1")
    assert refused.exit_code == 2 and "--trust-config" in refused.stderr, refused.output
    assert not marker.exists()

    own = invoke("export", run, "--onnx", "--repeats", "1", "--factory", "adaprune.examples.digits:DigitsCNN")
    assert own.exit_code == 0, own.output
    assert not marker.exists()

    trusted = invoke("export", run, "--onnx", "--repeats", "1", "--trust-config")
    assert trusted.exit_code == 0, trusted.output
    assert marker.read_text() == "ran"


def test_state_naming_a_weights_file_outside_the_run_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    state = json.loads((run / "state.json").read_text())
    for bad in ("../x.safetensors", "/etc/passwd", "weights-0001.safetensors/../../x"):
        state["weights"] = bad
        (run / "state.json").write_text(json.dumps(state))
        with pytest.raises(FileFormatError, match="weights"):
            RunDir(run).load()


def test_a_run_that_holds_the_directory_locks_out_a_second_one(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    holder = RunDir(run).open(resume=True)
    try:
        with pytest.raises(RunDirLockedError, match=f"process {os.getpid()}"):
            RunDir(run).open(resume=True)
        before = snapshot(run)
        result = invoke("adapt", config(workdir, "second"), "--run-dir", run, "--force")
        assert result.exit_code == 2 and "in use by another run" in result.stderr, result.output
        assert snapshot(run) == before
    finally:
        holder.close()
    RunDir(run).open(resume=True).close()  # free again


def test_a_run_directory_from_before_marks_is_still_resumable(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / MARK).unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": str(run.resolve())}))  # as if made here
    result = invoke("adapt", config(workdir, "rundir-finished"), "--run-dir", run, "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert (run / MARK).is_file()
    # what it could not verify as its own stays the user's: a config naming another run directory
    (run / MARK).unlink()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused = invoke("adapt", config(workdir, "rundir-finished"), "--run-dir", run, "--resume")
    assert refused.exit_code == 2 and "config.yaml (adaprune did not write it)" in refused.stderr


# -- the API ---------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TinyTask:
    metric = "score"
    higher_is_better = True

    def evaluate(self, model):
        with torch.no_grad():
            return {"score": float(-model(torch.ones(2, 4)).abs().mean())}


def _adapt(model, run_dir, **kw):
    return ap.adapt(model, torch.ones(2, 4), TinyTask(), ap.Budget(params=0.8), tolerance=0.9,
                    ignore=[model.b], run_dir=run_dir, max_iterations=2, reconstruct=False, **kw)


def test_api_adapt_refuses_a_foreign_directory_and_leaves_model_and_files(tmp_path):
    mine = user_dir(tmp_path / "mine")
    before = snapshot(mine)
    model = Tiny()
    params = copy.deepcopy(model.state_dict())
    with pytest.raises(RunDirError, match="not an adaprune run directory"):
        _adapt(model, mine)
    assert snapshot(mine) == before
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())


def tiny(width: int = 8) -> Tiny:
    torch.manual_seed(0)
    return Tiny(width)


def test_api_adapt_on_a_held_run_needs_resume_or_force(tmp_path):
    first = _adapt(tiny(), tmp_path / "run")
    with pytest.raises(RunDirError, match="resume=True"):
        _adapt(tiny(), tmp_path / "run")
    resumed = _adapt(tiny(), tmp_path / "run", resume=True)
    forced = _adapt(tiny(), tmp_path / "run", force=True)
    assert first.plan.to_json() == resumed.plan.to_json() == forced.plan.to_json()
    assert not first.plan.is_empty
    with pytest.raises(RunDirError, match="another model"):
        _adapt(tiny(width=6), tmp_path / "run", resume=True)


def test_a_file_where_the_run_directory_should_be_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="is not a directory"):
        _adapt(Tiny(), tmp_path / "afile")


def test_state_writes_replace_a_planted_symlink_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    with RunDir(run).open() as rd:
        (run / "state.json").symlink_to(victim)
        rd.write("state.json", b"{}")
    assert victim.read_text() == "precious"
    assert not (run / "state.json").is_symlink()


def test_a_damaged_mark_is_refused_not_guessed(tmp_path):
    run = tmp_path / "run"
    RunDir(run).open().close()
    (run / MARK).write_bytes(b"\xff\xfe not json")
    with pytest.raises(RunDirError, match="damaged"):
        RunDir(run).open()


# -- found by a hostile review of the first version ------------------------------------------------
def test_a_refused_force_deletes_nothing_not_even_in_a_run_directory_from_before_marks(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "old")
    for name in (MARK, "config.yaml", "report.json", "report.html", "model.onnx"):
        (run / name).unlink()
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "plots")
    (run / "report.md").write_text("my notes")  # the user's, beside an old state.json
    (run / "plots").mkdir()
    (run / "plots" / "fig.png").write_bytes(b"my figure")
    cfg = yaml.safe_load(config(workdir, "legacy-force").read_text())
    cfg["model"]["weights"] = str(workdir / "base.safetensors")
    cfg["run_dir"] = "."
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))  # the input, inside the directory
    before = snapshot(run)
    result = invoke("adapt", run / "config.yaml", "--force")
    assert result.exit_code == 2 and "report.md (adaprune did not write it)" in result.stderr, result.output
    assert snapshot(run) == before


def test_starting_over_keeps_the_users_files_inside_the_runs_directories(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "plots" / "my_figure.png").write_bytes(b"mine")
    (run / "model" / "NOTES.md").write_text("mine")
    result = invoke("adapt", config(workdir, "rundir-finished"), "--run-dir", run, "--force")
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "my_figure.png").read_bytes() == b"mine"
    assert (run / "model" / "NOTES.md").read_text() == "mine"
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("sub", ["plots", "model"])
def test_a_symlinked_directory_in_a_run_never_sends_writes_elsewhere(workdir, finished, tmp_path, sub):
    run = copy_run(finished, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "steps.png").write_bytes(b"precious")
    (victim / "adaprune.json").write_text("precious")
    shutil.rmtree(run / sub)
    (run / sub).symlink_to(victim)
    before = snapshot(victim)
    commands = [("adapt", config(workdir, "rundir-finished"), "--run-dir", run, "--resume")]
    if sub == "plots":  # (report writes no model)
        commands.append(("report", run))
    for args in commands:
        result = invoke(*args)
        assert result.exit_code == 2 and "symbolic link" in result.stderr, result.output
    assert snapshot(victim) == before


def test_a_refused_force_in_a_users_directory_leaves_no_lock_file(workdir, tmp_path):
    mine = user_dir(tmp_path / "mine")
    result = invoke("adapt", config(workdir, "nolock"), "--run-dir", mine, "--force")
    assert result.exit_code == 2, result.output
    assert not (mine / LOCK).exists() and not (mine / MARK).exists()


def test_a_hand_edited_mark_cannot_claim_the_users_files(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "mydata.csv").write_text("mine")
    mark = json.loads((run / MARK).read_text())
    mark["names"] = ["*"]
    (run / MARK).write_text(json.dumps(mark))
    with pytest.raises(RunDirError, match="damaged"):
        RunDir(run).open(force=True)
    assert (run / "mydata.csv").read_text() == "mine"


def test_a_lock_file_that_is_not_a_file_is_one_typed_line(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / LOCK).unlink()
    os.mkfifo(run / LOCK)
    with pytest.raises(RunDirError, match="not a regular file"):
        RunDir(run).open(resume=True)
    result = invoke("report", run)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output


def test_resume_and_force_together_are_refused(workdir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    result = invoke("adapt", config(workdir, "rundir-finished"), "--run-dir", run, "--resume", "--force")
    assert result.exit_code == 2 and "contradict" in result.stderr, result.output
    assert snapshot(run) == before


def test_state_removals_that_do_not_fit_or_a_nan_baseline_refuse_the_resume(workdir, finished, tmp_path):
    for change, why in (({"removals": {"nope.weight": {"0": [1]}}}, "do not fit the model"),
                        ({"baseline": {"accuracy": float("nan"), "loss": 0.5}}, "non-finite")):
        run = copy_run(finished, tmp_path / f"run-{why[:3]}")
        state = json.loads((run / "state.json").read_text())
        (run / "state.json").write_text(json.dumps({**state, **change}))
        before = snapshot(run)
        result = invoke("adapt", config(workdir, "rundir-finished"), "--run-dir", run, "--resume")
        assert result.exit_code == 2 and why in result.stderr, result.output
        assert snapshot(run) == before


def test_resume_with_other_modules_ignored_is_refused(tmp_path):
    model = tiny()
    _adapt(model, tmp_path / "run")
    with pytest.raises(RunDirError, match="ignore"):
        ap.adapt(tiny(), torch.ones(2, 4), TinyTask(), ap.Budget(params=0.8), tolerance=0.9, ignore=[],
                 run_dir=tmp_path / "run", resume=True, max_iterations=2, reconstruct=False)


def test_the_run_directory_names_match_the_plots_the_report_draws():
    from adaprune.adapt.ownership import PLOT_FILES
    from adaprune.report.plots import PLOTS

    assert {f"plots/{n}.png" for n in PLOTS} == set(PLOT_FILES)


@pytest.mark.parametrize(
    "model",
    [
        {"factory": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}},
        {"factory": "transformers:PretrainedConfig", "kwargs": {"auto_map": {"AutoModel": "evil.Evil"}}},
        {"factory": "transformers:PretrainedConfig", "kwargs": {}},
    ],
    ids=["torchvision-weights", "hf-auto-map", "hf-no-builtin-model"],
)
def test_export_refuses_configs_that_would_fetch_code_or_weights(finished, tmp_path, model):
    run = copy_run(finished, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = model
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("export", run, "--onnx", "--repeats", "1")
    assert result.exit_code == 2 and "--trust-config" in result.stderr, result.output


def test_a_report_directory_from_before_marks_re_renders(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    for name in (MARK, "state.json", *[p.name for p in run.glob("weights-*.safetensors")]):
        (run / name).unlink()
    (run / "report.html").unlink()
    result = invoke("report", run)  # e.g. `make demo`'s output directory from an older adaprune
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file() and (run / MARK).is_file()
