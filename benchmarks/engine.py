"""Engine cost: time and peak memory of trace + plan + apply (50% channel prune), adaprune vs Torch-Pruning.

Two figures per tool, each timed in its own fresh subprocess (``--worker``):

- **core**: the pruning engine alone. adaprune (tool ``adaprune``): ``ap.trace`` (with the head
  ignored), L2 importance, uniform allocation at 0.5 (``adaprune.allocate.choose``), ``ap.remove``.
  Torch-Pruning 1.6 (tool ``torch_pruning``): ``MetaPruner(model, x, GroupMagnitudeImportance(p=2),
  pruning_ratio=0.5, ignored_layers=[head])`` construction (its dependency graph) + ``step()``.
- **whole**: the call as a user times it. adaprune (tool ``adaprune_prune``): the one call
  ``ap.prune(model, x, ratio=0.5, ignore=[head])``, which also counts the cost before and after and
  runs the surgery check (a forward pass of the cut model). Torch-Pruning (tool
  ``torch_pruning_whole``): what a user writes to get the same: ``tp.utils.count_ops_and_params``
  before, the core's ``MetaPruner`` + ``step()``, ``count_ops_and_params`` after (stages recorded);
  when the count after fails (a pruned model that no longer runs), the row says so in ``after_error``
  and its seconds stop there (a lower bound of the whole call).

No model-specific options are passed to Torch-Pruning (no ``num_heads``), as the zoo benchmark calls it.
Peak memory is ``ru_maxrss`` of the process (after the build, and at the end: the difference is what
pruning added). Before the timed run, each process prunes a 2-block residual stack with the same tool
(not timed: first-call costs such as lazy imports are reported separately as ``warmup_s``). Every
row records ``figure`` (``core`` or ``whole``) and ``engine`` (``adaprune`` or ``torch_pruning``).

    python benchmarks/engine.py --models resnet50 vit_b_16 bert_base llama_1b res10 res100 res1000 mlp100
    python benchmarks/engine.py --models res10 --tools adaprune_prune torch_pruning_whole --repeats 1 --out scratch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, load, log, save

TOOLS = ("adaprune", "adaprune_prune", "torch_pruning", "torch_pruning_whole")
# each tool's engine and figure: "core" (the engine alone) or "whole" (the call a user times, counting included)
FIGURE = {"adaprune": ("adaprune", "core"), "adaprune_prune": ("adaprune", "whole"),
          "torch_pruning": ("torch_pruning", "core"), "torch_pruning_whole": ("torch_pruning", "whole")}


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.f(x))


class ResStack(nn.Module):
    """stem conv -> ``depth`` residual blocks (conv-BN-ReLU-conv-BN + identity) -> GAP -> linear."""

    def __init__(self, depth: int, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(depth)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class MLPBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class MLPStack(nn.Module):
    """input linear -> ``depth`` residual MLP blocks (x + fc2(relu(fc1(x)))) -> linear head."""

    def __init__(self, depth: int, d: int = 128, h: int = 512) -> None:
        super().__init__()
        self.inp = nn.Linear(32, d)
        self.blocks = nn.Sequential(*[MLPBlock(d, h) for _ in range(depth)])
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


def build(name: str) -> tuple[nn.Module, Any, nn.Module, str]:
    torch.manual_seed(0)
    if name.startswith("mlp") and name[3:].isdigit():
        m = MLPStack(int(name[3:])).eval()
        return m, torch.randn(8, 32), m.head, (f"residual MLP stack, {name[3:]} blocks of 128 -> 512 -> 128 "
                                                "(Linear-ReLU-Linear + identity), 8x32 input")
    if name.startswith("res") and name[3:].isdigit():
        m = ResStack(int(name[3:])).eval()
        return m, torch.randn(1, 3, 8, 8), m.fc, f"residual stack, {name[3:]} blocks of 16 channels, 8x8 input"
    if name in ("resnet50", "vit_b_16"):
        import torchvision

        m = getattr(torchvision.models, name)(weights=None).eval()
        head = m.fc if name == "resnet50" else m.heads.head
        return m, torch.randn(1, 3, 224, 224), head, f"torchvision {name}, random init, 1x3x224x224"
    import transformers as T

    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "bert_base":
        m = T.BertForSequenceClassification(T.BertConfig(num_labels=2)).eval()
        return m, inputs, m.classifier, "HF BertForSequenceClassification(BertConfig()) random init, 1x64 tokens"
    if name in ("llama_1b", "llama_1b_bf16"):
        cfg = T.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        torch.set_default_dtype(dtype)  # initialise directly in the target dtype (no fp32 copy first)
        try:
            m = T.LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        inputs = {**inputs, "use_cache": False}  # logits only: no KV-cache object in the output
        return m, inputs, m.lm_head, (f"HF LlamaForCausalLM, TinyLlama-1.1B config (22 layers, d=2048, GQA 32/4), "
                                      f"{str(dtype)[6:]} random init, 1x64 tokens, use_cache=False")
    raise ValueError(name)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(tool: str, name: str, ratio: float, warm: bool = True) -> dict[str, Any]:
    warm_s = None
    if warm:  # the first call in a process pays one-time costs (imports, dispatcher set-up): excluded
        t = time.perf_counter()
        worker(tool, "res2", ratio, warm=False)
        warm_s = time.perf_counter() - t
    t = time.perf_counter()
    model, x, head, desc = build(name)
    rec: dict[str, Any] = {"model": name, "tool": tool, "engine": FIGURE[tool][0], "figure": FIGURE[tool][1],
                           "desc": desc, "build_s": time.perf_counter() - t,
                           "params": sum(p.numel() for p in model.parameters()), "rss_after_build_mib": maxrss_mib(),
                           "warmup_s": warm_s}
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad() if tool == "adaprune" else contextlib.nullcontext():
        if tool == "adaprune":
            import adaprune as ap
            from adaprune.allocate import Limits
            from adaprune.importance import Context, get_importance

            try:
                from adaprune.allocate import choose
            except ImportError:  # before choose moved to adaprune.allocate
                from adaprune.api import choose  # type: ignore[attr-defined,no-redef]

            t = time.perf_counter()
            graph = ap.trace(model, x, ignore=[head])
            stages["trace"] = time.perf_counter() - t
            t = time.perf_counter()
            scores = get_importance("l2")(model, graph.groups, Context())
            stages["importance"] = time.perf_counter() - t
            t = time.perf_counter()
            plan = choose(graph, scores, "uniform", Limits(), ratio)
            stages["plan"] = time.perf_counter() - t
            t = time.perf_counter()
            ap.remove(model, plan)
            stages["apply"] = time.perf_counter() - t
            rec["groups"] = len(graph.groups)
        elif tool == "adaprune_prune":
            import adaprune as ap

            res = ap.prune(model, x, ratio=ratio, importance="l2", allocation="uniform", ignore=[head])
            rec["groups"] = len(res.graph.groups)
            rec["frozen"] = len(res.frozen)
            rec["macs_before"], rec["macs_after"] = res.before.macs, res.after.macs
        else:
            import torch_pruning as tp

            whole = tool == "torch_pruning_whole"
            if whole:  # as a user counts: Torch-Pruning's own op counter, before and after
                t = time.perf_counter()
                rec["macs_before"] = int(tp.utils.count_ops_and_params(model, x)[0])
                stages["count_before"] = time.perf_counter() - t
            t = time.perf_counter()
            pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=[head])
            stages["build_graph"] = time.perf_counter() - t
            t = time.perf_counter()
            pruner.step()
            stages["step"] = time.perf_counter() - t
            if whole:
                t = time.perf_counter()
                try:
                    rec["macs_after"] = int(tp.utils.count_ops_and_params(model, x)[0])
                except Exception as exc:  # noqa: BLE001  (the pruned model does not run: the call stops here)
                    rec["after_error"] = f"{type(exc).__name__}: {exc}"[:200]
                stages["count_after"] = time.perf_counter() - t
    rec["seconds"] = time.perf_counter() - t0
    rec["stages"] = stages
    rec["rss_peak_mib"] = maxrss_mib()
    rec["rss_added_mib"] = rec["rss_peak_mib"] - rec["rss_after_build_mib"]
    params_after = sum(p.numel() for p in model.parameters())
    rec["params_after"] = params_after
    try:
        with torch.no_grad():
            model(**x) if isinstance(x, dict) else model(x)
        rec["forward_after"] = "ok"
    except Exception as exc:  # noqa: BLE001
        rec["forward_after"] = f"{type(exc).__name__}: {exc}"[:200]
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+",
                   default=["resnet50", "vit_b_16", "bert_base", "res10", "res100", "mlp100", "res1000",
                            "llama_1b_bf16", "llama_1b"])
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement (subprocess)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per cell; the fastest is reported")
    p.add_argument("--repeat-below", type=float, default=60.0,
                   help="repeat a cell only while one process takes less than this many seconds")
    p.add_argument("--mem-limit-gib", type=float, default=14.0,
                   help="RLIMIT_AS of each measuring process (virtual memory, GiB; 0 = none): the machine is shared")
    p.add_argument("--extend", action="store_true", help="keep earlier cells not measured in this run")
    p.add_argument("--out", default="engine")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        if args.mem_limit_gib > 0:  # address-space cap: a model that does not fit fails here, not the machine
            lim = int(args.mem_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        try:
            rec = worker(args.worker[0], args.worker[1], args.ratio)
        except Exception as exc:  # noqa: BLE001
            rec = {"model": args.worker[1], "tool": args.worker[0], "error": f"{type(exc).__name__}: {exc}"[:300],
                   "rss_peak_mib": maxrss_mib()}
        rec["mem_limit_gib"] = args.mem_limit_gib
        print("RESULT " + json.dumps(rec))
        return 0
    payload: dict[str, Any] = {"environment": environment(args.threads), "config": vars(args), "rows": []}
    if args.extend:  # keep the other cells of an earlier run; the cells measured now replace theirs
        old = load(args.out) or {}
        payload["rows"] = old.get("rows", [])
        payload["invocations"] = old.get("invocations", [])
    payload.setdefault("invocations", []).append(
        {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for name in args.models:
        for tool in args.tools:
            cmd = [sys.executable, __file__, "--worker", tool, name, "--ratio", str(args.ratio),
                   "--threads", str(args.threads), "--mem-limit-gib", str(args.mem_limit_gib)]
            recs: list[dict[str, Any]] = []
            for i in range(args.repeats):
                t = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    rec = json.loads(lines[-1][7:]) if lines else {
                        "model": name, "tool": tool, "error": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
                except subprocess.TimeoutExpired:
                    rec = {"model": name, "tool": tool, "error": f"timeout after {args.timeout:.0f} s (process wall)",
                           "timeout": True}
                rec["process_wall_s"] = time.perf_counter() - t
                recs.append(rec)
                log(f"{name:10s} {tool:19s} #{i} " + (
                    f"{rec['seconds']:.3f}s peak {rec['rss_peak_mib']:.0f} MiB (+{rec['rss_added_mib']:.0f}) "
                    f"{ {k: round(v, 3) for k, v in rec.get('stages', {}).items()} } fwd {rec.get('forward_after')}"
                    if "seconds" in rec else rec["error"]))
                if "seconds" not in rec or rec["process_wall_s"] > args.repeat_below:
                    break
            ok = [r for r in recs if "seconds" in r]
            best = dict(min(ok, key=lambda r: r["seconds"])) if ok else dict(recs[-1])
            if ok:  # the fastest of the repeats (least disturbed by other processes), all times kept
                best["seconds_all"] = [r["seconds"] for r in ok]
                best["rss_peak_mib"] = max(r["rss_peak_mib"] for r in ok)
                best["rss_added_mib"] = max(r["rss_added_mib"] for r in ok)
            payload["rows"] = [r for r in payload["rows"] if (r["model"], r["tool"]) != (name, tool)]
            payload["rows"].append(best)
            payload["summary"] = summary(payload["rows"])
            save(args.out, payload)
    payload["summary"] = summary(payload["rows"])
    save(args.out, payload)
    for model, cell in payload["summary"].items():
        log(f"{model:10s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in cell.items()))
    return 0


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: each engine's core and whole seconds side by side (``None``: not measured or failed), and
    adaprune's whole figure over Torch-Pruning's whole and core figures."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        engine, figure = FIGURE.get(r["tool"], (r["tool"], "?"))
        cell = out.setdefault(r["model"], {})
        key = f"{engine}_{figure}_s"
        cell[key] = r.get("seconds")
        if r.get("after_error"):
            cell[f"{engine}_{figure}_incomplete"] = r["after_error"]
    for cell in out.values():
        whole = cell.get("adaprune_whole_s")
        for ref in ("torch_pruning_whole_s", "torch_pruning_core_s"):
            if whole is not None and cell.get(ref):
                cell[f"adaprune_whole_over_{ref[:-2]}"] = whole / cell[ref]
    return dict(sorted(out.items()))


if __name__ == "__main__":
    raise SystemExit(main())
