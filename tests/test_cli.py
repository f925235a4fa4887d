"""The ``adaprune`` command line: every command, bad configs, --json, Ctrl-C and --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import CLI_MODULE, config, interrupt_when, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("demo", "adapt", "ladder", "sensitivity", "report", "export", "zoo"):
        assert command in result.output
    assert invoke("--version").stdout.startswith("adaprune ")


def test_adapt_json_then_report_then_export(workdir):
    """One finished run (one test, so parallel workers do not repeat it): --json, files, re-render, export."""
    cfg = config(workdir, "done")
    run_dir = workdir / "runs" / "done"
    result = invoke("adapt", cfg, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["budget_met"] is True, out["message"]
    assert out["status"] == "finished" and out["steps"] >= 1 and out["accepted"] >= 1
    assert out["costs_after"]["macs"] <= 0.75 * out["costs_before"]["macs"]
    assert out["before"]["accuracy"] - out["after"]["accuracy"] <= 0.05 + 1e-9
    assert {r["backend"] for r in out["latency"]} == {"torch", "onnxruntime"}
    saved = json.loads((run_dir / "report.json").read_text())
    assert out["optimizer_steps"] == saved["optimizer_steps"] == sum(h["optimizer_steps"] for h in saved["history"])
    for name in (
        "report.json",
        "report.html",
        "report.md",
        "config.yaml",
        "inputs.safetensors",
        "model.onnx",
        "model/model.safetensors",
        "model/plan.json",
        "state.json",
    ):
        assert (run_dir / name).is_file(), name
    assert Path(out["report"]["html"]) == run_dir / "report.html"

    again = invoke("adapt", cfg)  # the directory holds a run: --resume or --force
    assert again.exit_code == 2 and "--resume" in again.stderr and "--force" in again.stderr

    (run_dir / "report.html").unlink()
    rendered = invoke("report", run_dir)
    assert rendered.exit_code == 0, rendered.output
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads(invoke("report", run_dir, "--json").stdout)["budget_met"] is True

    exported = invoke("export", run_dir, "--onnx", "--repeats", "3", "--json")
    assert exported.exit_code == 0, exported.output
    ex = json.loads(exported.stdout)
    assert Path(ex["onnx"]).is_file() and ex["bytes"] > 0
    rows = {r["backend"]: r for r in ex["latency"]}
    assert set(rows) == {"torch", "onnxruntime"} and all(r["median_ms"] > 0 for r in rows.values())
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["exported_latency"] == ex["latency"]
    no_format = invoke("export", run_dir)
    assert no_format.exit_code == 2 and "--onnx" in no_format.stderr


def test_sensitivity_writes_table_and_plot(workdir):
    cfg = config(workdir, "sens", sensitivity={"ratios": [0.5], "importance": "l1"})
    result = invoke("sensitivity", cfg, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metric"] == "accuracy" and out["rows"] and all(r["ratio"] == 0.5 for r in out["rows"])
    for f in out["files"].values():
        assert Path(f).is_file()
    assert "| cluster |" in Path(out["files"]["md"]).read_text()


def test_data_adapters_and_model_sources(workdir):
    from adaprune.cli.build import build_job, model_factory
    from adaprune.cli.config import parse_config

    def job(**over):
        raw = {
            "model": {"factory": "adaprune.examples.digits:DigitsCNN", "kwargs": {"width": 4}},
            "data": {"kind": "digits"},
            "budget": {"macs": 0.5, "batch_size": 2},
            **over,
        }
        return build_job(parse_config(raw, workdir))

    npz = job(data={"kind": "npz", "path": "digits.npz", "batch_size": 32})
    assert npz.x.shape == (2, 1, 8, 8) and npz.x.dtype == torch.float32
    import numpy as np

    with np.load(workdir / "digits.npz") as arrays:  # the task scores the file's validation split, all of it
        x_val, y_val = torch.as_tensor(arrays["x_val"]), torch.as_tensor(arrays["y_val"])
    with torch.no_grad():
        expected = float((npz.model.eval()(x_val).argmax(1) == y_val).float().mean())
    assert npz.task.evaluate(npz.model)["accuracy"] == pytest.approx(expected)
    loaders = job(data={"kind": "callable", "factory": "loaders.py:make_loaders", "kwargs": {"n": 32}})
    assert loaders.x.shape == (2, 1, 8, 8)
    slow = job(task={"factory": "slowtask.py:make", "kwargs": {"delay": 0.0}})
    assert hasattr(slow.task, "finetune")
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (workdir / "images" / split / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), (200, 30, 30)).save(workdir / "images" / split / label / "a.png")
    folder = job(
        model={"factory": "torchvision:resnet18", "kwargs": {"num_classes": 2}},
        data={"kind": "imagefolder", "path": "images", "image_size": 32, "batch_size": 4},
    )
    assert folder.x.shape == (2, 3, 32, 32) and folder.model.fc.out_features == 2
    assert 0 <= folder.task.evaluate(folder.model)["accuracy"] <= 1
    cfg = parse_config(
        {
            "model": {"factory": "torchvision:resnet18", "kwargs": {"num_classes": 3}},
            "data": {"kind": "digits"},
        },
        workdir,
    )
    assert model_factory(cfg)().fc.out_features == 3


def test_hf_config_class_builds_a_model(tmp_path):
    pytest.importorskip("transformers")
    from adaprune.cli.build import model_factory
    from adaprune.cli.config import parse_config

    kwargs = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "num_labels": 3,
    }
    cfg = parse_config(
        {"model": {"factory": "transformers:BertConfig", "kwargs": kwargs}, "data": {"kind": "digits"}},
        tmp_path,
    )
    model = model_factory(cfg)()
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3


BAD = {
    "unknown torchvision model": ({"model": {"factory": "torchvision:resnet999"}}, "model.factory", "resnet"),
    "unimportable module": ({"model": {"factory": "nosuchpkg.mod:make"}}, "model.factory", "cannot import"),
    "missing attribute": (
        {"model": {"factory": "adaprune.examples.digits:DigitsCN"}},
        "model.factory",
        "DigitsCNN",
    ),
    "missing field": ({"data": None}, "data", "missing"),
    "missing budget": ({"budget": None}, "budget", "macs"),
    "wrong type": ({"data": {"kind": "digits", "batch_size": "big"}}, "data.batch_size", "integer"),
    "negative budget": ({"budget": {"macs": -0.5}}, "budget.macs", "greater than 0"),
    "negative tolerance": ({"tolerance": -0.1}, "tolerance", "greater than or equal to 0"),
    "unknown field": ({"budgett": {"macs": 0.5}}, "budgett", "did you mean 'budget'"),
    "unknown option": ({"options": {"stepsize": 0.1}}, "options.stepsize", "did you mean 'step'"),
    "inconsistent options": ({"options": {"step": 0.001}}, "options", "min_step"),
    "unknown data kind": ({"data": {"kind": "mnist"}}, "data.kind", "digits"),
    "unknown importance": ({"options": {"importance": "magic"}}, "options.importance", "l2"),
    "unknown ignored module": ({"ignore": ["fcc"]}, "ignore", "fc"),
    "missing weights file": (
        {"model": {"factory": "adaprune.examples.digits:DigitsCNN", "weights": "nope.safetensors"}},
        "model.weights",
        "does not exist",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_prints_one_line_and_exits_2(workdir, case):
    overrides, field, fix = BAD[case]
    path = config(workdir, "bad")
    raw = yaml.safe_load(path.read_text())
    for k, v in overrides.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    path.write_text(yaml.safe_dump(raw))
    result = invoke("adapt", path, "--force")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: {field}") and fix in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.parametrize(
    "text, fix", [(None, "no such file"), ("model: [unclosed", "line 1"), ("- just\n- a list\n", "mapping")]
)
def test_unreadable_config_file(workdir, text, fix):
    path = workdir / "broken.yaml"
    path.unlink(missing_ok=True)
    if text is not None:
        path.write_text(text)
    result = invoke("adapt", path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert fix in result.stderr and "Traceback" not in result.output


def test_report_and_export_of_a_missing_run_dir(tmp_path):
    for args in (
        ("report", tmp_path / "nope"),
        ("export", tmp_path / "nope", "--onnx"),
        ("report", tmp_path),
    ):
        result = invoke(*args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output


def test_demo_command_runs_the_demo_into_out(monkeypatch, tmp_path):
    import adaprune.demo

    calls = []
    monkeypatch.setattr(adaprune.demo, "main", lambda out: calls.append(out))
    assert invoke("demo", "--out", tmp_path / "d").exit_code == 0
    assert calls == [tmp_path / "d"]


def test_zoo_passes_arguments_through_or_explains(monkeypatch, capfd):
    if CLI_MODULE._zoo_script() is not None:  # a source checkout: benchmarks/zoo.py gets the arguments
        assert invoke("zoo", "--help").exit_code == 0
        assert "--report-only" in capfd.readouterr().out
    monkeypatch.setattr(CLI_MODULE, "_zoo_script", lambda: None)
    result = invoke("zoo")
    assert result.exit_code == 2 and "benchmarks/zoo.py" in result.stderr


def test_sigint_leaves_a_resumable_run(workdir):
    """SIGINT after the first step: exit 130, state on disk; --resume finishes with the budget met.

    The child runs ``python -m adaprune``, so this also covers the module entry point.
    """
    cfg = config(
        workdir,
        "interrupted",
        task={"factory": "slowtask.py:make", "kwargs": {"delay": 1.0}},
        report={"onnx": False, "latency": False},
    )
    state = workdir / "runs" / "interrupted" / "state.json"
    code, err = interrupt_when("adapt", cfg, state, lambda s: s["step"] >= 1)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    saved = json.loads(state.read_text())
    assert saved["done"] is False and saved["step"] >= 1 and saved["history"]
    assert not (state.parent / "report.json").exists()
    # fast task now: the controller's state does not depend on the task's speed
    raw = yaml.safe_load(cfg.read_text())
    raw["task"]["kwargs"]["delay"] = 0.0
    cfg.write_text(yaml.safe_dump(raw))
    result = invoke("adapt", cfg, "--resume", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["budget_met"] is True, out["message"]
    assert out["steps"] >= len(saved["history"])
    assert json.loads(state.read_text())["history"][: len(saved["history"])] == saved["history"]


def test_adapt_with_sizes_at_once_counts_steps_and_says_which_sizes_were_not_used(workdir):
    cfg = config(workdir, "sizes", budget={"macs": 0.5},
                 options={"finetune_steps": 5, "alternatives": 2, "max_iterations": 3, "step": 0.4})
    result = invoke("adapt", cfg)
    assert result.exit_code == 0, result.output
    history = json.loads((workdir / "runs" / "sizes" / "report.json").read_text())["history"]
    taken = len({h["step"] for h in history})
    assert len(history) > taken and f"{taken} steps ({len(history)} sizes tried)" in result.output
    unused = sum(bool(h.get("unused")) for h in history)
    assert unused and (workdir / "runs" / "sizes" / "report.md").read_text().count("| not used |") == unused
    out = json.loads(invoke("adapt", cfg, "--json", "--resume").stdout)
    assert out["steps"] == taken and out["sizes_tried"] == len(history)
