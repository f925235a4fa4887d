"""Reports of an adapt run: ``report.json`` (plain data), a self-contained ``report.html`` and ``report.md``.

::

    from adaprune import report
    data = report.collect(res, original_model, x, tolerance=0.01, budget=budget)   # measures, builds
    report.write(data, "runs/demo")              # report.json, report.html, report.md, plots/*.png
    report.write(report.load("runs/demo"), "runs/demo")   # re-render from the saved data

The report shows metric and cost after every step (accepted and rolled back marked differently),
the accepted steps on a cost-vs-metric Pareto chart, per-layer widths before and after, sensitivity
curves when available, and a before/after table of the metric, MACs, params, bytes, energy estimate
and latency (torch and ONNX Runtime, with threads and batch size).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import fs
from . import plots
from .data import (
    FORMAT,
    VERSION,
    ReportError,
    build,
    collect,
    export,
    from_state,
    latency_pairs,
    layer_widths,
    load_json,
    load_sensitivity,
    measure,
    save_json,
)
from .render import to_html, to_markdown

JSON, HTML, MD, PLOTS = "report.json", "report.html", "report.md", "plots"

__all__ = [
    "FORMAT",
    "VERSION",
    "ReportError",
    "build",
    "collect",
    "export",
    "from_state",
    "latency_pairs",
    "layer_widths",
    "load",
    "load_sensitivity",
    "measure",
    "render",
    "write",
]


def render(data: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` for ``data`` into ``out_dir``."""
    out = Path(out_dir)
    (out / PLOTS).mkdir(parents=True, exist_ok=True)
    figures = plots.render_all(data)
    files: dict[str, tuple[str, str]] = {}
    for name, (caption, png) in figures.items():
        fs.write_atomic(out / PLOTS / f"{name}.png", png, what=f"the plot {name}.png")
        files[name] = (caption, f"{PLOTS}/{name}.png")
    paths = {"html": out / HTML, "md": out / MD}
    for key, text in (("html", to_html(data, figures)), ("md", to_markdown(data, files))):
        fs.write_text(paths[key], text, what=paths[key].name)
    return paths


def write(data: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.json`` and render it; returns the paths by kind (``json``, ``html``, ``md``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"json": save_json(data, out / JSON), **render(data, out)}


def load(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The report data saved in ``run_dir`` (or the path of a report.json)."""
    p = Path(run_dir)
    return load_json(p / JSON if p.is_dir() else p)
