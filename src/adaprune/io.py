"""Save and load pruned models without pickle: safetensors weights + the plan (JSON) + metadata.

``save(result, "out/")`` writes three files:

- ``model.safetensors``: the pruned model's state dict (tied tensors stored once);
- ``plan.json``: the plan from the original architecture, replayable on a fresh copy;
- ``adaprune.json``: versions, the model's class, a reference to the base model, the SHA-256 of
  the weights file and, for transformers, the per-layer sizes (heads, KV heads, FFN width).

``load("out/", model_factory)`` builds a fresh model with ``model_factory()``, replays the plan
(so every module gets its pruned shape and attributes), checks the weights file's hash and loads
the weights strictly. A corrupted, truncated or mismatched directory raises a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PlanError, PlanMismatchError
from .plan import Plan

FORMAT_VERSION = 1
WEIGHTS, PLAN, META = "model.safetensors", "plan.json", "adaprune.json"


class LoadError(PlanError):
    """A saved directory is missing a file, is corrupted, or does not fit the model factory."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of adaprune, torch, Python and the optional libraries that are installed."""
    from . import __version__

    out = {"adaprune": __version__, "torch": torch.__version__, "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torchvision", "transformers", "safetensors", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per attention/MLP module: the sizes a config would need to rebuild it (heads, KV heads, widths)."""
    out: dict[str, dict[str, int]] = {}
    for name, mod in model.named_modules():
        head_dim = getattr(mod, "head_dim", None)
        q = getattr(mod, "q_proj", None) or getattr(mod, "query", None)
        k = getattr(mod, "k_proj", None) or getattr(mod, "key", None)
        if isinstance(head_dim, int) and isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            out[name] = {
                "num_attention_heads": q.out_features // head_dim,
                "num_key_value_heads": k.out_features // head_dim,
                "head_dim": head_dim,
            }
        if isinstance(mod, nn.MultiheadAttention):
            out[name] = {"num_heads": mod.num_heads, "embed_dim": mod.embed_dim}
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
) -> Path:
    """Write weights, plan and metadata of a pruned model (or a prune/adapt result) to ``directory``.

    Args:
        result_or_model: a :class:`~adaprune.api.PruneResult` / :class:`~adaprune.adapt.AdaptResult`,
            or a model together with ``plan=``.
        directory: created if needed; existing adaprune files in it are replaced.
        plan: the plan, when a bare model is given (default: an empty plan, i.e. unpruned).
        base: a reference to the base model (a hub name, a torchvision name, a factory path).
    """
    from safetensors.torch import save_model

    model = getattr(result_or_model, "model", result_or_model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a model or a prune/adapt result, got {type(result_or_model).__name__}")
    plan = getattr(result_or_model, "plan", None) or plan or Plan()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    save_model(model, str(weights))
    (out / PLAN).write_text(plan.to_json(indent=1))
    config = getattr(model, "config", None)
    meta = {
        "format": "adaprune",
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "base_model": base or getattr(config, "_name_or_path", None) or None,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_sha256": _sha256(weights),
        "layers": layer_sizes(model),
    }
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META)
    return out


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} is missing: {directory} was not written by adaprune.save") from None
    except json.JSONDecodeError as exc:
        raise LoadError(f"{path} is not valid JSON ({exc}); the directory is corrupted") from None
    if meta.get("format") != "adaprune" or meta.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{path} is not an adaprune format-{FORMAT_VERSION} file")
    return dict(meta)


def load(directory: str | os.PathLike[str], model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a saved pruned model: ``model_factory()`` gives the unpruned architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    root = Path(directory)
    meta = read_meta(root)
    try:
        plan = Plan.from_json((root / PLAN).read_text())
    except FileNotFoundError:
        raise LoadError(f"{root / PLAN} is missing") from None
    weights = root / WEIGHTS
    if not weights.exists():
        raise LoadError(f"{weights} is missing")
    if _sha256(weights) != meta.get("weights_sha256"):
        raise LoadError(
            f"{weights} does not match the hash recorded when it was saved: the file is truncated or corrupted"
        )
    model = model_factory()
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if kind != meta.get("model_class"):
        raise PlanMismatchError(
            f"model_factory() built a {kind}, but {directory} holds a {meta.get('model_class')}"
        )
    from .api import apply_plan

    apply_plan(model, plan)
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise PlanMismatchError(f"the weights in {weights} do not fit the replayed model: {exc}") from exc
    return model


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], opset: int = 17) -> Path:
    """Export ``model`` to ONNX (TorchScript-based exporter, constant folding on)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = example_inputs if isinstance(example_inputs, dict) else None
    if kwargs is not None:
        args = ()
    flags = {m: m.training for m in model.modules()}
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants
            # the TorchScript exporter is deprecated upstream but needs no extra dependency (the
            # torch.export-based one needs onnxscript); it exports every model the tests cover
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=False, opset_version=opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, f in flags.items():
            m.training = f
    return Path(path)
