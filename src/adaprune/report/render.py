"""Render a report dict as a self-contained HTML page (inline CSS, plots as base64 PNG, no scripts, no
external URLs) and as Markdown (plots as PNG files beside it)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

from ..cost.registry import COSTS, RESERVED, cost_order

Table = tuple[list[str], list[list[str]]]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1f2328;background:#fff;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #d0d7de;padding:.25rem .55rem;text-align:right;vertical-align:top}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
td.reason,th.reason{text-align:left;max-width:34rem}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.muted{color:#656d76;font-size:.85rem}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{color:#656d76;font-size:.85rem}
.status{padding:.6rem .8rem;border-radius:6px;background:#f6f8fa;border:1px solid #d0d7de}
"""


def number(value: Any) -> float:
    """A JSON number as a float (an integer beyond the float range becomes ±inf, shown as such)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def fmt(key: str, value: Any) -> str:
    """A cost or metric value, with its unit (a cost's as its registry entry formats it)."""
    if value is None:
        return "–"
    v = number(value)
    entry = COSTS.for_key(key)
    if entry is not None:
        return entry.show(v)
    return f"{v:.4f}"


def _ratio(before: Any, after: Any) -> str:
    if before in (None, 0) or after is None:
        return "–"
    return f"{number(after) / number(before):.1%}"


def summary_table(data: dict[str, Any]) -> Table:
    """Before / after of every metric, cost and latency measurement."""
    rows = []
    for k in [k for k in data["before"] if k in data["after"]]:
        rows.append(
            [
                k,
                fmt(k, data["before"][k]),
                fmt(k, data["after"][k]),
                f"{number(data['after'][k]) - number(data['before'][k]):+.4f}",
            ]
        )
    budget = data.get("budget", {})
    where = (f" ({budget.get('backend', 'torch')}, {budget.get('threads', 1)} thread(s), "
             f"batch {budget.get('batch_size', 1)}; controller)")
    for k in cost_order(data["costs_before"]):
        entry = COSTS.for_key(k)
        label = k if entry is None else entry.label + ("" if entry.static else where)
        b, a = data["costs_before"][k], data["costs_after"].get(k)
        rows.append([label, fmt(k, b), fmt(k, a), _ratio(b, a)])
    for r in data.get("latency", []):
        label = (
            f"latency {r['backend']} ({r.get('threads', 1)} thread(s), batch {r.get('batch_size', '?')}, "
            f"median of {r.get('repeats', '?')})"
        )
        if r.get("error"):
            rows.append([label, "–", "–", f"not measured: {r['error']}"])
        else:
            rows.append(
                [
                    label,
                    fmt("latency", r.get("before_ms")),
                    fmt("latency", r.get("after_ms")),
                    _ratio(r.get("before_ms"), r.get("after_ms")),
                ]
            )
    steps = data.get("optimizer_steps")
    if steps is not None:
        rows.append(["optimizer steps (fine-tuning in every step tried, accepted or rolled back)", "–",
                     f"{number(steps):,.0f}", ""])
    return ["quantity", "before", "after", "change / after÷before"], rows


def steps_table(data: dict[str, Any]) -> Table:
    metric = data["metric"]
    rows = []
    for h in data["history"]:
        macs = _ratio(data["costs_before"].get("macs"), h["costs"].get("macs"))
        channels = sum(h["cuts"].values())
        rows.append(
            [
                str(h["step"]),
                f"{number(h['step_size']):.3f}",
                "accepted" if h["accepted"] else "not used" if h.get("unused") else "rolled back",
                fmt(metric, h["metrics"].get(metric)),
                _interval(h.get("interval")),
                macs,
                f"{channels} in {len(h['cuts'])} groups",
                "–" if h.get("optimizer_steps") is None else f"{number(h['optimizer_steps']):,.0f}",
                h["reason"],
            ]
        )
    head = ["step", "step size", "decision", metric, "drop [interval]", "MACs of original", "channels removed",
            "optimizer steps", "reason"]
    return head, rows


def _interval(interval: Any) -> str:
    """A step's drop interval ``[low, high]`` as text ("–" when the task gave no per-example values)."""
    if not isinstance(interval, list) or len(interval) != 2:
        return "–"
    low, high = (number(v) for v in interval)
    return f"{(low + high) / 2:+.4f} [{low:+.4f}, {high:+.4f}]"


def layers_table(data: dict[str, Any]) -> Table:
    rows = [
        [lay["name"], lay["kind"], str(lay["before"]), str(lay["after"]), _ratio(lay["before"], lay["after"])]
        for lay in data["layers"]
    ]
    return ["layer", "kind", "width before", "width after", "kept"], rows


def sensitivity_table(data: dict[str, Any]) -> Table | None:
    sens = data.get("sensitivity")
    if not sens or not sens.get("rows"):
        return None
    ratios = sorted({number(r["ratio"]) for r in sens["rows"]}, key=lambda x: (math.isnan(x), x))
    values: dict[str, dict[float, float]] = {}
    sizes: dict[str, int] = {}
    for r in sens["rows"]:
        values.setdefault(r["cluster"], {})[number(r["ratio"])] = number(r["metric"])
        sizes[r["cluster"]] = len(r.get("groups", []))
    rows = [[c, str(sizes[c])] + [f"{v[x]:.4f}" if x in v else "" for x in ratios] for c, v in values.items()]
    return ["cluster", "groups"] + [f"{x:.0%} masked" for x in ratios], rows


def budget_text(data: dict[str, Any]) -> str:
    b = data.get("budget", {})
    parts = []
    for k, v in b.items():
        entry = COSTS.for_key(k)
        if entry is None or v is None:  # backend, threads (or a cost not registered here: below)
            continue
        if k != entry.name:  # the absolute form (latency_ms)
            parts.append(f"{entry.name} ≤ {v} {entry.unit}")
        elif isinstance(v, str):  # the schema allows a string (a bound written by a newer version)
            parts.append(f"{k} ≤ {v}")
        else:
            parts.append(f"{k} ≤ {v:.0%} of original" if v <= 1 and entry.relative else f"{k} ≤ {fmt(k, v)}")
    for k, v in b.items():  # a bound on a cost this process has not registered: as written
        if k not in RESERVED and COSTS.for_key(k) is None and v is not None:
            parts.append(f"{k} ≤ {v}" if isinstance(v, str) or v > 1 else f"{k} ≤ {v:.0%} of original")
    where = f"backend {b.get('backend', 'torch')}, {b.get('threads', 1)} thread(s)" if b else ""
    tol = data.get("tolerance")
    tol_text = f"; tolerance {tol} ({data['metric']} drop)" if tol is not None else ""
    if data.get("criteria"):  # several tasks: each its own
        tol_text = "; tolerances " + ", ".join(
            f"{c['tolerance']} ({c['metric']} {'drop' if c.get('higher_is_better', True) else 'rise'})"
            for c in data["criteria"])
    return (", ".join(parts) + (f" ({where})" if where else "") + tol_text) or "no budget recorded"


DIFF_KEYS = ("macs", "params")


def diff_tables(diff: dict[str, Any]) -> tuple[Table, Table]:
    """A plan diff (``PlanDiff.to_dict()``) as two tables: the models' costs, and per group (then all groups
    at once) the channels kept by both plans or only one, their Jaccard and what each set costs."""
    a, b = diff["names"]
    costs = (["model", "MACs", "params"],
             [[label, f"{diff['costs'][k]['macs']:,}", f"{diff['costs'][k]['params']:,}"]
              for label, k in (("original", "original"), (a, "a"), (b, "b"), ("kept by both", "both"))])
    head = ["group", "channels", "kept by both", f"only {a}", f"only {b}", "Jaccard", f"MACs only {a}",
            f"params only {a}", f"MACs only {b}", f"params only {b}", f"MACs both (in {a})", f"params both (in {a})"]
    rows = [[g["group"], f"{g['size']:,}", f"{g['both']:,}", f"{g['only_a']:,}", f"{g['only_b']:,}",
             f"{g['jaccard']:.2f}", *(f"{g[c][k]:,}" for c in ("cost_only_a", "cost_only_b", "cost_both") for k in DIFF_KEYS)]
            for g in [*diff["groups"], diff["total"]]]
    return costs, (head, rows)


def warm_text(data: dict[str, Any]) -> list[str]:
    """What a warm-started run did, in sentences (none without a warm start)."""
    w = data.get("warm_start")
    if not w:
        return []
    outcome = {"kept": "the previous plan held as it was", "grown back": "the previous plan held with groups grown back",
               "abandoned": "the warm start was abandoned; the run adapted the updated model from its full width",
               "not tried": "not tried: the budget held without it"}
    tries = w.get("tries", 0)
    out = [(f"Warm start from {w.get('source') or 'a previous plan'}: {outcome.get(w.get('outcome', ''), 'not finished')} "
            f"({tries} {'try' if tries == 1 else 'tries'}).")]
    if w.get("restored") and w.get("outcome") != "abandoned":
        out.append("Grown back (the update needs them): " + ", ".join(map(str, w["restored"])) + ".")
    out += [f"Not mapped: {d}" for d in w.get("dropped") or []]
    out += [f"Also cut: {x}" for x in w.get("extended") or []]
    out += [f"Note: {x}" for x in w.get("notes") or []]
    if w.get("diff"):
        out.append(str(w["diff"].get("summary", "")))
    return out


def onnx_text(data: dict[str, Any]) -> str:
    onnx = data.get("onnx") or {}
    if onnx.get("error"):
        return f"ONNX export failed: {onnx['error']}"
    if onnx.get("path"):
        return f"pruned model exported to {onnx['path']} ({number(onnx.get('bytes') or 0) / 1e6:.2f} MB)"
    return "no ONNX export in this run (adaprune export RUN_DIR --onnx)"


def exported_table(data: dict[str, Any]) -> Table | None:
    """Latency of the exported model (``adaprune export``), per runtime."""
    rows = data.get("exported_latency")
    if not rows:
        return None
    out = []
    for r in rows:
        if r.get("error"):
            out.append([r["backend"], str(r.get("threads", "")), "", "not measured", r["error"]])
        else:
            out.append(
                [
                    r["backend"],
                    str(r.get("threads", "")),
                    str(r.get("batch_size", "")),
                    fmt("latency", r.get("median_ms")),
                    fmt("latency", r.get("p90_ms")),
                ]
            )
    return ["runtime", "threads", "batch", "median", "p90"], out


# -- HTML ------------------------------------------------------------------------------------------
def _html_table(table: Table, reason_col: int | None = None) -> str:
    head, rows = table
    e = html.escape
    heads = [
        f'<th class="reason">{e(h)}</th>' if i == reason_col else f"<th>{e(h)}</th>"
        for i, h in enumerate(head)
    ]
    out = ["<table><thead><tr>" + "".join(heads) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ""
            if i == reason_col:
                cls = ' class="reason"'
            elif c == "accepted":
                cls = ' class="ok"'
            elif c == "rolled back":
                cls = ' class="bad"'
            cells.append(f"<td{cls}>{e(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _figure(name: str, caption: str, png: bytes) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="plot-{name}"><img alt="{html.escape(caption)}" src="{src}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def to_html(data: dict[str, Any], plots: dict[str, tuple[str, bytes]]) -> str:
    e = html.escape
    met = data.get("budget_met")
    badge = '<span class="ok">budget met</span>' if met else '<span class="bad">budget not met</span>'
    if data.get("status") != "finished":
        badge = f'<span class="bad">{e(str(data.get("status")))}</span>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(data['title'])}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(data['title'])}</h1>",
        f'<p class="muted">{e(data.get("model") or "")} · {e(data.get("created", ""))}</p>',
        f'<p class="status">{badge} — {e(data["message"])}</p>',
        *(f'<p class="status">Warning: {e(w)}</p>' for w in data.get("warnings") or []),
        f"<p>Budget: {e(budget_text(data))}</p>",
        "<h2>Summary</h2>",
        _html_table(summary_table(data)),
        f"<p>{e(onnx_text(data))}</p>",
    ]
    exported = exported_table(data)
    if exported is not None:
        parts.append(_html_table(exported))
    comp = data.get("comparison")
    if comp:
        parts += [
            f"<h2>{e(comp.get('title', 'Comparison'))}</h2>",
            _html_table((comp["columns"], comp["rows"])),
        ]
    warm = warm_text(data)
    if warm:
        parts += ["<h2>Warm start</h2>", *(f"<p>{e(line)}</p>" for line in warm)]
        if data["warm_start"].get("diff"):
            parts += [_html_table(t) for t in diff_tables(data["warm_start"]["diff"])]
    for name in ("steps", "pareto"):
        if name in plots:
            parts.append(_figure(name, *plots[name]))
    steps = steps_table(data)
    parts += ["<h2>Steps</h2>", _html_table(steps, reason_col=steps[0].index("reason"))]
    parts.append("<h2>Layer widths</h2>")
    if "widths" in plots:
        parts.append(_figure("widths", *plots["widths"]))
    parts.append(
        "<details><summary>Table of widths</summary>" + _html_table(layers_table(data)) + "</details>"
    )
    sens = sensitivity_table(data)
    if sens is not None:
        parts.append("<h2>Sensitivity</h2>")
        if "sensitivity" in plots:
            parts.append(_figure("sensitivity", *plots["sensitivity"]))
        parts.append(_html_table(sens))
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    parts += [f'<p class="muted">{e(versions)}</p>', "</body></html>"]
    return "\n".join(parts)


# -- Markdown --------------------------------------------------------------------------------------
def _md_cell(c: str) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    head, rows = table
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(data: dict[str, Any], plot_files: dict[str, tuple[str, str]]) -> str:
    """Markdown; ``plot_files`` maps plot names to (caption, path relative to the .md file)."""

    def img(name: str) -> list[str]:
        if name not in plot_files:
            return []
        caption, path = plot_files[name]
        return [f"![{caption}]({path})", "", f"*{caption}*", ""]

    status = "budget met" if data.get("budget_met") else "budget not met"
    if data.get("status") != "finished":
        status = str(data.get("status"))
    out = [
        f"# {data['title']}",
        "",
        f"**{status}** — {data['message']}",
        "",
        *(f"**Warning:** {w}\n" for w in data.get("warnings") or []),
        f"Budget: {budget_text(data)}",
        "",
        "## Summary",
        "",
        _md_table(summary_table(data)),
        "",
        onnx_text(data),
        "",
    ]
    exported = exported_table(data)
    if exported is not None:
        out += [_md_table(exported), ""]
    comp = data.get("comparison")
    if comp:
        out += [f"## {comp.get('title', 'Comparison')}", "", _md_table((comp["columns"], comp["rows"])), ""]
    warm = warm_text(data)
    if warm:
        out += ["## Warm start", "", *(f"{line}\n" for line in warm)]
        if data["warm_start"].get("diff"):
            out += [x for t in diff_tables(data["warm_start"]["diff"]) for x in (_md_table(t), "")]
    out += img("steps") + img("pareto")
    out += ["## Steps", "", _md_table(steps_table(data)), "", "## Layer widths", ""] + img("widths")
    out += [_md_table(layers_table(data)), ""]
    sens = sensitivity_table(data)
    if sens is not None:
        out += ["## Sensitivity", ""] + img("sensitivity") + [_md_table(sens), ""]
    versions: Sequence[str] = [f"{k} {v}" for k, v in data.get("versions", {}).items()]
    out += [f"<sub>{', '.join(versions)} · {data.get('created', '')}</sub>", ""]
    return "\n".join(out)
