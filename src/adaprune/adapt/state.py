"""The controller's state: plain data, written to the run directory after every step, resumable.

``state.json`` holds the controller state, the history, the removals so far relative to the original
model, and the name of the weights file of the working model after the last accepted step. Reading it
back validates it against a schema (:class:`_StateFile`): a file of the wrong shape is one
:class:`~adaprune.errors.FileFormatError` naming the field, and the weights file it names must be a
plain name in the run directory (``weights-0003.safetensors``), never a path.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .. import fs
from ..errors import FileFormatError, shown

STATE_VERSION = 1
WEIGHTS_PATTERN = r"^weights-[0-9]{4,9}\.safetensors$"


@dataclass
class StepRecord:
    """One step of the controller: what it tried, what it measured, what it decided and why.

    ``optimizer_steps`` is how many optimizer steps the step's recovery asked the task's
    ``finetune(model, steps)`` for; a rolled-back step spent them too. State files written before it
    was recorded read back as 0. ``interval`` is the confidence interval ``[low, high]`` of the metric's
    drop when the task returned per-example values (the step was judged by ``high``); ``refit`` says
    whether the least-squares refit was kept, with the metric with and without it. ``unused``: a size tried
    beside the step's deciding one (``alternatives``) that was within tolerance and not kept, a larger one
    being kept; ``accepted`` is False for it, yet it was not rolled back for its drop.
    """

    step: int
    step_size: float
    cuts: dict[str, int]
    metrics: dict[str, float]
    costs: dict[str, float]
    accepted: bool
    reason: str
    optimizer_steps: int = 0
    interval: list[float] | None = None  # [low, high] of the metric drop (adaprune.adapt.noise), None without per-example values
    refit: str = ""  # what the least-squares refit did ("" when not tried)
    unused: bool = False  # within tolerance, tried beside a larger size that was kept (alternatives)


@dataclass
class Suspect:
    """A unit a rolled-back step cut, and the channels it cut there: the next step (on the same weights)
    measures which of them hurt (:func:`adaprune.adapt.blame.blame`)."""

    unit: str
    cut: dict[str, list[int]]  # group -> channels the step removed
    prior: float  # its probe's harm times the ratio the step cut: what ranks it when it is not measured
    step: int  # the rolled-back step
    over: float = 2.0  # that step's drop in tolerances (its judged drop over the tolerance)


@dataclass
class ControllerState:
    """Everything needed to continue a run: plain data, JSON-serialisable.

    ``signature`` identifies the original model's architecture (tensor names, shapes and dtypes), so a
    resume on another model is refused before anything is touched.
    """

    step: int = 0
    step_size: float = 0.2
    protected: list[str] = field(default_factory=list)
    caps: dict[str, float] = field(default_factory=dict)
    removals: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    history: list[StepRecord] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    original_costs: dict[str, float] = field(default_factory=dict)
    latency_table: dict[str, float] = field(default_factory=dict)
    done: bool = False
    message: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    signature: str = ""
    rejected: list[str] = field(default_factory=list)  # keys of plans rolled back, on the weights they were tried on
    baseline_examples: list[float] = field(default_factory=list)  # the original model's per-example values
    evaluations: int = 0  # calls of the task's evaluation so far
    part_evaluations: int = 0  # of them, on part of the validation data (probe_data < 1)
    stopped: str = ""  # the limit (time_limit / max_evaluations) that ended the run, if one did
    warnings: list[str] = field(default_factory=list)  # what the run warned about (a too-small validation set)
    probe_ratios: dict[str, float] = field(default_factory=dict)  # unit -> measured / estimated probe harm
    task_examples: dict[str, list[float]] = field(default_factory=dict)  # a MultiTask's, per task (else baseline_examples)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # per tensor and dim cut, its size in the original
    warm: dict[str, Any] | None = None  # a warm start's progress (adaprune.adapt.warm), None without one
    suspects: list[Suspect] = field(default_factory=list)  # the units a rolled-back step cut, not yet blamed

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = STATE_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, what: str = "state.json") -> ControllerState:
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:  # (JSONDecodeError is a ValueError)
            raise FileFormatError(f"{what}: not valid JSON ({type(exc).__name__})") from None
        return cls.from_data(raw, what)

    @classmethod
    def from_data(cls, raw: Any, what: str = "state.json") -> ControllerState:
        """Validated state from parsed JSON (:class:`~adaprune.errors.FileFormatError` if malformed)."""
        data = fs.parse(_StateFile, raw, what=what).model_dump()
        data.pop("version")
        data["history"] = [StepRecord(**h) for h in data["history"]]
        data["suspects"] = [Suspect(**u) for u in data["suspects"]]
        return cls(**data)


def model_signature(model: nn.Module) -> str:
    """A short hash of the model's tensor names, shapes and dtypes (its architecture, not its values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:32]


# -- the schema of state.json ---------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)



MAX_STEP = 999_999_999  # the weights file of a step is weights-<step>.safetensors, at most 9 digits


class _StepFile(_Strict):
    step: int = Field(ge=0, le=MAX_STEP)
    step_size: float
    cuts: dict[str, int]
    metrics: dict[str, float]
    costs: dict[str, float]
    accepted: bool
    reason: str
    optimizer_steps: int = Field(0, ge=0)  # absent in state files from before it was recorded
    interval: list[float] | None = None
    refit: str = ""
    unused: bool = False  # absent in state files from before alternatives


