"""The report's data: a plain, JSON-serialisable dict built from an :class:`~adaprune.AdaptResult`.

Everything the renderers draw comes from this dict, so a run directory's ``report.json`` is enough to
re-render the report (``adaprune report RUN_DIR``). Measuring (layer widths, latency on torch and
ONNX Runtime) happens here too, on the models, before the dict is built.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from .. import fs
from ..cost.budget import Budget
from ..cost.latency import measure_latency
from ..errors import FileFormatError, shown
from ..layers import output_width
from . import schema

FORMAT = "adaprune-report"
VERSION = 1

__all__ = [
    "build",
    "collect",
    "from_state",
    "latency_pairs",
    "layer_widths",
    "load_json",
    "measure",
    "save_json",
]


class ReportError(FileFormatError):
    """A report file is missing, unreadable, of another format version or of the wrong shape."""


def layer_widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Output width of every layer of a kind that reports one (the layer registry's ``width``: convs,
    linears, transformers' ``Conv1D`` ...), read from its weight: ``{name: {kind, width}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        width = output_width(m)
        if width is not None:
            out[name or "(model)"] = {"kind": type(m).__name__, "width": width}
    return out


def measure(
    model: nn.Module,
    example_inputs: Any,
    backends: Sequence[str] = ("torch", "onnxruntime"),
    threads: int = 1,
    repeats: int = 20,
) -> list[dict[str, Any]]:
    """Median latency per backend (an ``error`` entry where a backend cannot run the model)."""
    rows: list[dict[str, Any]] = []
    for backend in backends:
        try:
            lat = measure_latency(model, example_inputs, backend=backend, threads=threads, repeats=repeats)
        except Exception as exc:  # noqa: BLE001  (a backend that cannot run the model is reported, not fatal)
            rows.append(
                {"backend": backend, "threads": threads, "error": f"{type(exc).__name__}: {exc}"[:300]}
            )
            continue
        rows.append(
            {
                "backend": lat.backend,
                "threads": lat.threads,
                "batch_size": lat.batch_size,
                "repeats": lat.repeats,
                "median_ms": lat.median_ms,
                "p90_ms": lat.p90_ms,
            }
        )
    return rows


def latency_pairs(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join per-backend measurements of the original and the pruned model into before/after rows."""
    by_backend = {r["backend"]: r for r in before}
    rows = []
    for a in after:
        b = by_backend.get(a["backend"], {})
        row: dict[str, Any] = {k: a[k] for k in ("backend", "threads", "batch_size", "repeats") if k in a}
        row["before_ms"], row["after_ms"] = b.get("median_ms"), a.get("median_ms")
        error = a.get("error") or b.get("error")
        if error:
            row["error"] = error
        rows.append(row)
    return rows


def _versions() -> dict[str, str]:
    from ..io import versions

    return versions()


def _layers(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": n, "kind": b["kind"], "before": b["width"], "after": after.get(n, b)["width"]}
        for n, b in before.items()
    ]


def _sensitivity(sens: Any, metric: str) -> dict[str, Any] | None:
    if sens is None or isinstance(sens, dict):
        return sens
    return {
        "metric": metric,
        "baseline": float(sens.baseline),
        "rows": [
            {"cluster": r.cluster, "groups": list(r.groups), "ratio": r.ratio, "metric": r.metric}
            for r in sens.rows
        ],
    }


def _budget(budget: Any) -> dict[str, Any]:
    """The budget as the report stores it: the bounds set (by keyword), backend and threads."""
    if budget is None:
        return {}
    if isinstance(budget, Budget):
        return {**budget.bounds, "backend": budget.backend, "threads": budget.threads}
    return dict(budget)


def _optimizer_steps(result: Any, history: list[dict[str, Any]]) -> int | None:
    """The optimizer steps the run spent: the result's own count when it has one (an
    :class:`AdaptResult`), else the sum of its steps' counts; ``None`` when a step did not record it
    (a run directory from before they were recorded)."""
    own = getattr(result, "optimizer_steps", None)
    if own is not None:
        return int(own)
    counts = [c for h in history if isinstance(c := h.get("optimizer_steps"), int)]
    return sum(counts) if len(counts) == len(history) else None


