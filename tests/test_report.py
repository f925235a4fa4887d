"""Reports: files written, JSON round trip, self-contained HTML, and the page in headless Chromium."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune import report
from adaprune.adapt import StepRecord
from adaprune.examples.digits import DigitsCNN, load_digits_data, train

IMG = re.compile(r'<img\b[^>]*\bsrc="([^"]*)"')


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, dict, nn.Module, nn.Module]:
    """A tiny real adapt run (3 steps at most) reported with sensitivity, latency and ONNX."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_digits_data(0)
    base = DigitsCNN(8)
    train(base, data, epochs=4, seed=0)
    model = copy.deepcopy(base)
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"))
    x = data.x_val[:1]
    budget = ap.Budget(macs=0.75)
    res = ap.adapt(
        model, x, task, budget, 0.05, ignore=[model.fc], max_iterations=3, finetune_steps=10, step=0.15
    )
    sens = ap.sensitivity(base, x, lambda m: task.evaluate(m)["accuracy"], ratios=(0.5,), ignore=[base.fc])
    out = tmp_path_factory.mktemp("report")
    data_ = report.collect(
        res,
        base,
        x,
        repeats=3,
        onnx_path=out / "model.onnx",
        metric="accuracy",
        tolerance=0.05,
        budget=budget,
        sensitivity=sens,
        title="tiny digits run",
    )
    report.write(data_, out)
    return out, data_, base, model


def _synthetic() -> dict:
    """A report with accepted and rolled-back steps and a latency budget (no model needed)."""
    costs = {"macs": 1000.0, "params": 100.0, "bytes": 400.0, "energy": 5.0, "latency": 2.0}

    def rec(step: int, frac: float, acc: float, accepted: bool) -> StepRecord:
        return StepRecord(
            step,
            0.2,
            {"features.0": 3},
            {"accuracy": acc, "loss": 0.1},
            {k: v * frac for k, v in costs.items()},
            accepted,
            "accepted" if accepted else "rolled",
        )

    res = SimpleNamespace(
        history=[rec(0, 0.8, 0.95, True), rec(1, 0.5, 0.80, False), rec(2, 0.7, 0.94, True)],
        before={"accuracy": 0.96, "loss": 0.1},
        after={"accuracy": 0.94, "loss": 0.12},
        costs_before=costs,
        costs_after={k: v * 0.7 for k, v in costs.items()},
        message="budget met: latency 70.0% of original (bound 75.0%)",
        budget_met=True,
    )
    widths = {"conv": {"kind": "Conv2d", "width": 16}, "fc": {"kind": "Linear", "width": 10}}
    return report.build(
        res,
        tolerance=0.02,
        budget=ap.Budget(latency=0.75),
        widths_before=widths,
        widths_after={"conv": {"kind": "Conv2d", "width": 9}, "fc": widths["fc"]},
        title="synthetic <run> & co",
    )


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def test_collect_writes_every_file_with_measured_data(real_run):
    out, data, base, model = real_run
    for name in ("report.json", "report.html", "report.md", "model.onnx"):
        assert (out / name).is_file(), name
    assert {p.name for p in (out / "plots").iterdir()} == {
        "steps.png",
        "pareto.png",
        "widths.png",
        "sensitivity.png",
    }
    widths = {lay["name"]: (lay["before"], lay["after"]) for lay in data["layers"]}
    assert widths["features.0"] == (base.features[0].weight.shape[0], model.features[0].weight.shape[0])
    assert widths["fc"] == (10, 10)
    assert any(a < b for b, a in widths.values()), "adapt removed no channel"
    rows = {r["backend"]: r for r in data["latency"]}
    assert set(rows) == {"torch", "onnxruntime"}
    assert all(
        r["before_ms"] > 0 and r["after_ms"] > 0 and r["threads"] == 1 and r["batch_size"] == 1
        for r in rows.values()
    )
    assert data["onnx"]["path"] == "model.onnx" and data["sensitivity"]["rows"]
    assert data["history"] and {"step", "cuts", "metrics", "costs", "accepted", "reason"} <= set(
        data["history"][0]
    )


def test_json_round_trip_re_renders_the_same_report(real_run, tmp_path):
    out, data, _, _ = real_run
    loaded = report.load(out)
    assert loaded == json.loads(json.dumps(data))
    paths = report.render(loaded, tmp_path)
    assert paths["html"].read_text() == (out / "report.html").read_text()
    assert paths["md"].read_text() == (out / "report.md").read_text()


