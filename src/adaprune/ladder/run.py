"""A ladder's run directory: what :func:`adaprune.ladder` has done so far, so a killed build resumes.

It is a :class:`~adaprune.adapt.RunDir` (marked, locked while a build holds it, every file written
atomically) holding:

- ``ladder-ordered.safetensors``: the model after its channels were reordered, before any recovery
  step (written once; the joint recovery's distillation teacher and the base every rung is cut from);
- ``ladder-rung-<k>.safetensors``: rung ``k``, the last allocated, as the allocation left it
  (physically pruned; :func:`adaprune.adapt` recalibrates its BatchNorm statistics, so it is more
  than a slice of the ordered weights): the next rung is cut from it. Named by rung, so a file
  written before the state that would name it was committed is never taken for the rung before;
- ``ladder-recovery-<step>.safetensors``: during the joint recovery, the full model's state and the
  optimizer's (Adam: its moments and step count per parameter) after ``<step>`` steps; written every
  ``checkpoint_every`` steps and after the last, the previous one deleted once the next is committed;
- ``ladder-state.json``: the commit point, replaced after every stage: the settings and the model's
  signature (a resumed build must be given the same), the original model's metrics and costs (so the
  rungs' absolute budgets stay the ones the build started with, a measured latency included), the
  widths of every rung allocated so far, the evaluations so far, the recovery steps taken and the
  checkpoint holding them.

Resuming loads the ordered weights instead of ordering again, allocates only the rungs not yet
allocated, and continues the recovery from its last checkpoint (the optimizer's state restored, the
batches already used skipped, the sandwich rule's random middle rungs replayed), so with a task whose
batches and evaluation are deterministic a resumed build ends with the same ladder as one that was
never stopped. The recalibration and the measurements after the recovery are repeated (they are
cheap). Nothing is unpickled: safetensors and validated JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .. import fs
from ..adapt.ownership import LADDER_ORDERED, LADDER_STATE
from ..adapt.rundir import RunDir
from ..adapt.state import model_signature
from ..errors import RunDirError, shown

RECOVERY_PATTERN = r"^ladder-recovery-[0-9]{9}\.safetensors$"

Finite = Annotated[float, Field(allow_inf_nan=False)]


class LadderState(BaseModel):
    """The schema of ``ladder-state.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["adaprune-ladder-run"]
    version: Literal[1]
    settings: dict[str, str | int | float | bool | None]
    signature: str
    original: dict[str, Finite]
    values: dict[str, Finite]
    widths: list[dict[str, Annotated[int, Field(ge=0)]]] = Field(default_factory=list)
    evaluations: int = Field(0, ge=0)
    steps: int = Field(0, ge=0)
    checkpoint: str = Field("", pattern=RECOVERY_PATTERN + "|^$")


