"""The controller's state and its run directory: written atomically after every step, resumable.

A run directory holds ``state.json`` (controller state, history, the removals so far relative to
the original model) and ``weights-<step>.safetensors`` (the working model's weights after the last
accepted step). ``state.json`` is replaced atomically after the weights file it names is complete,
so a run killed at any instant leaves a consistent directory. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

STATE_VERSION = 1


@dataclass
class StepRecord:
    """One step of the controller: what it tried, what it measured, what it decided and why."""

    step: int
    step_size: float
    cuts: dict[str, int]
    metrics: dict[str, float]
    costs: dict[str, float]
    accepted: bool
    reason: str


@dataclass
class ControllerState:
    """Everything needed to continue a run: plain data, JSON-serialisable."""

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

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = STATE_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ControllerState:
        data = json.loads(text)
        if data.pop("version", None) != STATE_VERSION:
            raise ConfigError("the run directory was written by another adaprune version; start a new run")
        data["history"] = [StepRecord(**h) for h in data.get("history", [])]
        return cls(**data)


class RunDir:
    """Atomic writes and reads of a run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def exists(self) -> bool:
        return self.state_file.exists()

    def save(self, state: ControllerState, model: nn.Module) -> None:
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        name = f"weights-{state.step:04d}.safetensors"
        tmp = self.path / (name + ".tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path / name)
        previous = state.weights
        state.weights = name
        tmp_state = self.path / "state.json.tmp"
        tmp_state.write_text(state.to_json())
        os.replace(tmp_state, self.state_file)
        if previous and previous != name:
            (self.path / previous).unlink(missing_ok=True)

    def load(self) -> ControllerState:
        try:
            return ControllerState.from_json(self.state_file.read_text())
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"cannot resume from {self.path}: state.json is unreadable ({exc})") from exc

    def load_weights(self, state: ControllerState, model: nn.Module) -> None:
        from safetensors.torch import load_file

        path = self.path / state.weights
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"cannot resume: weights file {path} is missing or corrupt ({exc})") from exc
        missing = set(model.state_dict()) - set(tensors)
        if missing:
            raise ConfigError(f"cannot resume: {path} lacks {sorted(missing)[:3]} ...; was the model changed?")
        with torch.no_grad():
            model.load_state_dict(tensors, strict=True)