def test_html_is_self_contained(real_run):
    out, data, _, _ = real_run
    text = (out / "report.html").read_text()
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "http://" not in text and "https://" not in text and "url(" not in text
    srcs = IMG.findall(text)
    assert len(srcs) == 4
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        width, height = _png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width > 100 and height > 100
    assert data["message"] in text


def test_markdown_links_the_plots_it_shows(real_run):
    out, _, _, _ = real_run
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all((out / link).is_file() for link in links)
    assert "| quantity | before | after |" in md and "onnxruntime" in md


def test_rolled_back_steps_are_marked_and_latency_gets_a_pareto_panel(tmp_path):
    data = _synthetic()
    paths = report.write(data, tmp_path)
    html = paths["html"].read_text()
    assert '<td class="bad">rolled back</td>' in html and '<td class="ok">accepted</td>' in html
    assert "synthetic &lt;run&gt; &amp; co" in html  # escaped
    width, _ = _png_size((tmp_path / "plots" / "pareto.png").read_bytes())
    assert width >= 1000  # MACs and latency side by side
    assert "sensitivity.png" not in {p.name for p in (tmp_path / "plots").iterdir()}
    assert "| 1 | 0.200 | rolled back |" in paths["md"].read_text()
    assert report.load(tmp_path)["history"][1]["accepted"] is False


def test_unfinished_run_reports_from_its_state():
    state = {
        "done": False,
        "history": [
            {
                "step": 0,
                "step_size": 0.2,
                "cuts": {"a": 2},
                "accepted": True,
                "metrics": {"accuracy": 0.9},
                "costs": {"macs": 50.0},
                "reason": "ok",
            }
        ],
        "baseline": {"accuracy": 0.91},
        "original_costs": {"macs": 100.0},
        "message": "",
    }
    data = report.from_state(state)
    assert data["status"] == "interrupted" and data["after"] == {"accuracy": 0.9}
    from adaprune.report.render import to_html

    assert "interrupted" in to_html(data, {})


def test_loading_something_else_is_refused(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(report.ReportError, match="not an adaprune report"):
        report.load(tmp_path)
    with pytest.raises(report.ReportError, match="does not exist"):
        report.load(tmp_path / "nope.json")


def test_layer_widths_read_the_tensors():
    m = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(5, 6, 2, groups=1), nn.Linear(4, 7), nn.BatchNorm2d(3)
    )
    w = report.layer_widths(m)
    assert {k: v["width"] for k, v in w.items()} == {"0": 5, "1": 6, "2": 7}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(real_run, tmp_path):
    """The page loads with no console errors, shows every plot, and paints a non-blank screenshot."""
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "chromium is not installed and could not be installed (`make test` installs it with "
            "apt-get when run as root)"
        )
    out, _, _, _ = real_run
    url = (out / "report.html").resolve().as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,3000",
    ]
    shot = tmp_path / "shot.png"
    runs = {
        "screenshot": [browser, *flags, f"--user-data-dir={tmp_path / 'p1'}", f"--screenshot={shot}", url],
        "dom": [browser, *flags, f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", url],
    }
    results = {
        k: subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        for k, cmd in runs.items()
    }
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
        console = [
            ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "net::ERR" in ln
        ]
        assert not console, f"{name}: browser console errors: {console}"
    srcs = IMG.findall(results["dom"].stdout)
    assert len(srcs) == 4
    assert all(s.startswith("data:image/png;base64,") and len(s) > 1000 for s in srcs)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert float(pixels.var()) > 0 and bool((pixels < 0.95).any()), "the screenshot is blank"
    assert float((pixels < 0.95).mean()) > 0.02, "almost nothing was painted"


def test_a_task_name_with_dollars_is_drawn_as_text() -> None:
    """Task names come from YAML: matplotlib must not parse them as math (``a$\\q$`` is not a symbol)."""
    from adaprune.report import plots

    m = "a$\\q$/accuracy"
    data = {"metric": m, "higher_is_better": True, "tolerance": 0.01, "budget": {"macs": 0.5},
            "criteria": [{"name": "a$\\q$", "metric": m, "higher_is_better": True, "tolerance": 0.01},
                         {"name": "b", "metric": "b/mse", "higher_is_better": False, "tolerance": 0.05}],
            "before": {m: 0.9, "b/mse": 0.1}, "costs_before": {"macs": 100.0},
            "history": [{"step": 0, "accepted": True, "metrics": {m: 0.89, "b/mse": 0.11}, "costs": {"macs": 60.0}}]}
    png = plots.steps(data)
    assert png is not None and png.startswith(b"\x89PNG")
