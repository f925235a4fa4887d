"""Save and load a ladder without pickle: one weights file, per-rung plans and normalisation statistics.

``save_ladder(ladder, "out/")`` writes, beside what :func:`adaprune.save` writes for the full (ordered)
model (``model.safetensors``, an empty ``plan.json``, ``adaprune.json``):

- ``norms.safetensors``: every rung's own BatchNorm statistics, keyed ``"<rung>/<buffer name>"``;
- ``ladder.json``: per rung its budget, widths, plan (what it removes from the full model), costs,
  metrics and drop, the modules kept at full width (``ignore``), and the SHA-256 of
  ``norms.safetensors``. It is written last: the commit point.

``load_ladder("out/", factory, example_inputs)`` loads the full model with :func:`adaprune.load`,
traces it (with the saved ``ignore``), rebuilds the rungs from the saved widths, checks that each
rebuilt plan is the saved one, and loads the statistics. Nothing is executed or unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .. import fs
from ..cost.budget import Budget
from ..errors import ArgumentTypeError, FileFormatError
from ..graph import trace
from ..io import LoadError, load, save
from ..plan import Plan
from .build import Ladder, Rung
from .nested import NestedWidths

LADDER = "ladder.json"
NORMS = "norms.safetensors"


class RungRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    index: int = Field(ge=0)
    budget: dict[str, float] | None
    backend: str = "torch"
    threads: int = Field(default=1, ge=1)
    widths: dict[str, int]
    plan: dict[str, Any]
    costs: dict[str, float]
    metrics: dict[str, float]
    budget_met: bool
    drop: float
    within_tolerance: bool


class LadderRecord(BaseModel):
    """The schema of ``ladder.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["adaprune-ladder"]
    format_version: Literal[1]
    ignore: list[str]
    original: dict[str, float]
    finetune_steps: int = Field(ge=0)
    evaluations: int = Field(ge=0)
    norms_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    rungs: list[RungRecord]


def save_ladder(lad: Ladder, directory: str | os.PathLike[str]) -> Path:
    """Write ``lad`` to ``directory`` (the module doc); the live model is left at its rung.

    Raises:
        ArgumentTypeError: ``lad`` is not a :class:`~adaprune.Ladder`.
        StorageError: the disk is full or the directory is not writable.
    """
    from safetensors.torch import save_file

    if not isinstance(lad, Ladder):
        raise ArgumentTypeError(f"save_ladder: expected an adaprune.Ladder, got {type(lad).__name__}")
    current = lad.current
    lad.use(0)
    try:
        out = save(lad.model, directory, plan=Plan())
    finally:
        lad.use(current)
    tensors = {f"{k}/{name}": t.detach().contiguous().clone() for k, norms in enumerate(lad.nested.norms)
               for name, t in norms.items()}
    digest = None
    if tensors:
        path = fs.write_atomic(out / NORMS, lambda tmp: save_file(tensors, tmp), what="the rungs' statistics")
        digest = fs.sha256(path)
    record = LadderRecord(
        format="adaprune-ladder", format_version=1, ignore=list(lad.ignore), original=dict(lad.original),
        finetune_steps=lad.finetune_steps, evaluations=lad.evaluations, norms_sha256=digest,
        rungs=[RungRecord(index=r.index, budget={k: float(v) for k, v in r.budget.bounds.items()} if r.budget else None,
                          backend=r.budget.backend if r.budget else "torch",
                          threads=r.budget.threads if r.budget else 1, widths=dict(r.widths),
                          plan=lad.plan(r.index).to_dict(), costs={k: float(v) for k, v in r.costs.items()},
                          metrics={k: float(v) for k, v in r.metrics.items()}, budget_met=r.budget_met,
                          drop=float(r.drop), within_tolerance=r.within_tolerance) for r in lad.rungs],
    )
    fs.write_json(out / LADDER, record.model_dump(), what="the ladder")  # the commit point
    return out


def load_ladder(directory: str | os.PathLike[str], model_factory: Callable[[], nn.Module],
                example_inputs: Any) -> Ladder:
    """Rebuild a saved ladder: ``model_factory()`` gives the unpruned architecture, ``example_inputs``
    what it runs on (to trace it). The live model starts at rung 0.

    Raises:
        LoadError: a file is missing, corrupted or does not fit (a rebuilt plan differs from the saved one).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(directory)
    try:
        record = fs.read_model(LadderRecord, root / LADDER, what=LADDER)
    except LoadError:
        raise
    except FileFormatError as exc:
        raise LoadError(str(exc)) from None
    model = load(root, model_factory)
    graph = trace(model, example_inputs, ignore=record.ignore)
    nested = NestedWidths(model, graph, [r.widths for r in record.rungs[1:]])
    for r in record.rungs:
        if nested.plan(r.index).to_dict() != Plan.from_dict(r.plan).to_dict():
            raise LoadError(f"{root / LADDER}: rung {r.index}'s plan does not match the model the factory built "
                            "and the saved widths (a different architecture or ignore list?)")
    if record.norms_sha256 is not None:
        path = root / NORMS
        if not path.is_file() or fs.sha256(path, what=NORMS) != record.norms_sha256:
            raise LoadError(f"{path} is missing or does not match the hash recorded when it was saved")
        try:
            stats = load_file(str(path))
        except SafetensorError as exc:
            raise LoadError(f"{path}: {exc}") from None
        for k in range(len(nested)):
            prefix = f"{k}/"
            nested.set_norms(k, {n[len(prefix):]: t for n, t in stats.items() if n.startswith(prefix)})
    rungs = [Rung(r.index, Budget(**r.budget, backend=r.backend, threads=r.threads) if r.budget else None,
                  dict(r.widths), dict(r.costs), dict(r.metrics), r.budget_met, r.drop, r.within_tolerance)
             for r in record.rungs]
    nested.use(0)
    return Ladder(nested, rungs, dict(record.original), record.finetune_steps, record.evaluations,
                  ignore=list(record.ignore))


__all__ = ["LadderRecord", "load_ladder", "save_ladder"]
