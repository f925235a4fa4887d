"""Runtime adaptation: a ladder of nested widths against independently adapted models, and a governor under load.

Part A (accuracy). For every (dataset, seed) the same dense base model as ``benchmarks/accuracy.py`` (its
cache directory is reused). For every budget (fraction of the base MACs) an independent ``ap.adapt`` run
exactly as ``accuracy.py``'s ``adapt`` method (distillation from the dense model, ``--recovery`` epochs of
fine-tuning steps in all); then ONE ``ap.ladder`` over a copy of the base model with the same budgets as
its rungs and a joint recovery of as many optimizer steps as the independent runs took together (each
step trains up to three rungs: the sandwich rule). Test accuracy per rung, from the ladder's one set of
weights (``use(k)``) and its exported copies (``export(k)``, checked equal).

Part B (governor). On the ladder of ``--trace-dataset`` seed 0, a batch of ``--batch`` test inputs: a load
trace of phases with 0, 1 and 2 competing CPU-busy processes (``--phases``, ``--phase-s`` seconds each),
the same trace replayed for every policy: ``ap.Governor`` (torch backend), the fixed full model and the
fixed smallest rung. Deadline = ``--deadline`` x the full model's quiet latency. Per policy: deadline-miss
rate, calls per rung, mean test accuracy (the accuracy of the rung each call ran), and the latency of every
call over time (plotted with the rung used).

Part C (switching). Mean time of ``ladder.use(k)`` over many switches on the benchmark ladders and on
ResNet-18, MobileNetV2 and a small BERT with uniform nested widths.

    python benchmarks/ladder.py --cache /tmp/basecache
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A
from common import RESULTS, environment, load, log, save

import adaprune as ap
from adaprune.ladder import NestedWidths, order_channels

FIGURE = Path(__file__).resolve().parent.parent / "docs" / "ladder_governor.png"


def base_model(ds: str, seed: int, cache: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The accuracy benchmark's base model (and data) of ``ds`` and ``seed``, through its cache."""
    spec = A.DATASETS[ds]
    d = spec["data"]()
    return A.cached_base(spec, d, seed, cache, ds), d


def build_ladder(base: nn.Module, d: dict[str, torch.Tensor], budgets: list[float], steps: int, seed: int,
                 args: argparse.Namespace) -> tuple[ap.Ladder, float]:
    task = ap.ClassificationTask(A.loader(d["x_train"], d["y_train"], True, seed + 1000),
                                 A.loader(d["x_val"], d["y_val"], False, 0), lr=A.FT_LR, distill=True)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    lad = ap.ladder(model, d["x_val"][:1], task, [ap.Budget(macs=b) for b in budgets], tolerance=args.tolerance,
                    ignore=[model.fc], finetune_steps=steps, seed=seed,
                    allocation={"max_iterations": args.adapt_iters})
    return lad, time.perf_counter() - t0


