"""``tasks:`` in the adapt YAML: several tasks, each with its tolerance, one metric panel per task in the
report's steps plot, rollbacks naming the task; a task without a tolerance, and task: with tasks:,
refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import invoke

pytestmark = pytest.mark.usefixtures("one_thread")

EX = "adaprune.examples.multihead"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from adaprune.examples.multihead import trained

    d = tmp_path_factory.mktemp("mtcli")
    torch.set_num_threads(1)
    model, _ = trained(0, 48, epochs=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "twohead.safetensors"))
    return d


def config(root: Path, name: str, **over) -> Path:
    cfg = {"model": {"factory": f"{EX}:TwoHead", "kwargs": {"width": 48}, "weights": "twohead.safetensors"},
           "data": {"kind": "callable", "factory": f"{EX}:loaders"},
           "tasks": {"digit": {"factory": f"{EX}:head_task", "kwargs": {"head": "digit"}, "tolerance": 0.03},
                     "ink": {"factory": f"{EX}:head_task", "kwargs": {"head": "ink"}, "tolerance": 0.05,
                             "head": ["reg"]}},
           "budget": {"macs": 0.6}, "ignore": ["cls", "reg.2"], "run_dir": f"runs/{name}",
           "options": {"finetune_steps": 10, "max_iterations": 6}, "report": {"repeats": 3, "onnx": False}}
    cfg.update(over)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tasks_section_judges_every_task_and_reports_each(root) -> None:
    result = invoke("adapt", config(root, "mt"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads((root / "runs" / "mt" / "report.json").read_text())
    assert [c["name"] for c in data["criteria"]] == ["digit", "ink"]
    assert [c["higher_is_better"] for c in data["criteria"]] == [True, False]
    assert {"digit/accuracy", "ink/mse"} <= set(data["after"])
    assert any("task 'ink'" in h["reason"] and not h["accepted"] for h in data["history"])
    assert data["after"]["ink/mse"] - data["before"]["ink/mse"] <= 0.05 + 0.02  # within its tolerance (and noise)
    assert (root / "runs" / "mt" / "plots" / "steps.png").is_file()
    html = (root / "runs" / "mt" / "report.html").read_text()
    assert "tolerances 0.03 (digit/accuracy drop), 0.05 (ink/mse rise)" in html


def test_a_task_without_tolerance_and_task_with_tasks_are_refused(root) -> None:
    cfg = config(root, "bad")
    raw = yaml.safe_load(cfg.read_text())
    del raw["tasks"]["ink"]["tolerance"]
    cfg.write_text(yaml.safe_dump(raw))
    result = invoke("adapt", cfg)
    assert result.exit_code == 2 and "tasks.ink.tolerance" in result.stderr, result.stderr
    both = config(root, "both", task={"factory": f"{EX}:head_task"})
    result = invoke("adapt", both)
    assert result.exit_code == 2 and "either task" in result.stderr, result.stderr


def test_specialize_command_saves_a_model_per_task_and_the_overlap_report(root, tmp_path) -> None:
    import subprocess

    import adaprune as ap
    from adaprune.examples.multihead import TwoHead
    from test_report import _chromium

    cfg = config(root, "sp")
    result = invoke("specialize", cfg, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    run = root / "runs" / "sp"
    assert set(out["tasks"]) == {"digit", "ink"} and out["overlap"]["tasks"] == ["digit", "ink"]
    for name in ("digit", "ink"):
        model = ap.load(run / name / "model", lambda: TwoHead(48))
        assert ap.count(model, torch.zeros(1, 1, 8, 8)).macs == pytest.approx(out["tasks"][name]["costs_after"]["macs"])
    for f in ("overlap.json", "overlap.md", "overlap.html", "specialize.json", "report.md", "report.html"):
        assert (run / f).is_file(), f
    md = (run / "report.md").read_text()  # the run's report: per task, then the overlap
    assert md.index("## Per task") < md.index("## Overlap") < md.index("Jaccard")
    assert "| digit | digit/accuracy |" in md or "| digit | accuracy |" in md
    again = invoke("specialize", cfg)
    assert again.exit_code == 2 and "--resume" in again.stderr  # the runs are there: --resume or --force
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (`make test` installs it with apt-get when run as root)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'p'}", "--dump-dom", (run / "report.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<td>trunk.1</td>" in dom.stdout and "Jaccard" in dom.stdout and "<h2>Per task</h2>" in dom.stdout
