"""Save and load pruned models without pickle: safetensors weights + the plan (JSON) + metadata.

``save(result, "out/")`` writes three files:

- ``model.safetensors``: the pruned model's state dict (tied tensors stored once);
- ``plan.json``: the plan from the original architecture, replayable on a fresh copy;
- ``adaprune.json``: versions, the model's class, a reference to the base model, the names and
  SHA-256 of the weights and plan files and, for transformers, the per-layer sizes (heads, KV heads,
  FFN width).

``save(result, "out/", compress=True)`` writes ``model.safetensors.zst`` instead of the weights: the
compressed artifact of :mod:`adaprune.artifact` (shared weights as bit-packed indices and codebooks,
int8 weights as int8 and scales, zstandard-coded, the plan inside); ``load`` restores those weights
as the same parametrizations.

``load("out/", model_factory)`` builds a fresh model with ``model_factory()``, replays the plan
(so every module gets its pruned shape and attributes), checks the files' hashes and loads the
weights strictly. A corrupted, truncated or mismatched directory raises a clear error; nothing read
is executed (the factory is the caller's).

Replacing a save is atomic as a whole: ``adaprune.json`` is the commit point. The new weights and
plan are first written beside the old ones (``model.next.safetensors``, ``plan.next.json``), then
``adaprune.json`` is replaced by one naming them, then they are renamed to their usual names and
``adaprune.json`` is rewritten once more. A load looks for each file under the name the metadata
gives, then under its usual name, and takes it only if its hash matches, so a disk that fills up
or a kill at any point leaves either the previous save or the new one loadable.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from . import fs
from ._check import check_path
from .artifact import save_plain
from .errors import (
    ArgumentTypeError,
    ConfigError,
    FileFormatError,
    PlanError,
    PlanMismatchError,
    StorageError,
    shown,
)
from .plan import Plan

FORMAT_VERSION: Final = 1
WEIGHTS: Final = "model.safetensors"
PLAN: Final = "plan.json"
META: Final = "adaprune.json"
NEXT_WEIGHTS: Final = "model.next.safetensors"
NEXT_PLAN: Final = "plan.next.json"
ZWEIGHTS: Final = "model.safetensors.zst"
NEXT_ZWEIGHTS: Final = "model.next.safetensors.zst"
#: the largest compressed weights file load reads
MAX_BLOB: Final = 1 << 36


class LoadError(FileFormatError, PlanError):
    """A saved directory is missing a file, is corrupted, or does not fit the model factory."""


_SHA = Field(pattern=r"^[0-9a-f]{64}$")


class Compressed(BaseModel):
    """How a compressed save's weights file was written (``save(..., compress=True)``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    codec: Literal["zstd"]
    level: int = Field(ge=1, le=22)
    raw_bytes: int = Field(ge=0)
    disk_bytes: int = Field(ge=0)
    shared: list[str] = Field(default_factory=list)
    int8: list[str] = Field(default_factory=list)