def part_a(args: argparse.Namespace, payload: dict[str, Any],
           independent: bool = True) -> dict[tuple[str, int], tuple[ap.Ladder, dict[str, torch.Tensor]]]:
    """The ladders (and their data) per (dataset, seed); with ``independent`` also the independent adapt runs,
    and the results recorded in ``payload``."""
    ladders = {}
    ns = argparse.Namespace(adapt_inner_steps=0, tolerance=args.tolerance, adapt_iters=args.adapt_iters,
                            adapt_options={})
    for ds in args.datasets:
        for seed in args.seeds:
            base, d = base_model(ds, seed, args.cache)
            x = d["x_val"][:1]
            per_epoch = -(-len(d["y_train"]) // A.BATCH)
            total = args.recovery * per_epoch
            runs = []
            for b in args.budgets if independent else []:
                rec = A.run_method("adapt", base, x, d, b, total, seed, ns)
                runs.append({"budget": b, "acc": rec["acc"], "macs_ratio": rec["macs_ratio"],
                                    "budget_met": rec["budget_met"], "steps": rec["finetune_steps_total"],
                                    "wall_s": rec["wall_s"]})
                log(f"{ds} s{seed} adapt {b}: acc {rec['acc']:.4f} macs {rec['macs_ratio']:.3f}")
            steps = sum(r["steps"] for r in runs) if independent else total * len(args.budgets)
            lad, wall = build_ladder(base, d, args.budgets, steps, seed, args)
            ladders[(ds, seed)] = (lad, d)
            if not independent:
                continue
            rungs = []
            for r in lad.rungs:
                live = A.accuracy(lad.use(r.index), d["x_test"], d["y_test"])
                exported = A.accuracy(lad.export(r.index), d["x_test"], d["y_test"])
                rungs.append({"rung": r.index, "budget": r.budget.macs if r.budget else 1.0, "acc": live,
                              "acc_exported": exported, "macs_ratio": r.costs["macs"] / lad.rungs[0].costs["macs"],
                              "budget_met": r.budget_met, "widths": r.widths, "val": r.metrics["accuracy"]})
                log(f"{ds} s{seed} ladder rung {r.index}: acc {live:.4f} (exported {exported:.4f}) "
                    f"macs {rungs[-1]['macs_ratio']:.3f}")
            lad.use(0)
            full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
            held = sum(p.numel() * p.element_size() for p in lad.model.parameters())
            stats = sum(t.numel() * t.element_size() for n in lad.nested.norms for t in n.values())
            payload["runs"].append({"dataset": ds, "seed": seed, "base_acc": A.accuracy(base, d["x_test"], d["y_test"]),
                                    "independent": runs, "ladder": rungs, "ladder_steps": lad.finetune_steps,
                                    "ladder_wall_s": wall, "ladder_evaluations": lad.evaluations,
                                    "param_bytes_full": full_bytes, "param_bytes_ladder": held,
                                    "norm_stat_bytes": stats, "steps_per_epoch": per_epoch,
                                    "load_average": list(os.getloadavg())})
            save(args.out, payload)
    return ladders


def busy(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2147483648


def replay(policy: Any, x: torch.Tensor, phases: list[int],
           phase_s: float) -> tuple[list[tuple[float, int, float]], list[tuple[float, float, int]]]:
    """Calls ``policy(x) -> (rung, ms)`` for ``phase_s`` seconds per phase, with that many busy processes
    started before the phase and stopped after it. Returns the calls ``(t, rung, ms)`` and the phases
    ``(start, end, busy processes)`` as measured (seconds from the start)."""
    ctx = mp.get_context("spawn")
    out, spans = [], []
    t_start = time.perf_counter()
    for n in phases:
        stop = ctx.Event()
        procs = [ctx.Process(target=busy, args=(stop,), daemon=True) for _ in range(n)]
        for p in procs:
            p.start()
        time.sleep(0.5 if n else 0.0)  # let them get going
        begin = time.perf_counter()
        end = begin + phase_s
        while time.perf_counter() < end:
            rung, ms = policy(x)
            out.append((time.perf_counter() - t_start, rung, ms))
        spans.append((begin - t_start, time.perf_counter() - t_start, n))
        stop.set()
        for p in procs:
            p.join()
    return out, spans


def part_b(args: argparse.Namespace, lad: ap.Ladder, d: dict[str, torch.Tensor], accs: list[float]) -> dict[str, Any]:
    x = d["x_test"][: args.batch]
    torch.set_num_threads(args.trace_threads)
    gov = ap.Governor(lad, 1e9, example_inputs=x, repeats=50)  # the quiet latencies, then the deadline
    deadline = args.deadline * gov.base_ms[0]
    gov = ap.Governor(lad, deadline, base_ms=gov.base_ms)

    def governed(xb: torch.Tensor) -> tuple[int, float]:
        gov(xb)
        return gov.stats.trace[-1][0], gov.stats.trace[-1][1]

    def fixed(k: int) -> Any:
        def run(xb: torch.Tensor) -> tuple[int, float]:
            t0 = time.perf_counter()
            with torch.no_grad():
                (lad.use(k) if lad.current != k else lad.model)(xb)
            return k, (time.perf_counter() - t0) * 1000.0
        return run

    out: dict[str, Any] = {"deadline_ms": deadline, "quiet_ms": gov.base_ms, "phases": args.phases,
                           "phase_s": args.phase_s, "batch": args.batch, "threads": args.trace_threads,
                           "rung_acc": accs, "policies": {}}
    for name, policy in (("governor", governed), ("full", fixed(0)), ("smallest", fixed(len(lad) - 1))):
        calls, spans = replay(policy, x, args.phases, args.phase_s)
        misses = sum(ms > deadline for _, _, ms in calls)
        counts = [sum(r == k for _, r, _ in calls) for k in range(len(lad))]
        out["policies"][name] = {
            "calls": len(calls), "miss_rate": misses / len(calls), "per_rung_calls": counts,
            "mean_acc": sum(accs[r] for _, r, _ in calls) / len(calls),
            "switches": gov.stats.switches if name == "governor" else 0,
            "median_ms": statistics.median(ms for _, _, ms in calls), "calls_trace": calls, "phases": spans,
            "miss_rate_by_busy": {n: _rate([ms for t, _, ms in calls if any(a <= t <= b and m == n for a, b, m in spans)],
                                           deadline) for n in sorted(set(args.phases))}}
        log(f"governor trace {name}: {len(calls)} calls, miss rate {misses / len(calls):.3f}, "
            f"mean acc {out['policies'][name]['mean_acc']:.4f}, per rung {counts}")
    lad.use(0)
    return out


def _rate(values: list[float], deadline: float) -> float | None:
    return sum(v > deadline for v in values) / len(values) if values else None


def switch_us(nested: Any, repeats: int = 400) -> float:
    n = len(nested)
    t0 = time.perf_counter()
    for i in range(repeats):
        nested.use((i + 1) % n)
    nested.use(0)
    return (time.perf_counter() - t0) / repeats * 1e6


def part_c(ladders: dict[tuple[str, int], ap.Ladder]) -> dict[str, float]:
    import torchvision
    import transformers

    out = {f"{ds} seed {s}": switch_us(lad.nested) for (ds, s), lad in ladders.items() if s == 0}
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=512)).eval()
    models = {"resnet18": (torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), "fc"),
              "mobilenet_v2": (torchvision.models.mobilenet_v2(), torch.randn(1, 3, 64, 64), "classifier.1"),
              "bert (2 layers, 128 wide)": (bert, {"input_ids": torch.randint(0, 1000, (1, 16))}, "pooler")}
    for name, (model, x, head) in models.items():
        model.eval()
        graph = ap.trace(model, x, ignore=[model.get_submodule(head)])
        order_channels(model, graph, {g.name: torch.rand(g.size) for g in graph.groups})
        nested = NestedWidths(model, graph, [{g.name: max(1, int(g.size * f)) for g in graph.groups}
                                             for f in (0.75, 0.5, 0.25)])
        out[name] = switch_us(nested)
    for k, v in out.items():
        log(f"switch {k}: {v:.0f} us")
    return out


