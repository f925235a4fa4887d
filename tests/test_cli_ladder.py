"""``adaprune ladder CONFIG.yaml``: the ladder saved in the run directory, a report beside independent
adapt runs, --json, a second run refused without --force, a bad rung named, Ctrl-C during the build
and --resume."""

from __future__ import annotations

import json

import pytest
import yaml

import adaprune as ap
from adaprune.examples.digits import DigitsCNN, load_digits_data
from cli_helpers import config, interrupt_when, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ladder_command_saves_reports_and_refuses_to_overwrite(workdir):
    cfg = config(workdir, "lad", ladder={"rungs": [{"macs": 0.6}, {"macs": 0.3}], "finetune_steps": 5,
                                          "compare": True, "repeats": 3},
                 options={"max_iterations": 6})
    run_dir = workdir / "runs" / "lad"
    result = invoke("ladder", cfg, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["rung"] for r in out["rungs"]] == [0, 1, 2] and all(r["budget_met"] for r in out["rungs"])
    macs = [r["costs"]["macs"] for r in out["rungs"]]
    assert macs[1] <= 0.6 * macs[0] and macs[2] <= 0.3 * macs[0]
    assert all(r["latency_ms"] > 0 for r in out["rungs"])
    assert [r["rung"] for r in out["independent"]] == [1, 2]
    for name in ("ladder/ladder.json", "ladder/model.safetensors", "ladder/norms.safetensors", "ladder-report.md",
                 "ladder-report.json", "plots/ladder.png", "config.yaml", "inputs.safetensors"):
        assert (run_dir / name).is_file(), name
    assert "independent" in (run_dir / "ladder-report.md").read_text().lower()
    data = load_digits_data(0)
    back = ap.load_ladder(run_dir / "ladder", lambda: DigitsCNN(8), data.x_val[:1])
    assert len(back) == 3 and [r.costs["macs"] for r in back.rungs] == macs

    again = invoke("ladder", cfg)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert invoke("ladder", cfg, "--force", "--json").exit_code == 0


def test_a_bad_rung_is_named(workdir):
    cfg = config(workdir, "badrung", ladder={"rungs": [{"macs": 0.5}, {"flops": 0.2}]})
    result = invoke("ladder", cfg)
    assert result.exit_code == 2
    assert "ladder.rungs[1]" in result.stderr and "flops" in result.stderr


def test_sigint_during_the_build_leaves_it_resumable(workdir):
    """SIGINT once the first rung is allocated: exit 130 naming --resume; --resume keeps that rung's widths."""
    cfg = config(workdir, "ladint", ladder={"rungs": [{"macs": 0.6}, {"macs": 0.3}], "finetune_steps": 4,
                                            "compare": False, "repeats": 3},
                 task={"factory": "slowtask.py:make", "kwargs": {"evaluate_delay": 0.3}},
                 options={"max_iterations": 6})
    state = workdir / "runs" / "ladint" / "ladder-state.json"
    code, err = interrupt_when("ladder", cfg, state, lambda s: len(s["widths"]) >= 1)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    saved = json.loads(state.read_text())
    assert len(saved["widths"]) >= 1 and not (state.parent / "ladder" / "ladder.json").exists()
    raw = yaml.safe_load(cfg.read_text())
    raw["task"]["kwargs"]["evaluate_delay"] = 0.0  # how fast the task is does not change the build
    cfg.write_text(yaml.safe_dump(raw))
    assert invoke("ladder", cfg).exit_code == 2  # a build is there: --resume or --force
    result = invoke("ladder", cfg, "--resume", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["widths"] for r in out["rungs"][1:len(saved["widths"]) + 1]] == saved["widths"]
    assert all(r["budget_met"] for r in out["rungs"]) and json.loads(state.read_text())["steps"] == 4
