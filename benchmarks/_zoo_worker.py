"""One zoo-sweep run: prune one model with one tool at one ratio, print one JSON line.

Invoked by ``benchmarks/zoo.py`` (each run in its own process, under its time limit)::

    python benchmarks/_zoo_worker.py --tool adaprune --model resnet18 --ratio 0.5

The record (always one JSON object on the last line of stdout, even when the run fails):
tool, model, family (torchvision | hf | a family of ``benchmarks/zoo_models.py``), ratio, input,
head / heads, passed, reason, macs/params before and after, macs_ratio, params_ratio, seconds (the
tool's own call), build_seconds, total_seconds, and for adaprune frozen (count) and frozen_first
[(module, op, reason), ...].

A run PASSES when forward works after pruning, the output is unchanged in shape and the MACs fell.
For torchvision classification and Hugging Face models the main output's shape is compared (the
output tensor, ``logits``); for the families of ``zoo_models.py`` (``tv-det:``, ``yolo:``, ...) the
whole output tree is (types, lengths, dict keys, every tensor's shape; for torchvision detection
only the number of dims and the trailing dims of the per-image tensors, since the number of
detections depends on the weights); ``output_before`` / ``output_after`` summarise it on failure.
MACs and params are measured with ``adaprune.count`` for both tools. Models are pruned in eval mode
for both tools, with the same list of head layers kept whole (``ignore=`` / ``ignored_layers=``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

# In-repo adaprune and benchmarks.hf_models, whatever the caller's PYTHONPATH says.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

NEEDS_224 = ("vit_", "swin_", "maxvit_t")
NEEDS_299 = ("inception_v3",)
SMALL = 64
FROZEN_FIRST = 5
FROZEN_REASON_CHARS = 240


def reason_of(exc: BaseException) -> str:
    """Exception type and the first line of its message."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > 400:
        first = first[:400] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def main_output(out: Any) -> Any:
    """The tensor whose shape must survive pruning: the output itself, or ``logits`` (HF)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the main output tensor in a {type(out).__name__}")


def call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward_shape(model: Any, inputs: Any) -> tuple[int, ...]:
    import torch

    model.eval()
    with torch.no_grad():
        return tuple(main_output(call(model, inputs)).shape)


def torchvision_head(model: Any, num_classes: int = 1000) -> tuple[str, Any]:
    """The final classifier: the last nn.Linear with out_features == num_classes (else the last
    Conv2d with that many out-channels, e.g. SqueezeNet)."""
    from torch import nn

    named = list(model.named_modules())
    for kind, attr in ((nn.Linear, "out_features"), (nn.Conv2d, "out_channels")):
        hits = [(n, m) for n, m in named if isinstance(m, kind) and getattr(m, attr) == num_classes]
        if hits:
            return hits[-1]
    raise LookupError(f"no Linear/Conv2d with {num_classes} outputs to keep as the head")


def forward_tree(model: Any, inputs: Any) -> Any:
    import torch
    from benchmarks.zoo_models import tree

    model.eval()
    with torch.no_grad():
        return tree(call(model, inputs))


def build(name: str, rec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """(model in eval mode, example inputs, head modules); fills rec['family'/'input'/'head(s)']."""
    import torch
    from benchmarks.zoo_models import family_of

    torch.manual_seed(0)
    if family_of(name):
        from benchmarks import zoo_models

        model, inputs, heads = zoo_models.build(name, rec)
        names = {id(m): n for n, m in model.named_modules()}
        rec["heads"] = [names.get(id(h), "?") for h in heads]
        return model, inputs, heads
    if name.startswith("hf-"):
        from benchmarks.hf_models import specs

        rec["family"] = "hf"
        make, inputs_of, head_of = specs()[name]
        model = make().eval()
        inputs = inputs_of(model)
        head = head_of(model)
        rec["input"] = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        rec["head"] = next((n for n, m in model.named_modules() if m is head), "?")
        return model, inputs, [head]

    import torchvision

    rec["family"] = "torchvision"
    model = torchvision.models.get_model(name, weights=None).eval()
    if name.startswith(NEEDS_299):
        sizes = [299]
    elif name.startswith(NEEDS_224):
        sizes = [224, 256]
    else:
        sizes = [SMALL, 224]
    g = torch.Generator().manual_seed(0)
    errors = []
    for size in sizes:
        x = torch.randn(1, 3, size, size, generator=g)
        try:
            forward_shape(model, x)
        except Exception as exc:  # noqa: BLE001 - try the next size
            errors.append(f"{size}: {reason_of(exc)}")
            continue
        rec["input"] = [1, 3, size, size]
        if errors:
            rec["input_note"] = "; ".join(errors)
        head_name, head = torchvision_head(model)
        rec["head"] = head_name
        return model, x, [head]
    raise RuntimeError("the unpruned model runs at none of the sizes tried: " + " | ".join(errors))


def run_adaprune(model: Any, inputs: Any, heads: list[Any], ratio: float, rec: dict[str, Any]) -> None:
    import adaprune

    t = time.perf_counter()
    try:
        res = adaprune.prune(model, inputs, ratio=ratio, importance="l2", allocation="uniform", ignore=list(heads))
    finally:
        rec["seconds"] = time.perf_counter() - t
    rec["frozen"] = len(res.frozen)
    rec["frozen_first"] = [[f.module, f.op, str(f.reason)[:FROZEN_REASON_CHARS]] for f in res.frozen[:FROZEN_FIRST]]
    kinds: dict[str, int] = {}
    for f in res.frozen:
        k = str(f.reason).split(":")[0].split(" (")[0][:80]
        kinds[k] = kinds.get(k, 0) + 1
    rec["frozen_reasons"] = kinds
    rec["groups"] = len(res.graph.groups)
    rec["groups_cut"] = sum(1 for g in res.plan.groups if g.removed)


def run_torch_pruning(model: Any, inputs: Any, heads: list[Any], ratio: float, rec: dict[str, Any]) -> None:
    import torch_pruning as tp

    # torch_pruning 1.6.x: MetaPruner is BasePruner; a dict of example_inputs is called as model(**inputs)
    # (dependency/graph.py), a tuple/list as model(*inputs), a tensor as model(x). The dict from
    # hf_models is passed as it is.
    t = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=list(heads),
            round_to=None,
        )
        pruner.step()
    finally:
        rec["seconds"] = time.perf_counter() - t


TOOLS = {"adaprune": run_adaprune, "torch-pruning": run_torch_pruning}


def source_fingerprint() -> str:
    """A short hash of src/adaprune's .py files as this run saw them (src/ may change during a sweep)."""
    import hashlib

    h = hashlib.sha1()
    base = os.path.join(_ROOT, "src", "adaprune")
    for d, dirs, files in sorted(os.walk(base)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(d, f)
                h.update(os.path.relpath(path, base).encode())
                try:
                    with open(path, "rb") as fh:
                        h.update(fh.read())
                except OSError:
                    pass
    return h.hexdigest()[:12]


def work(tool: str, name: str, ratio: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"tool": tool, "model": name, "ratio": ratio, "passed": False, "stage": "build"}
    rec["family"] = name.split(":", 1)[0] if ":" in name else ("hf" if name.startswith("hf-") else "torchvision")
    rec["adaprune_src"] = source_fingerprint()
    t0 = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(1)
        import adaprune

        model, inputs, heads = build(name, rec)
        structured = ":" in name
        rec["build_seconds"] = time.perf_counter() - t0
        rec["stage"] = "count before"
        if structured:
            from benchmarks.zoo_models import compare, summary

            shape = forward_tree(model, inputs)
            rec["output"] = summary(shape)
        else:
            shape = forward_shape(model, inputs)
        before = adaprune.count(model, inputs)
        rec.update(macs_before=before.macs, params_before=before.params)
        if not structured:
            rec["output_shape"] = list(shape)
        rec["stage"] = "prune"
        TOOLS[tool](model, inputs, heads, ratio, rec)
        rec["stage"] = "forward after"
        after_shape = forward_tree(model, inputs) if structured else forward_shape(model, inputs)
        rec["stage"] = "count after"
        after = adaprune.count(model, inputs)
        rec.update(macs_after=after.macs, params_after=after.params)
        rec["macs_ratio"] = after.macs / before.macs if before.macs else None
        rec["params_ratio"] = after.params / before.params if before.params else None
        rec["stage"] = "checks"
        diff = (compare(shape, after_shape, loose_first_dim=rec["family"] == "tv-det") if structured
                else "" if after_shape == shape else f"{list(shape)} -> {list(after_shape)}")
        if diff:
            rec["reason"] = f"check: output shape changed {diff}"
            if structured:
                rec["output_before"], rec["output_after"] = summary(shape, 2000), summary(after_shape, 2000)
        elif not after.macs < before.macs:
            rec["reason"] = f"check: MACs did not fall ({before.macs:,} -> {after.macs:,})"
        else:
            rec["passed"] = True
            rec["reason"] = ""
            rec["stage"] = "done"
    except MemoryError as exc:
        rec["reason"] = f"out of memory (MemoryError in {rec['stage']})"
        rec["traceback"] = traceback.format_exc()[-4000:]
        del exc
    except Exception as exc:  # noqa: BLE001 - a failed run is a record, not a crash
        rec["reason"] = f"{reason_of(exc)} [in {rec['stage']}]"
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["total_seconds"] = time.perf_counter() - t0
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", required=True, choices=sorted(TOOLS))
    ap.add_argument("--model", required=True)
    ap.add_argument("--ratio", required=True, type=float)
    args = ap.parse_args(argv)
    # Libraries may print; keep stdout for the one JSON line.
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    rec = work(args.tool, args.model, args.ratio)
    real_stdout.write(json.dumps(rec, default=str) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