def plot(trace: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    colors = ["tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"]
    for ax, name in zip(axes, ("full", "governor", "smallest")):
        calls = trace["policies"][name]["calls_trace"]
        for k in sorted({r for _, r, _ in calls}):
            pts = [(t, ms) for t, r, ms in calls if r == k]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=3, color=colors[k % 5], label=f"rung {k}")
        ax.axhline(trace["deadline_ms"], color="black", lw=1, ls="--", label="deadline")
        p = trace["policies"][name]
        ax.set_title(f"{name}: miss rate {p['miss_rate']:.1%}, mean test accuracy {p['mean_acc']:.3f}", fontsize=9)
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=7, loc="upper right", markerscale=3)
    for ax, name in zip(axes, ("full", "governor", "smallest")):
        for start, end, n in trace["policies"][name]["phases"]:
            ax.axvspan(start, end, color="grey", alpha=0.06 * n, lw=0)
            ax.text(start, ax.get_ylim()[1] * 0.95, f" {n} busy", fontsize=7, va="top", color="grey")
    axes[-1].set_xlabel("seconds into the trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=sorted(A.DATASETS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recovery", type=int, default=2, help="fine-tuning epochs of each independent run")
    p.add_argument("--tolerance", type=float, default=0.5, help="adapt's tolerance (as in accuracy.py)")
    p.add_argument("--adapt-iters", type=int, default=10)
    p.add_argument("--trace-dataset", default="mnist1d", choices=sorted(A.DATASETS))
    p.add_argument("--phases", nargs="+", type=int, default=[0, 2, 1, 2, 0, 2, 2, 1, 2])
    p.add_argument("--trace-threads", type=int, default=1, help="torch threads while the trace is replayed")
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"],
                   help="a: rungs vs independent adapt runs; b: the governor's load trace; c: switching times. "
                        "Without a, b and c use ladders built here and keep the file's part-a results")
    p.add_argument("--phase-s", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--deadline", type=float, default=1.1, help="the deadline, times the full model's quiet latency")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="")
    p.add_argument("--out", default="ladder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment(args.threads), "config": vars(args), "runs": []}
    if "a" not in args.parts:
        payload = load(args.out) or payload
        payload.setdefault("parts_rerun", []).append({"parts": args.parts, "environment": environment(args.threads)})
        args.datasets, args.seeds = [args.trace_dataset], args.seeds[:1]
    ladders = part_a(args, payload, independent="a" in args.parts)
    key = (args.trace_dataset, args.seeds[0])
    if key in ladders and "b" in args.parts:
        lad, d = ladders[key]
        accs = [A.accuracy(lad.use(k), d["x_test"], d["y_test"]) for k in range(len(lad))]
        payload["trace"] = part_b(args, lad, d, accs)
        plot(payload["trace"], FIGURE)
        for pol in payload["trace"]["policies"].values():  # keep the file small: the plot has the calls
            pol["calls_trace"] = pol["calls_trace"][:: max(1, len(pol["calls_trace"]) // 400)]
    if "c" in args.parts:
        payload["switch_us"] = part_c({k: v[0] for k, v in ladders.items()})
    save(args.out, payload)
    log(f"wrote {RESULTS / (args.out + '.json')} and {FIGURE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