def build(
    result: Any,
    *,
    metric: str | None = None,
    higher_is_better: bool = True,
    tolerance: float | None = None,
    criteria: Any = None,
    budget: Any = None,
    widths_before: dict[str, dict[str, Any]] | None = None,
    widths_after: dict[str, dict[str, Any]] | None = None,
    latency: list[dict[str, Any]] | None = None,
    onnx: dict[str, Any] | None = None,
    sensitivity: Any = None,
    comparison: dict[str, Any] | None = None,
    title: str = "adaprune report",
    model_name: str = "",
    status: str = "finished",
    warm_source: str | None = None,
    plan_diff: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict of an adapt result (an :class:`AdaptResult` or any object with its fields). A
    warm-started run's report says what the warm start did (``result.warm_start``, from ``warm_source``)
    and, with ``plan_diff`` (``PlanDiff.to_dict()`` of the previous plan against this run's), how the plans
    differ."""
    before = {k: float(v) for k, v in result.before.items()}
    if metric is None:
        metric = "accuracy" if "accuracy" in before else next(iter(before), "metric")
    widths_before = widths_before or {}
    history = [h if isinstance(h, dict) else dataclasses.asdict(h) for h in result.history]
    return {
        "format": FORMAT,
        "version": VERSION,
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "status": status,
        "model": model_name,
        "metric": metric,
        "higher_is_better": bool(higher_is_better),
        "tolerance": tolerance,
        "criteria": [{"name": c.name, "metric": c.metric, "higher_is_better": bool(c.higher_is_better),
                      "tolerance": tolerance if c.tolerance is None else float(c.tolerance)}
                     for c in (criteria or []) if c.name],  # several tasks: one curve each in the steps plot
        "budget": _budget(budget),
        "budget_met": bool(result.budget_met),
        "message": str(result.message),
        "before": before,
        "after": {k: float(v) for k, v in result.after.items()},
        "costs_before": {k: float(v) for k, v in result.costs_before.items()},
        "costs_after": {k: float(v) for k, v in result.costs_after.items()},
        "history": history,
        "optimizer_steps": _optimizer_steps(result, history),
        "warnings": [str(w) for w in getattr(result, "warnings", [])],
        "evaluations": getattr(result, "evaluations", None),
        "layers": _layers(widths_before, widths_after or widths_before),
        "latency": latency or [],
        "onnx": onnx or {},
        "sensitivity": _sensitivity(sensitivity, metric),
        "comparison": comparison,
        "warm_start": _warm(getattr(result, "warm_start", None), warm_source, plan_diff),
    }


def _warm(warm: Any, source: str | None, plan_diff: dict[str, Any] | None) -> dict[str, Any] | None:
    if not warm:
        return None
    keep = ("outcome", "tries", "restored", "dropped", "extended", "notes")
    return {**{k: warm.get(k) for k in keep}, "source": source, "diff": plan_diff}


def collect(
    result: Any,
    original: nn.Module,
    example_inputs: Any,
    *,
    latency: bool = True,
    backends: Sequence[str] = ("torch", "onnxruntime"),
    threads: int = 1,
    repeats: int = 20,
    onnx_path: str | os.PathLike[str] | None = None,
    latency_inputs: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Measure the original and the pruned model (``result.model``), then :func:`build` the report.

    ``original`` is left unchanged. Latency is measured on ``latency_inputs`` (default: the example
    inputs) on each of ``backends``. With ``onnx_path`` the pruned model is exported there too.
    """
    onnx: dict[str, Any] = {}
    if onnx_path is not None:
        onnx = export(result.model, example_inputs, onnx_path)
    pairs = None
    if latency:
        xs = example_inputs if latency_inputs is None else latency_inputs
        pairs = latency_pairs(
            measure(original, xs, backends, threads, repeats),
            measure(result.model, xs, backends, threads, repeats),
        )
    return build(
        result,
        widths_before=layer_widths(original),
        widths_after=layer_widths(result.model),
        latency=pairs,
        onnx=onnx,
        **kwargs,
    )


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path``; returns ``{path, bytes}`` or ``{error}``."""
    import contextlib
    import io

    from ..onnx_export import export_onnx

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            out = export_onnx(model, example_inputs, path)
    except Exception as exc:  # noqa: BLE001  (an export failure is reported in the report, not fatal)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"path": Path(out).name, "bytes": Path(out).stat().st_size}


def _steps_so_far(history: list[dict[str, Any]]) -> str:
    """``"3 steps"``, or with several sizes tried in a step (alternatives) ``"3 steps (9 sizes tried)"``."""
    steps = len({h.get("step") for h in history})
    return f"{steps} step{'' if steps == 1 else 's'}" + ("" if steps == len(history) else f" ({len(history)} sizes tried)")


def from_state(state: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A report of an unfinished run from its ``state.json`` (the last accepted step is the 'after')."""
    history = state.get("history", [])
    accepted = [h for h in history if h.get("accepted")]
    last = accepted[-1] if accepted else None

    partial = SimpleNamespace(
        before=state.get("baseline", {}),
        after=last["metrics"] if last else state.get("baseline", {}),
        costs_before=state.get("original_costs", {}),
        costs_after=last["costs"] if last else state.get("original_costs", {}),
        history=history,
        budget_met=False,
        message=state.get("message")
        or f"run not finished: {_steps_so_far(history)} so far ({len(accepted)} accepted)",
        warnings=state.get("warnings", []),
        evaluations=state.get("evaluations"),
    )
    kwargs.setdefault("status", "finished" if state.get("done") else "interrupted")
    return build(partial, **kwargs)


def save_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` atomically (temporary file + ``os.replace``)."""
    return fs.write_atomic(path, json.dumps(data, indent=1, default=float).encode("utf-8"), what="report.json")


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A report read back and validated (:class:`ReportError` naming the field if malformed)."""
    p = Path(path)
    try:
        raw = fs.read_json(p, what="report.json")
        if isinstance(raw, dict) and raw.get("format") != FORMAT:
            raise ReportError(f"{p} is not an adaprune report (its format is {shown(raw.get('format'))})")
        if isinstance(raw, dict) and raw.get("version") != VERSION:
            raise ReportError(f"{p} is report format {shown(raw.get('version'))}, this adaprune reads {VERSION}")
        return schema.as_data(fs.parse(schema.ReportFile, raw, what=f"report.json ({p})"))
    except ReportError:
        raise
    except FileFormatError as exc:
        raise ReportError(str(exc)) from None


def load_sensitivity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``sensitivity.json`` read back and validated."""
    p = Path(path)
    try:
        return schema.as_data(fs.read_model(schema.SensitivityFile, p, what="sensitivity.json"))
    except FileFormatError as exc:
        raise ReportError(str(exc)) from None
