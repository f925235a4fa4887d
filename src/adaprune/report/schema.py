"""The schema of ``report.json`` and ``sensitivity.json``: what :func:`adaprune.report.load` accepts.

A report read back from disk (``adaprune report RUN_DIR`` re-renders it) is validated field by field
before anything draws it, so a file of the wrong shape is one
:class:`~adaprune.errors.FileFormatError` naming the field, never a ``KeyError`` inside a renderer.
Unknown keys are kept (a newer adaprune may add some); known keys must have their types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Number = float | int
"""JSON numbers; NaN and infinity are allowed (a diverged step records them)."""


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StepRow(_Loose):
    step: int = Field(ge=0)
    step_size: Number = 0.0
    cuts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, Number] = Field(default_factory=dict)
    costs: dict[str, Number] = Field(default_factory=dict)
    accepted: bool
    reason: str = ""
    optimizer_steps: int | None = Field(default=None, ge=0)  # absent in reports from before it was recorded
    interval: list[Number] | None = None  # [low, high] of the metric's drop; absent without per-example values
    refit: str = ""
    unused: bool = False  # a size tried beside a larger one that was kept (alternatives); absent before them


class LayerRow(_Loose):
    name: str
    kind: str
    before: int = Field(ge=0)
    after: int = Field(ge=0)


class LatencyRow(_Loose):
    backend: str
    threads: int | None = None
    batch_size: int | None = None
    repeats: int | None = None
    before_ms: Number | None = None
    after_ms: Number | None = None
    median_ms: Number | None = None
    p90_ms: Number | None = None
    error: str | None = None


class SensitivityRow(_Loose):
    cluster: str
    groups: list[str] = Field(default_factory=list)
    ratio: Number
    metric: Number


class SensitivityFile(_Loose):
    metric: str
    baseline: Number
    rows: list[SensitivityRow] = Field(default_factory=list)


class Comparison(_Loose):
    title: str = "Comparison"
    columns: list[str]
    rows: list[list[str]]


class Onnx(_Loose):
    path: str | None = None
    bytes: int | None = Field(default=None, ge=0)
    error: str | None = None


class Criterion(_Loose):
    name: str
    metric: str
    higher_is_better: bool = True
    tolerance: Number | None = None


class ReportFile(_Loose):
    format: Literal["adaprune-report"]
    version: Literal[1]
    title: str
    created: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    status: str = "finished"
    model: str = ""
    metric: str
    higher_is_better: bool = True
    tolerance: Number | None = None
    criteria: list[Criterion] = Field(default_factory=list)  # a MultiTask's tasks (one metric curve each)
    warm_start: dict[str, Any] | None = None  # what a warm start did, and the plan diff (report.render.warm_text)
    budget: dict[str, str | Number | None] = Field(default_factory=dict)
    budget_met: bool = False
    message: str = ""
    before: dict[str, Number]
    after: dict[str, Number]
    costs_before: dict[str, Number]
    costs_after: dict[str, Number]
    history: list[StepRow] = Field(default_factory=list)
    optimizer_steps: int | None = Field(default=None, ge=0)
    warnings: list[str] = Field(default_factory=list)
    evaluations: int | None = Field(default=None, ge=0)
    layers: list[LayerRow] = Field(default_factory=list)
    latency: list[LatencyRow] = Field(default_factory=list)
    onnx: Onnx = Field(default_factory=Onnx)
    sensitivity: SensitivityFile | None = None
    comparison: Comparison | None = None
    exported_latency: list[LatencyRow] | None = None


def as_data(model: BaseModel) -> dict[str, Any]:
    """The validated file back as the plain dict the renderers take: every list and mapping present
    (defaults filled in), an optional value left out when the file did not give it, kept (``None``)
    when it gave ``null``, so a report re-rendered from its file is the same report."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if value is None and name not in model.model_fields_set:
            continue
        out[name] = _plain(value)
    out.update({k: _plain(v) for k, v in (model.model_extra or {}).items()})
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return as_data(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