class SaveMeta(BaseModel):
    """The schema of ``adaprune.json``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    format: Literal["adaprune"]
    format_version: Literal[1]
    versions: dict[str, str] = Field(default_factory=dict)
    model_class: str
    base_model: str | None = None
    params: int = Field(ge=0)
    weights_sha256: str = _SHA
    weights_file: Literal[
        "model.safetensors", "model.next.safetensors", "model.safetensors.zst", "model.next.safetensors.zst"
    ] = WEIGHTS
    plan_file: Literal["plan.json", "plan.next.json"] = PLAN
    plan_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    layers: dict[str, dict[str, int]] = Field(default_factory=dict)
    compressed: Compressed | None = None


def versions() -> dict[str, str]:
    """Versions of adaprune, torch, Python and the optional libraries that are installed."""
    from ._version import __version__

    out = {"adaprune": __version__, "torch": torch.__version__, "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torchvision", "transformers", "safetensors", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


_SIZE_WORDS = re.compile(r"features|channels|size|width|dim|heads|groups|hidden|embed|shape|num_|^n[a-z]?$")


def _sizes_of(mod: nn.Module) -> dict[str, int]:
    """A module's size attributes: public ints (not bools) whose names say size (``out_features``,
    ``num_attention_heads``, ``all_head_size``, ``groups`` ...)."""
    return {
        k: v for k, v in vars(mod).items()
        if not k.startswith("_") and type(v) is int and _SIZE_WORDS.search(k)
    }


def layer_sizes(model: nn.Module, plan: Plan | None = None) -> dict[str, dict[str, int]]:
    """The sizes a config would need to rebuild the pruned model, per module.

    From the plan: every module that owns a tensor the plan cuts, and every module above it (fixers
    update containers too), with its size attributes (:func:`_sizes_of`), for any architecture. On top,
    per attention/MLP module, what configs call them: heads and KV heads from the projections
    (``q_proj``/``query`` over ``head_dim``), ``nn.MultiheadAttention``'s heads, the MLP's
    ``intermediate_size``."""
    modules = dict(model.named_modules())
    out: dict[str, dict[str, int]] = {}
    touched = {name.rpartition(".")[0] for name in (plan.removals if plan is not None else {})}
    for owner in sorted(touched):
        parts = owner.split(".") if owner else []
        for depth in range(len(parts), 0, -1):  # the owner and the modules above it (not the model itself)
            name = ".".join(parts[:depth])
            sizes = _sizes_of(modules[name]) if name in modules else {}
            if sizes:
                out.setdefault(name, {}).update(sizes)
    for name, mod in modules.items():
        head_dim = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None)
        q = getattr(mod, "q_proj", None) or getattr(mod, "query", None)
        k = getattr(mod, "k_proj", None) or getattr(mod, "key", None)
        if isinstance(head_dim, int) and isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            out.setdefault(name, {}).update({
                "num_attention_heads": q.out_features // head_dim,
                "num_key_value_heads": k.out_features // head_dim,
                "head_dim": head_dim,
            })
        if isinstance(mod, nn.MultiheadAttention):
            out.setdefault(name, {}).update({"num_heads": mod.num_heads, "embed_dim": mod.embed_dim})
        up = getattr(mod, "up_proj", None) or getattr(mod, "fc1", None)
        if isinstance(up, nn.Linear) and (hasattr(mod, "down_proj") or hasattr(mod, "fc2")):
            out.setdefault(name, {})["intermediate_size"] = up.out_features
    return out


def save(
    result_or_model: Any,
    directory: str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    base: str | None = None,
    compress: bool = False,
    level: int | None = None,
) -> Path:
    """Write weights, plan and metadata of a pruned model (or a prune/adapt result) to ``directory``.

    Args:
        result_or_model: a :class:`~adaprune.api.PruneResult` / :class:`~adaprune.adapt.AdaptResult` /
            :class:`~adaprune.CompressResult`, or a model together with ``plan=``.
        directory: created if needed; a previous save in it is replaced atomically (other files in
            it are left alone).
        plan: the plan, when a bare model is given (default: an empty plan, i.e. unpruned).
        base: a reference to the base model (a hub name, a torchvision name, a factory path).
        compress: write the compressed artifact (:mod:`adaprune.artifact`): shared weights as
            bit-packed indices and codebooks, int8 weights as int8 and scales, all of it
            zstandard-coded into ``model.safetensors.zst``; :func:`load` restores the shared and int8
            weights as the same parametrizations. Without it, a shared or int8 model is saved as
            plain float weights (the values it computes with).
        level: zstandard's level for ``compress`` (1-22, default :data:`adaprune.artifact.LEVEL`).

    Raises:
        ArgumentTypeError: not a model or a result; ``plan`` not a Plan.
        StorageError: the disk is full or the directory is not writable; the previous save in
            ``directory`` is still loadable.
    """
    model: Any
    if isinstance(result_or_model, nn.Module):  # a model (an HF model has a .model attribute of its own)
        model, result_plan = result_or_model, None
    else:
        model, result_plan = getattr(result_or_model, "model", None), getattr(result_or_model, "plan", None)
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"save: expected a model (nn.Module) or a prune/adapt result, got {type(result_or_model).__name__}"
        )
    if result_plan is not None and plan is not None:
        raise ConfigError("save: a prune/adapt result carries its plan; pass plan= only with a bare model")
    plan = result_plan if result_plan is not None else plan if plan is not None else Plan()
    if not isinstance(plan, Plan):
        raise ArgumentTypeError(f"save: plan= must be an adaprune.Plan, got {type(plan).__name__}")
    check_path(directory, "directory")
    if directory is None:
        raise ArgumentTypeError("save: directory is None; pass the directory to save into")
    if base is not None and not isinstance(base, str):
        raise ArgumentTypeError(f"save: base= must be a str (a reference to the base model), got {shown(base)}")
    from ._check import as_bool, as_int

    compress = as_bool(compress, "compress", where="save")
    if level is not None and not compress:
        raise ConfigError("save: level= sets the compression of compress=True; pass compress=True too")
    from .artifact import LEVEL

    level = LEVEL if level is None else as_int(level, "level", low=1, high=22, where="save")
    out = Path(directory)
    if fs.kind(out, what="save: directory", error=StorageError) not in ("dir", None):
        raise StorageError(f"save: {shown(str(out), 200)} is not a directory; pass a directory to save into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"save: cannot create the directory {out} ({exc.strerror})") from None
    _check_ours(out)
    _settle(out)
    compressed = None
    if compress:
        from .artifact import encode, to_blob

        encoded = encode(model)
        data, raw_bytes = to_blob(encoded, plan.to_json(), level)
        weights = fs.write_atomic(out / NEXT_ZWEIGHTS, data, what="the compressed weights")
        compressed = Compressed(
            codec="zstd", level=level, raw_bytes=raw_bytes, disk_bytes=len(data),
            shared=sorted(k for k, v in encoded.specs.items() if v["kind"] == "shared"),
            int8=sorted(k for k, v in encoded.specs.items() if v["kind"] == "int8"),
        )
    else:
        weights = fs.write_atomic(out / NEXT_WEIGHTS, lambda tmp: save_plain(model, tmp), what="the weights")
    plan_file = fs.write_text(out / NEXT_PLAN, plan.to_json(indent=1), what="the plan")
    cls = parametrize.type_before_parametrizations(model)  # not torch's Parametrized<class> of a parametrized root
    config = getattr(model, "config", None)
    name_or_path = getattr(config, "_name_or_path", None)
    meta = SaveMeta(
        format="adaprune",
        format_version=FORMAT_VERSION,
        versions=versions(),
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        base_model=base or (name_or_path if isinstance(name_or_path, str) and name_or_path else None),
        params=sum(p.numel() for p in model.parameters()),
        weights_sha256=fs.sha256(weights),
        weights_file=NEXT_ZWEIGHTS if compress else NEXT_WEIGHTS,
        plan_file=NEXT_PLAN,
        plan_sha256=fs.sha256(plan_file),
        layers=layer_sizes(model, plan),
        compressed=compressed,
    )
    fs.write_json(out / META, meta.model_dump(), what="the save's metadata")  # the commit point
    _settle(out)
    return out


def _check_ours(out: Path) -> None:
    """Refuse to replace files of the save's names that another program wrote: they are adaprune's only
    beside an ``adaprune.json`` that adaprune wrote."""
    present = [n for n in (META, WEIGHTS, PLAN, NEXT_WEIGHTS, NEXT_PLAN, ZWEIGHTS, NEXT_ZWEIGHTS) if (out / n).exists() or (out / n).is_symlink()]
    if not present:
        return
    try:
        raw = fs.read_json(out / META, what=META)
        ours = isinstance(raw, dict) and raw.get("format") == "adaprune"
    except FileFormatError:
        ours = False
    if not ours:
        raise ConfigError(
            f"save: {shown(str(out), 120)} holds {', '.join(present)} that adaprune.save did not write (no "
            f"adaprune {META} beside them); adaprune does not overwrite them: choose another directory or "
            "move them away"
        )


def _settle(out: Path) -> None:
    """Give the files of a committed save their usual names (finishing a save that was interrupted
    after its commit point), so the next save can write its new files beside them."""
    if not (out / META).is_file():
        return
    try:
        meta = read_meta(out)
    except LoadError:
        return  # nothing loadable to protect; the next commit replaces it
    update: dict[str, str] = {}
    weights_usual = ZWEIGHTS if meta.compressed is not None else WEIGHTS
    for key, usual in (("weights_file", weights_usual), ("plan_file", PLAN)):
        name = getattr(meta, key)
        if name != usual and (out / name).is_file():
            fs.rename(out / name, out / usual, what=f"the save's {usual}")
        if name != usual:
            update[key] = usual
    if update:
        fs.write_json(out / META, meta.model_copy(update=update).model_dump(), what="the save's metadata")
    stale = WEIGHTS if meta.compressed is not None else ZWEIGHTS  # the other format's file, from an older save
    if (out / stale).is_file():
        fs.remove_file(out / stale)


def read_meta(directory: str | os.PathLike[str]) -> SaveMeta:
    """The validated ``adaprune.json`` of a save directory."""
    path = Path(directory) / META
    if not path.exists() and not path.is_symlink():
        raise LoadError(f"{path} is missing: {directory} was not written by adaprune.save")
    try:
        return fs.read_model(SaveMeta, path, what="adaprune.json")
    except LoadError:
        raise
    except FileFormatError as exc:
        raise LoadError(str(exc)) from None


def _find(root: Path, named: str, usual: str, digest: str | None, what: str) -> Path:
    """The file of a save: under the name the metadata gives, else its usual name; it must match ``digest``."""
    candidates = [root / named] + ([root / usual] if usual != named else [])
    present = [p for p in candidates if p.exists() or p.is_symlink()]
    if not present:
        raise LoadError(f"{root / usual} is missing ({what})")
    for path in present:
        try:
            if digest is None or fs.sha256(path, what=what) == digest:
                return path
        except FileFormatError as exc:
            raise LoadError(str(exc)) from None
    raise LoadError(
        f"{present[0]} does not match the hash recorded when it was saved: the file is truncated or corrupted"
    )


def read_plan(directory: str | os.PathLike[str]) -> Plan:
    """The plan of a save directory (checked against the hash recorded when it was saved)."""
    root = Path(directory)
    meta = read_meta(root)
    plan_path = _find(root, meta.plan_file, PLAN, meta.plan_sha256, "the plan")
    try:
        return Plan.from_json(fs.read_text(plan_path, what="plan.json"))
    except FileFormatError as exc:
        raise LoadError(str(exc)) from None


def load(directory: str | os.PathLike[str], model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a saved pruned model: ``model_factory()`` gives the unpruned architecture.

    Nothing in the directory is executed or unpickled: the architecture comes from the caller's
    factory, the weights from safetensors, the plan from JSON.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if isinstance(model_factory, nn.Module):
        raise ArgumentTypeError(
            f"load: model_factory is a {type(model_factory).__name__} (a model); pass a function that builds the "
            f"unpruned model, e.g. lambda: {type(model_factory).__name__}(...)"
        )
    if not callable(model_factory):
        raise ArgumentTypeError(
            f"load: model_factory must be a callable returning the unpruned model, got {type(model_factory).__name__}"
        )
    check_path(directory, "directory")
    if directory is None:
        raise ArgumentTypeError("load: directory is None; pass the directory adaprune.save wrote")
    root = Path(directory)
    if fs.kind(root, what="load: directory", error=LoadError) != "dir":
        raise LoadError(f"{shown(str(root), 200)} is not a directory written by adaprune.save")
    meta = read_meta(root)
    plan = read_plan(root)
    usual = ZWEIGHTS if meta.compressed is not None else WEIGHTS
    weights = _find(root, meta.weights_file, usual, meta.weights_sha256, "the weights")
    state, parts = _read_compressed(weights, meta.compressed, plan) if meta.compressed is not None else (None, {})
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"load: model_factory() returned a {type(model).__name__}, not an nn.Module")
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if kind != meta.model_class:
        raise PlanMismatchError(f"model_factory() built a {kind}, but {directory} holds a {shown(meta.model_class)}")
    from .surgery.remove import removal

    try:
        with removal(model, plan):  # a failure restores the factory's model as it was built
            if state is None:
                load_model(model, str(weights), strict=True)
            else:
                _load_state(model, state, weights)
                if parts:
                    from .share.result import Sharing

                    Sharing(model, {name.rpartition(".")[0]: part for name, part in parts.items()})
    except (SafetensorError, RuntimeError, ValueError) as exc:  # (ValueError: a parametrization of another dtype)
        raise PlanMismatchError(f"the weights in {weights} do not fit the replayed model: {shown(str(exc), 300)}") from exc
    return model


def _read_compressed(path: Path, info: Compressed, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The decoded state dict and parametrizations of a compressed weights file."""
    from .artifact import CodecError, decode, from_blob

    try:
        data = fs.read_bytes(path, what="the compressed weights", limit=MAX_BLOB)
        if len(data) != info.disk_bytes:
            raise CodecError(f"{path} is {len(data):,} bytes, {info.disk_bytes:,} were saved: it is truncated")
        encoded, plan_json = from_blob(data, info.raw_bytes)
        if Plan.from_json(plan_json) != plan:
            raise CodecError(f"{path} holds another plan than plan.json beside it")
        return decode(encoded)
    except FileFormatError as exc:
        raise LoadError(f"{path}: {exc}") from None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Load a decoded state dict strictly: every key the model has, no other, each of its shape."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise PlanMismatchError(
            f"the weights in {weights} do not fit the replayed model: "
            + (f"missing {', '.join(missing[:5])}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {', '.join(extra[:5])}" if extra else "")
        )
    model.load_state_dict(state, strict=True)
