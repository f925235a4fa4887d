"""The report of a compression run: what each step did and bought, as Markdown, HTML and a plot."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import fs
from ..cost.registry import si_bytes

if TYPE_CHECKING:
    from .result import CompressResult

Table = tuple[list[str], list[list[str]]]
REPORT_MD, REPORT_HTML, PLOT = "report.md", "report.html", "compress-steps.png"


def steps_table(result: CompressResult) -> Table:
    """One row per step: method, kept or undone, the layers moved, the metric, the artifact after it and
    what it bought (bytes saved, metric lost), optimizer steps, seconds, and why it was undone."""
    head = ["step", "method", "kept", "moved", result.metric, "disk after", "saved", "metric lost", "opt. steps",
            "s", "note"]
    rows, disk, metric = [], result.disk_bytes_before, result.before[result.metric]
    for s in result.history:
        moved = ", ".join(f"{k} {a}→{b}" for k, (a, b) in s.layers.items()) or (
            f"params {s.params:,}" if s.method == "prune" else "")
        saved = disk - s.disk_bytes if s.accepted else 0
        rows.append([str(s.index), s.method, "yes" if s.accepted else "no", moved, f"{s.metric:.4f}",
                     si_bytes(s.disk_bytes), si_bytes(saved) if s.accepted else "–",
                     f"{metric - s.metric:+.4f}" if s.accepted else "–", str(s.optimizer_steps), f"{s.seconds:.1f}",
                     s.note])
        if s.accepted:
            disk, metric = s.disk_bytes, s.metric
    return head, rows


def _summary_lines(result: CompressResult) -> list[str]:
    m = result.metric
    used = ", ".join(f"{k} {v}" for k, v in result.methods_used().items()) or "none"
    levels = ", ".join(f"{v} {k}" for k, v in sorted(result.levels().items()))
    return [
        (f"Disk: {si_bytes(result.disk_bytes_before)} (float32) → {si_bytes(result.disk_bytes_after)} "
         f"({1 / max(result.ratio, 1e-12):.1f}x smaller; bound {si_bytes(result.limit)}, "
         f"{'met' if result.budget_met else 'not met'})."),
        (f"{m}: {result.before[m]:.4f} → {result.after[m]:.4f} (tolerance {result.tolerance:g}). Parameters "
         f"{result.params_before:,} → {result.params_after:,}."),
        (f"Steps kept per method: {used}. Layers: {levels}. {result.optimizer_steps} optimizer steps, "
         f"{result.evaluations} evaluations, {result.seconds:.1f} s. {result.message}."),
    ]


def markdown(result: CompressResult, plot: str | None = None) -> str:
    from ..report.render import _md_table

    lines = ["# adaprune compress", "", *[f"{line}  " for line in _summary_lines(result)], ""]
    if plot:
        lines += [f"![artifact size and metric per step]({plot})", ""]
    lines += ["## Steps", "", _md_table(steps_table(result)), "", "## Layers", "",
              "| layer | level |", "|---|---|"] + [f"| {n} | {lv} |" for n, lv in result.spec.items()]
    return "\n".join(lines) + "\n"


def html_page(result: CompressResult, plot: str | None = None) -> str:
    from ..report.render import _html_table

    e = html.escape
    layers = "".join(f"<tr><td>{e(n)}</td><td>{e(lv)}</td></tr>" for n, lv in result.spec.items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>adaprune: compress</title>"
            "<style>body{font-family:sans-serif;margin:2rem}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.2rem .6rem;text-align:right}</style></head><body>"
            "<h1>adaprune compress</h1>" + "".join(f"<p>{e(line)}</p>" for line in _summary_lines(result))
            + (f"<img src='{e(plot)}' alt='artifact size and metric per step'>" if plot else "")
            + f"<h2>Steps</h2>{_html_table(steps_table(result), reason_col=10)}"
            + f"<h2>Layers</h2><table><thead><tr><th>layer</th><th>level</th></tr></thead><tbody>{layers}"
            "</tbody></table></body></html>")


def _plot(result: CompressResult, path: Path) -> bool:
    """Artifact size (log) and metric after every kept step, marked by method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kept = [s for s in result.history if s.accepted]
    xs = [0] + [s.index for s in kept]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [result.disk_bytes_before] + [s.disk_bytes for s in kept], color="0.5", lw=1)
    for method, marker in (("prune", "s"), ("quantize", "^"), ("share", "o"), ("quantize+share", "D")):
        pts = [s for s in kept if s.method == method]
        ax.scatter([s.index for s in pts], [s.disk_bytes for s in pts], marker=marker, label=method, zorder=3)
    ax.axhline(result.limit, color="C3", ls="--", lw=1, label="bound")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("artifact bytes")
    twin = ax.twinx()
    twin.plot(xs, [result.before[result.metric]] + [s.metric for s in kept], color="k", lw=1, ls=":")
    twin.set_ylabel(result.metric)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, dpi=110)

    try:
        fs.write_atomic(path, write, what="the compression plot")
    finally:
        plt.close(fig)
    return True


def write_report(result: CompressResult, directory: str | os.PathLike[str]) -> Path:
    """Write ``report.md``, ``report.html`` and (with matplotlib) ``compress-steps.png`` to ``directory``."""
    from .._check import check_path

    check_path(directory, "directory")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plot = PLOT if _plot(result, out / PLOT) else None
    fs.write_text(out / REPORT_MD, markdown(result, plot), what="the report")
    fs.write_text(out / REPORT_HTML, html_page(result, plot), what="the report")
    return out


__all__ = ["html_page", "markdown", "steps_table", "write_report"]
