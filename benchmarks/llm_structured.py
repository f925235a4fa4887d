"""Structured pruning of the small LLaMA of ``llm.py`` (same corpus, tokenizer, cached model, calibration and
test texts): held-out perplexity with no fine-tuning after, at the same parameter count for every method.

The cuts are given as a fraction of the decoder's parameters (the 4 decoder layers hold 738,304 of the
model's 1,262,720; the rest is the embedding and the output layer): removing ``f`` of them is a budget of
``(total - f * decoder) / total`` of the model's parameters, which every method meets (``ap.count``).

Methods (the output layer's output width fixed; heads, KV groups, MLP neurons and the residual width prunable):

- ``adaprune`` ``ap.prune(budget=Budget(params=...), importance=..., allocation=..., refit=...)`` for
  ``--variants`` ``importance/allocation[/refit]``: ``l2/uniform`` is the magnitude baseline (every group the
  same fraction), ``wanda/global`` ranks channels across layers by |W| * ||X|| on the calibration texts (so
  each layer's width follows its measured importance), ``/refit`` adds the least-squares refit of the layers
  that lost inputs on the calibration batches;
- ``tp``: Torch-Pruning's own LLM recipe (its ``examples/LLMs/prune_llm.py`` settings: ``MetaPruner``,
  ``GroupMagnitudeImportance(p=2)``, the same ratio for heads and widths, ``num_heads`` for q/k/v,
  ``prune_num_heads=True``, ``prune_head_dims=False``, ``round_to=4``, ``lm_head`` ignored), its ratio bisected
  to the same parameter count. It runs in a child process with ``--tp-timeout`` seconds; a run that does not
  finish is recorded with where it was (Python's ``faulthandler`` stack). ``--tp-versions`` names the
  Torch-Pruning releases to run: ``installed`` (this environment's) and release numbers, each installed on first
  use into ``--cache`` (``pip install --no-deps --target``; Torch-Pruning is pure Python) and put first on the
  child's path. 1.6.1 never finishes building its dependency graph on this LLaMA; 1.5.2, an earlier release
  before, does, so both run by default.

    python benchmarks/llm_structured.py
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bisect_ratio, environment, save
from llm import parser, prepare

import adaprune as ap


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(model: Any) -> dict[str, Any]:
    layers = model.model.layers
    return {"hidden": int(model.lm_head.in_features),
            "heads": [int(layer.self_attn.q_proj.out_features // layer.self_attn.head_dim) for layer in layers],
            "kv_heads": [int(layer.self_attn.k_proj.out_features // layer.self_attn.head_dim) for layer in layers],
            "ffn": [int(layer.mlp.gate_proj.out_features) for layer in layers]}


def tp_prune(model: Any, example: torch.Tensor, ratio: float) -> Any:
    """Torch-Pruning's LLM recipe at ``ratio`` (module doc), and the attributes its example updates after."""
    import torch_pruning as tp

    cfg = model.config
    heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        heads.update({a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads,
                      a.v_proj: cfg.num_key_value_heads})
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
        in_channel_groups={}, out_channel_groups={}, output_transform=lambda out: out.logits)
    pruner.step()
    cfg.hidden_size = model.lm_head.in_features
    for layer in model.model.layers:
        a = layer.self_attn
        a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
    return model


def tp_child(args: Any, target: int) -> dict[str, Any]:
    """In the child process: bisect Torch-Pruning's ratio to ``target`` parameters; the pruned model's record."""
    ready = prepare(args)
    base, task = ready["model"], ready["task"]
    example = ready["calib"][0][0]["input_ids"][:1]
    faulthandler.dump_traceback_later(args.tp_timeout, exit=True)  # (the data and model are ready: TP's time)
    t = time.perf_counter()

    def at(r: float) -> tuple[Any, int]:
        m = tp_prune(copy.deepcopy(base), example, r)
        return m, params(m)

    model, ratio, tries = bisect_ratio(at, target, 0.9, 8)
    seconds = time.perf_counter() - t
    return {"perplexity": task.evaluate(model)["perplexity"], "params": params(model), "ratio": ratio,
            "tries": tries, "seconds": seconds, "widths": widths(model), "version": installed_tp()}


def tp_path(version: str, cache: str) -> str | None:
    """The directory holding Torch-Pruning ``version`` (installed there on first use); None for ``installed``."""
    if version == "installed":
        return None
    where = Path(cache) / f"torch-pruning-{version}"
    if not (where / "torch_pruning").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(where),
                        f"torch-pruning=={version}"], check=True)
    return str(where)