def settings_of(budgets: list[Any], tolerance: float, ignore: list[str], finetune_steps: int, importance: Any,
                lr: float, seed: int, allocation: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed build must share with the build it continues (flat JSON values)."""
    crit = importance if isinstance(importance, str) else getattr(importance, "__qualname__", type(importance).__qualname__)
    return {"rungs": json.dumps([repr(b) for b in budgets]), "tolerance": float(tolerance),
            "ignore": json.dumps(sorted(ignore)), "finetune_steps": int(finetune_steps), "importance": str(crit),
            "lr": float(lr), "seed": int(seed), "allocation": json.dumps(dict(allocation), sort_keys=True, default=repr)}


class LadderRun:
    """The ladder's view of its run directory (the module doc). Every method needs ``rd`` open."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd

    # -- the state ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.rd.path / LADDER_STATE).is_file()

    def load(self, settings: dict[str, Any], model: nn.Module) -> LadderState:
        """The state to resume from, checked against ``settings`` and ``model`` before anything changes."""
        where = str(self.rd.path)
        state = fs.read_model(LadderState, self.rd.path / LADDER_STATE, what=f"{LADDER_STATE} ({where})")
        if state.settings != settings:
            changed = sorted(k for k in set(state.settings) | set(settings) if state.settings.get(k) != settings.get(k))
            raise RunDirError(
                f"cannot resume the ladder in {where}: it was started with other settings ({', '.join(changed[:4])} "
                "differ); pass the same rungs and options, or start over with --force / force=True"
            )
        if state.signature != model_signature(model):
            raise RunDirError(
                f"cannot resume the ladder in {where}: it was started on another model (the tensor names, shapes "
                "or dtypes differ); resume with the model it started with, or use a new run directory"
            )
        return state

    def commit(self, state: LadderState) -> None:
        self.rd.write(LADDER_STATE, state.model_dump_json(indent=1).encode("utf-8"), what="the ladder's state")

    # -- the weights ----------------------------------------------------------------------------
    def save_ordered(self, model: nn.Module) -> None:
        tensors = _model_tensors(model)
        self.rd.write(LADDER_ORDERED, lambda tmp: _save(tensors, tmp), what="the ordered model")

    def load_ordered(self, model: nn.Module) -> None:
        _assign(model, self._read(LADDER_ORDERED, "model/"), self.rd.path / LADDER_ORDERED)

    def save_rung(self, state: LadderState, work: nn.Module) -> None:
        """Write the last allocated rung's model (``work``; its widths are the last of ``state.widths``),
        then commit ``state``, then delete the rung before's file."""
        k = len(state.widths)
        tensors = _model_tensors(work)
        self.rd.write(_rung(k), lambda tmp: _save(tensors, tmp), what=f"rung {k}")
        self.commit(state)
        if k > 1:
            fs.remove_file(self.rd.path / _rung(k - 1))

    def load_rung(self, work: nn.Module, k: int) -> None:
        """Load rung ``k`` as its allocation left it into ``work`` (that rung, cut from the ordered weights)."""
        _assign(work, self._read(_rung(k), "model/"), self.rd.path / _rung(k))

    def save_recovery(self, state: LadderState, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        """Write the model (at rung 0) and ``optimizer`` after ``steps`` steps, then commit ``state`` naming them."""
        name = f"ladder-recovery-{steps:09d}.safetensors"
        tensors = {**_model_tensors(model), **optimizer_tensors(optimizer)}
        self.rd.write(name, lambda tmp: _save(tensors, tmp), what="the recovery checkpoint")
        previous = state.checkpoint
        state.steps, state.checkpoint = steps, name
        self.commit(state)
        if previous and previous != name:
            fs.remove_file(self.rd.path / previous)

    def load_recovery(self, state: LadderState, model: nn.Module) -> dict[str, torch.Tensor]:
        """Load the checkpoint ``state`` names into ``model``; return its optimizer tensors."""
        tensors = self._read(fs.check_name(state.checkpoint, what=f"{LADDER_STATE} field checkpoint"), "")
        _assign(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, self.rd.path / state.checkpoint)
        return {k: v for k, v in tensors.items() if k.startswith("adam/")}

    def _read(self, name: str, prefix: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = fs.check_regular(self.rd.path / name, what=f"the ladder's {name}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise RunDirError(f"cannot resume the ladder: {path} is corrupt ({shown(str(exc), 200)})") from None
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if prefix else tensors


def _rung(k: int) -> str:
    return f"ladder-rung-{k:03d}.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], path: Any) -> None:
    """Give ``model``'s tensors the saved values as new storage (``.data = ...``, never an in-place copy,
    so a caller holding the old storage to restore the model on failure still holds the old values)."""
    own = model.state_dict(keep_vars=True)
    wrong = sorted(k for k in own if k not in tensors or tensors[k].shape != own[k].shape or tensors[k].dtype != own[k].dtype)
    if wrong or set(tensors) - set(own):
        first = (wrong or sorted(set(tensors) - set(own)))[0]
        raise RunDirError(f"cannot resume the ladder: {path} does not fit the model (first difference: {shown(first)}); "
                          "resume with the model the build started with, or start over with --force / force=True")
    for k, t in own.items():
        t.data = tensors[k].to(t.device)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors ``adam/<index>/<key>`` (no pickle needed)."""
    out = {}
    for i, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"adam/{i}/{key}"] = t.detach().contiguous().cpu()
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`optimizer_tensors` wrote into ``optimizer`` (built over the same parameters)."""
    current = optimizer.state_dict()
    count = len(current["param_groups"][0]["params"]) if current["param_groups"] else 0
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, index, key = name.split("/", 2)
        if not index.isdigit() or int(index) >= count:
            raise RunDirError(f"cannot resume the ladder: the optimizer state names parameter {shown(index)}, "
                              f"which the model does not have ({count} parameters)")
        state.setdefault(int(index), {})[key] = t
    try:
        optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RunDirError(f"cannot resume the ladder: the optimizer state does not fit ({shown(str(exc), 200)})") from None


__all__ = ["LadderRun", "LadderState", "load_optimizer", "optimizer_tensors", "settings_of"]
