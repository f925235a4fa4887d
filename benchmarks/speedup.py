"""Real CPU speed-up of structured pruning against its MACs reduction (and of unstructured masks).

For each model (torchvision, random init): the dense model, ``adaprune.prune`` at channel ratios 0.3
and 0.5 (uniform L2, classifier ignored), and ``torch.nn.utils.prune.l1_unstructured`` at 50% of every
conv/linear weight made permanent with ``prune.remove`` (zeros stored densely). Latency is the median
of ``adaprune.cost.latency.measure_latency`` on torch eager and ONNX Runtime (CPU), batch 1 and 32,
fixed threads, in interleaved rounds (every variant once per round; the least round median is kept, so
a burst of load from other processes does not land on one variant only). Structured variants are made
with ``round_to=1`` and ``round_to=8`` (kept widths a multiple of 8). ``efficiency = speed-up / MACs reduction`` (1.0 = latency falls exactly as MACs do).

    python benchmarks/speedup.py --models resnet18 mobilenet_v2 --size 64 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, log, save

import adaprune as ap
from adaprune.cost.latency import measure_latency


def head_of(model: nn.Module) -> nn.Module:
    if hasattr(model, "fc"):
        return model.fc
    return model.classifier[-1]


def unstructured(model: nn.Module, amount: float) -> nn.Module:
    from torch.nn.utils import prune

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", amount=amount)
            prune.remove(m, "weight")
    return model


def variants(name: str, size: int, ratios: list[float], round_to: list[int]) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    torch.manual_seed(0)
    dense = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    out = [("dense", dense, {})]
    for rt in round_to:
        for r in ratios:
            m = copy.deepcopy(dense)
            t = time.perf_counter()
            res = ap.prune(m, x, ratio=r, importance="l2", allocation="uniform", ignore=[head_of(m)], round_to=rt)
            label = f"adaprune ratio {r}" + (f" round_to {rt}" if rt > 1 else "")
            out.append((label, m.eval(), {"prune_s": time.perf_counter() - t, "frozen": len(res.frozen)}))
    m = unstructured(copy.deepcopy(dense), 0.5)
    zeros = sum(int((p == 0).sum()) for p in m.parameters())
    total = sum(p.numel() for p in m.parameters())
    out.append(("unstructured L1 50%", m.eval(), {"zero_fraction": zeros / total}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=64, help="input height = width")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per round at batch 1 (a quarter, >= 3, above)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the least round median is reported")
    p.add_argument("--round-to", nargs="+", type=int, default=[1, 8], help="adaprune round_to values")
    p.add_argument("--out", default="speedup")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment(args.threads), "config": vars(args), "rows": []}
    for name in args.models:
        vs = variants(name, args.size, args.ratios, args.round_to)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
            dense_macs = ap.count(vs[0][1], x).macs
            for backend in args.backends:
                # interleaved rounds: every variant once per round; the best (least) round median is kept,
                # which is robust to other processes taking the CPU for a while
                medians: dict[str, list[float]] = {label: [] for label, _, _ in vs}
                errors: dict[str, str] = {}
                repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
                for _ in range(args.rounds):
                    for label, model, _ in vs:
                        if label in errors:
                            continue
                        try:
                            lat = measure_latency(model, x, backend=backend, threads=args.threads, warmup=2,
                                                  repeats=repeats)
                            medians[label].append(lat.median_ms)
                        except Exception as exc:  # noqa: BLE001
                            errors[label] = f"{type(exc).__name__}: {exc}"[:300]
                dense_ms = min(medians["dense"]) if medians["dense"] else None
                for label, model, extra in vs:
                    c = ap.count(model, x)
                    ms = min(medians[label]) if medians[label] else None
                    row = {"model": name, "size": args.size, "batch": batch, "backend": backend, "variant": label,
                           "macs": c.macs, "params": c.params, "median_ms": ms, "round_medians_ms": medians[label],
                           "repeats_per_round": repeats, "error": errors.get(label),
                           "macs_reduction": dense_macs / c.macs if c.macs else None, **extra}
                    if ms and dense_ms:
                        row["speedup"] = dense_ms / ms
                        row["efficiency"] = row["speedup"] / row["macs_reduction"]
                    payload["rows"].append(row)
                    log(f"{name} b{batch} {backend:11s} {label:32s} {ms if ms is None else round(ms, 2)} ms "
                        f"macs x{row['macs_reduction']:.2f} speedup {row.get('speedup', float('nan')):.2f} "
                        f"eff {row.get('efficiency', float('nan')):.2f} rounds {[round(v, 2) for v in medians[label]]}"
                        + (f" {errors[label]}" if label in errors else ""))
                save(args.out, payload)
    payload["environment"]["load_average_at_end"] = list(__import__("os").getloadavg())
    save(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