def run_tp(args: Any, target: int, version: str) -> dict[str, Any]:
    model_options = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                     ("hidden", "ffn", "layers", "vocab", "seq", "train_steps", "calib", "corpus", "blocks", "threads",
                      "cache", "tp_timeout")]
    cmd = [sys.executable, __file__, "--tp-child", str(target), *model_options]
    env = dict(os.environ)
    try:
        extra = tp_path(version, args.cache)
    except (OSError, subprocess.CalledProcessError) as exc:  # offline, no pip: a result, like a hang
        return {"failed": f"could not install torch-pruning=={version}: {exc}", "seconds": 0.0}
    if extra is not None:
        env["PYTHONPATH"] = os.pathsep.join([extra, *filter(None, [env.get("PYTHONPATH")])])
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tp_timeout + 900, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"no answer within {args.tp_timeout + 900} s", "seconds": time.perf_counter() - t}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    stack = [ln.strip() for ln in out.stderr.splitlines()  # (the main thread's frames: not tqdm's or threading's)
             if ln.strip().startswith("File ") and ("torch_pruning" in ln or __file__ in ln)]
    return {"failed": (f"did not finish within {args.tp_timeout} s" if "Timeout" in out.stderr
                       else f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"),
            "where": stack[:6], "seconds": time.perf_counter() - t}


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.3, 0.5],
                   help="fractions of the decoder's parameters removed")
    p.add_argument("--variants", nargs="+", default=["l2/uniform", "wanda/global", "wanda/global/refit",
                                                     "l2/global/refit"])
    p.add_argument("--tp-timeout", type=int, default=300, help="seconds Torch-Pruning gets per budget")
    p.add_argument("--no-tp", action="store_true")
    p.add_argument("--tp-versions", nargs="+", default=["installed", "1.5.2"],
                   help="Torch-Pruning releases to run ('installed': this environment's)")
    p.add_argument("--out", default="llm_structured")
    p.add_argument("--tp-child", type=int, help=argparse_hidden())
    args = p.parse_args()
    if args.tp_child is not None:
        print("RESULT " + json.dumps(tp_child(args, args.tp_child)))
        return 0
    ready = prepare(args)
    base, task, calib, dense = ready["model"], ready["task"], ready["calib"], ready["dense"]
    total = params(base)
    decoder = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n)
    example = calib[0][0]
    payload: dict[str, Any] = {"environment": environment(args.threads), "config": ready["config"] | {
        "fractions": args.fractions, "variants": args.variants, "decoder_params": decoder, "tp_timeout": args.tp_timeout,
        "tp_versions": args.tp_versions, "tp_installed": installed_tp()},
        "dense": dense, "runs": []}
    for fraction in args.fractions:
        target = int(total - fraction * decoder)
        for variant in args.variants:
            importance, allocation, *rest = variant.split("/")
            model = copy.deepcopy(base)
            t = time.perf_counter()
            ap.prune(model, example, budget=ap.Budget(params=target / total), importance=importance,
                     allocation=allocation, calibration=calib, ignore=["lm_head"], refit="refit" in rest)
            seconds = time.perf_counter() - t
            rec = {"method": "adaprune", "variant": variant, "fraction": fraction, "target": target,
                   "params": params(model), "perplexity": task.evaluate(model)["perplexity"], "seconds": seconds,
                   "widths": widths(model)}
            payload["runs"].append(rec)
            print(f"{fraction:.0%} {variant:20s} params {rec['params']:,} (target {target:,}) perplexity "
                  f"{rec['perplexity']:.2f} {seconds:.1f} s {rec['widths']}", flush=True)
        for version in [] if args.no_tp else args.tp_versions:
            variant = f"Torch-Pruning {installed_tp() if version == 'installed' else version} LLM recipe"
            hung = [r for r in payload["runs"] if r["variant"] == variant and "did not finish" in r.get("failed", "")]
            outcome = ({"failed": f"not run: it did not finish at {hung[0]['fraction']:.0%} (building its dependency "
                                  "graph does not depend on the ratio)", "seconds": 0.0} if hung
                       else run_tp(args, target, version))
            rec = {"method": "tp", "variant": variant, "fraction": fraction, "target": target, **outcome}
            payload["runs"].append(rec)
            print(f"{fraction:.0%} {variant}: {rec}", flush=True)
        save(args.out, payload)
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    print(f"wrote {save(args.out, payload)}")
    return 0


def installed_tp() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "not installed"


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