class _WarmFile(_Strict):
    key: str = Field(pattern=r"^[0-9a-f]{16}$")
    removed: dict[str, list[Annotated[int, Field(ge=0)]]]
    dropped: list[str]
    extended: list[str]
    notes: list[str] = Field(default_factory=list)
    harms: dict[str, Annotated[float, Field(allow_inf_nan=False)]]
    restored: list[str]
    grow: list[str] = Field(default_factory=list)
    tries: int = Field(ge=0)
    outcome: Literal["", "kept", "grown back", "abandoned", "not tried"]


class _SuspectFile(_Strict):
    unit: str
    cut: dict[str, list[Annotated[int, Field(ge=0)]]]
    prior: float = Field(allow_inf_nan=False)
    step: int = Field(ge=0, le=MAX_STEP)
    over: float = Field(2.0, allow_inf_nan=False)


class _StateFile(_Strict):
    version: Literal[1]
    step: int = Field(ge=0, le=MAX_STEP)
    step_size: float = Field(ge=0)
    protected: list[str] = Field(default_factory=list)
    caps: dict[str, float] = Field(default_factory=dict)
    removals: dict[str, dict[str, list[int]]] = Field(default_factory=dict)
    history: list[_StepFile] = Field(default_factory=list)
    baseline: dict[str, float] = Field(default_factory=dict)
    original_costs: dict[str, float] = Field(default_factory=dict)
    latency_table: dict[str, float] = Field(default_factory=dict)
    done: bool = False
    message: str = ""
    config: dict[str, str | int | float | bool | None] = Field(default_factory=dict)  # run_settings: flat
    weights: str = Field("", pattern=WEIGHTS_PATTERN + "|^$")
    signature: str = ""
    rejected: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] = Field(default_factory=list)  # absent before
    baseline_examples: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=list)
    evaluations: int = Field(0, ge=0)
    part_evaluations: int = Field(0, ge=0)
    stopped: str = ""
    warnings: list[str] = Field(default_factory=list)
    probe_ratios: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    task_examples: dict[str, list[Annotated[float, Field(allow_inf_nan=False)]]] = Field(default_factory=dict)
    sizes: dict[str, dict[str, Annotated[int, Field(ge=1)]]] = Field(default_factory=dict)
    warm: _WarmFile | None = None
    suspects: list[_SuspectFile] = Field(default_factory=list)

    @model_validator(mode="after")
    def _removals(self) -> _StateFile:
        for tensor, dims in self.removals.items():
            for d, idx in dims.items():
                if not d.isdigit() or any(i < 0 for i in idx):
                    raise ValueError(
                        f"removals[{shown(tensor)}][{shown(d)}] must map a dim to non-negative indices"
                    )
        return self


def run_settings(config: Any, budget: Any, ignore: list[str], task: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the controller's options, the budget,
    the modules kept whole (``ignore``, by name) and, for several tasks, what judges them (``task``:
    :func:`adaprune.multitask.task_settings`)."""
    options = {k: v for k, v in asdict(config).items() if k not in RUN_LIMITS}
    # (added later: at the default, a run saved before them resumes)
    for later, default in (("probe_data", 1.0), ("uniform_layers", False), ("alternatives", 1)):
        if options.get(later) == default:
            del options[later]
    return json.loads(json.dumps({**options, "budget": repr(budget), "ignore": json.dumps(sorted(ignore)), **(task or {})}))


RUN_LIMITS = ("time_limit", "max_evaluations")
"""Options that limit how long a run goes on, not what it does: a resumed run may take other ones."""


def check_resumable(state: ControllerState, settings: dict[str, Any], signature: str, where: str) -> None:
    """Refuse (before anything is changed) to resume ``state`` with other settings or on another model."""
    from ..errors import RunDirError

    if state.config.get("warm_start") != settings.get("warm_start"):
        raise RunDirError(
            f"cannot resume {where}: " + (
                "it was warm-started; pass the same warm_start= (--warm-start) to resume it"
                if "warm_start" not in settings else
                "it was not warm-started; resume it without warm_start= (--warm-start)"
                if "warm_start" not in state.config else
                "it was warm-started from another plan; pass the same warm_start= (--warm-start) to resume it")
            + ", or start over with --force / force=True")
    if state.config != settings:
        changed = sorted(k for k in set(state.config) | set(settings) if state.config.get(k) != settings.get(k))
        raise RunDirError(
            f"cannot resume {where}: it was started with other settings ({', '.join(changed[:4])} differ); pass "
            "the same budget and options, or start over with --force / force=True, or use a new run directory"
        )
    if any(not math.isfinite(v) for v in state.baseline.values()):
        raise RunDirError(
            f"cannot resume {where}: state.json records a non-finite original metric; the file is damaged: "
            "start over with --force / force=True, or use a new run directory"
        )
    if state.signature and state.signature != signature:
        raise RunDirError(
            f"cannot resume {where}: it was started on another model (the tensor names, shapes or dtypes "
            "differ); resume with the model the run started with, or use a new run directory"
        )
