"""Plots of a report dict, as PNG bytes (matplotlib's object API and the Agg canvas; pyplot's global
state is never touched). Each function returns ``None`` when the report has nothing to draw.

Only values that can be placed on an axis are drawn: NaN, infinities and magnitudes beyond
:data:`AXIS_LIMIT` (a diverged step, a corrupted but well-typed report.json) are left out of the
plots; the report's tables still show them.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.ticker import MaxNLocator

from ..cost.registry import COSTS, cost_order

ACCEPTED = {"marker": "o", "color": "#1a7f37", "label": "accepted"}
ROLLED_BACK = {"marker": "x", "color": "#cf222e", "label": "rolled back"}
NOT_USED = {"marker": "+", "color": "#6e7781", "label": "within tolerance, not used"}
ORIGINAL = {"marker": "s", "color": "#444444", "label": "original"}
KINDS = (ACCEPTED, ROLLED_BACK, NOT_USED)


def _kind(h: dict[str, Any]) -> dict[str, str]:
    """How a history record is drawn: accepted, rolled back, or within tolerance and not used (a size tried
    beside a larger one that was kept: ``alternatives``)."""
    return ACCEPTED if h["accepted"] else NOT_USED if h.get("unused") else ROLLED_BACK


AXIS_LIMIT = 1e300
"""Larger magnitudes make matplotlib's tick and layout arithmetic overflow (float max is 1.8e308)."""
LABELS = 40
"""The Pareto chart numbers every accepted step up to this many; beyond, only this many points of the
front, evenly spaced (thousands of labels are unreadable, and laying them out takes minutes)."""


def _value(v: Any) -> float | None:
    """``v`` as a float that can be drawn, or None (not a number, NaN, infinite, beyond AXIS_LIMIT)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an int beyond the float range
        return None
    return f if math.isfinite(f) and abs(f) <= AXIS_LIMIT else None


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError("reports need matplotlib: pip install 'adaprune[report]'") from exc
    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _fraction(data: dict[str, Any], costs: dict[str, float], key: str) -> float | None:
    base = _value(data["costs_before"].get(key))
    value = _value(costs.get(key))
    if not base or value is None:
        return None
    return _value(value / base)


def _points(pairs: Any) -> list[tuple[float, float]]:
    """The pairs whose both coordinates can be drawn, as floats."""
    out = []
    for x, y in pairs:
        fx, fy = _value(x), _value(y)
        if fx is not None and fy is not None:
            out.append((fx, fy))
    return out


def _cost_keys(data: dict[str, Any]) -> list[str]:
    """The budgeted costs (in registry order), restricted to those the steps recorded; MACs if none."""
    recorded = set(data["costs_before"])
    bounded = []
    for k in data["budget"]:  # a keyword (latency_ms) draws the cost it bounds
        entry = COSTS.for_key(k)
        bounded.append(k if entry is None else entry.name)
    keys = [k for k in cost_order(bounded) if k in recorded]
    return keys or ["macs"]


def steps(data: dict[str, Any]) -> bytes | None:
    """Metric (top) and budgeted costs as a fraction of the original (bottom) at every step."""
    history = data["history"]
    if not history:
        return None
    panels = [(c["metric"], c.get("higher_is_better", True), c.get("tolerance")) for c in data.get("criteria") or []]
    panels = panels or [(data["metric"], data.get("higher_is_better", True), data.get("tolerance"))]
    fig = _figure(8, 3.2 + 2.3 * len(panels))
    *tops, bottom = fig.subplots(len(panels) + 1, 1, sharex=True)
    for top, (metric, higher, tolerance) in zip(tops, panels):  # one panel per task's metric
        base = _value(data["before"].get(metric))
        if base is not None:
            top.axhline(base, color="#888888", linewidth=1, linestyle="--", label="original")
            tol = _value(tolerance)
            floor = None if tol is None else _value(base - tol if higher else base + tol)
            if floor is not None:
                top.axhline(floor, color="#cf222e", linewidth=1, linestyle=":", label="tolerance limit")
        for style in KINDS:
            pts = _points((h["step"], h["metrics"].get(metric)) for h in history if _kind(h) is style)
            if pts:
                xs, ys = zip(*pts)
                top.scatter(xs, ys, s=40, **style)
        top.set_ylabel(metric.replace("$", r"\$"))  # a name is text, never math
        top.legend(fontsize=8, loc="best")
    tops[0].set_title("metric" + ("s" if len(panels) > 1 else "") + " and cost after every step")
    for key in _cost_keys(data):
        for style in KINDS:
            pts = _points((h["step"], _fraction(data, h["costs"], key)) for h in history if _kind(h) is style)
            if pts:
                xs, ys = zip(*pts)
                bottom.scatter(
                    xs,
                    ys,
                    s=40,
                    marker=style["marker"],
                    color=style["color"],
                    label=f"{key}, {style['label']}",
                )
        bound = data["budget"].get(key)
        if isinstance(bound, (int, float)) and 0 < bound <= 1:
            bottom.axhline(bound, linestyle="--", linewidth=1, color="#0969da", label=f"{key} bound")
    bottom.set_xlabel("step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("fraction of original")
    bottom.legend(fontsize=8, loc="best")
    return _png(fig)


def _frontier(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points not dominated by another (less cost, better metric)."""
    sign = 1.0 if higher_is_better else -1.0
    out: list[tuple[float, float]] = []
    best = float("-inf")
    for c, m in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * m > best:
            out.append((c, m))
            best = sign * m
    return out


def _labelled(steps: list[tuple[Any, float, float]], front: list[tuple[float, float]]) -> list[tuple[Any, float, float]]:
    """The accepted steps to number on the chart: all up to :data:`LABELS`, else at most that many of
    those on the front (the first and the last among them), evenly spaced."""
    if len(steps) <= LABELS:
        return steps
    on_front = set(front)
    chosen = [s for s in steps if (s[1], s[2]) in on_front] or steps
    if len(chosen) <= LABELS:
        return chosen
    return [chosen[round(i * (len(chosen) - 1) / (LABELS - 1))] for i in range(LABELS)]


def pareto(data: dict[str, Any]) -> bytes | None:
    """Accepted steps on cost (MACs, and latency if measured) vs metric, with their Pareto front."""
    metric = data["metric"]
    base = _value(data["before"].get(metric))
    if base is None:
        return None
    keys = ["macs"] + [e.name for e in COSTS.measured() if e.name in data["costs_before"]]
    fig = _figure(5.5 * len(keys), 4.2)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        steps = []  # (step, cost fraction, metric) of the accepted steps that can be drawn
        for h in data["history"]:
            if h["accepted"]:
                steps += [(h["step"], f, m) for f, m in _points([(_fraction(data, h["costs"], key),
                                                                  h["metrics"].get(metric))])]
        points = [(1.0, base)] + [(f, m) for _, f, m in steps]
        rolled, unused = (_points((_fraction(data, h["costs"], key), h["metrics"].get(metric))
                                  for h in data["history"] if _kind(h) is kind) for kind in (ROLLED_BACK, NOT_USED))
        front = _frontier(points, data.get("higher_is_better", True))
        ax.plot(*zip(*front), color="#1a7f37", linewidth=1, alpha=0.6, label="Pareto front")
        ax.scatter([1.0], [base], s=50, **ORIGINAL)
        if steps:
            ax.scatter(*zip(*points[1:]), s=40, **ACCEPTED)
            labelled = _labelled(steps, front)
            for step, f, m in labelled:
                ax.annotate(str(step), (f, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if len(labelled) < len(steps):
                ax.set_title(f"step numbers on {len(labelled)} of {len(steps)} points", fontsize=8)
        if rolled:
            ax.scatter(*zip(*rolled), s=40, alpha=0.5, **ROLLED_BACK)
        if unused:
            ax.scatter(*zip(*unused), s=40, alpha=0.5, **NOT_USED)
        ax.set_xlabel(f"{key} (fraction of original)")
        ax.set_ylabel(metric)
        ax.invert_xaxis()
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{metric} against cost, accepted steps")
    return _png(fig)


def widths(data: dict[str, Any], top: int = 60) -> bytes | None:
    """Per-layer output widths before and after (horizontal bars), at most ``top`` layers."""
    # a width beyond what an axis can show is left out of the chart (the table shows it)
    drawable = [lay for lay in data["layers"] if _value(lay["before"]) is not None and _value(lay["after"]) is not None]
    layers = drawable[:top]
    if not layers:
        return None
    fig = _figure(8, max(2.5, 0.26 * len(layers) + 1.2))
    ax = fig.subplots()
    ys = list(range(len(layers)))
    ax.barh(
        [y + 0.2 for y in ys], [lay["before"] for lay in layers], height=0.4, color="#c8ccd1", label="before"
    )
    ax.barh(
        [y - 0.2 for y in ys], [lay["after"] for lay in layers], height=0.4, color="#0969da", label="after"
    )
    ax.set_yticks(ys)
    ax.set_yticklabels([lay["name"] for lay in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels / features")
    more = len(data["layers"]) - len(layers)
    ax.set_title(
        "width per layer" + (f" (first {len(layers)}; {more} more in the table)" if more > 0 else "")
    )
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def sensitivity(data: dict[str, Any], top: int = 12) -> bytes | None:
    """Metric against the fraction of each cluster's channels masked, for the most sensitive clusters."""
    sens = data.get("sensitivity")
    if not sens or not sens.get("rows"):
        return None
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in sens["rows"]:
        for point in _points([(r["ratio"], r["metric"])]):
            curves.setdefault(r["cluster"], []).append(point)
    if not curves:
        return None
    sign = 1.0 if data.get("higher_is_better", True) else -1.0
    names = sorted(curves, key=lambda n: min(sign * m for _, m in curves[n]))[:top]
    baseline = _value(sens["baseline"])
    origin = [] if baseline is None else [(0.0, baseline)]
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    for n in names:
        xs, ys = zip(*(origin + sorted(curves[n])))
        ax.plot(xs, ys, marker="o", label=n)
    if baseline is not None:
        ax.axhline(baseline, color="#888888", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("fraction of the cluster's channels masked (no fine-tuning)")
    ax.set_ylabel(sens.get("metric") or data["metric"])
    ax.set_title("sensitivity per cluster of groups")
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


PLOTS = {
    "steps": (("Metric and cost at every step (accepted: green circles, rolled back: red crosses; with several "
              "sizes tried at once, those within tolerance and not used: grey pluses)"), steps),
    "pareto": ("Accepted steps: cost against metric, with the Pareto front", pareto),
    "widths": ("Output width of each conv / linear layer, before and after", widths),
    "sensitivity": ("Sensitivity of the original model, per cluster of groups", sensitivity),
}


def render_all(data: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """Every plot the report has data for: ``{name: (caption, png)}``."""
    out = {}
    for name, (caption, fn) in PLOTS.items():
        png = fn(data)
        if png is not None:
            out[name] = (caption, png)
    return out
