"""Scale-out on one machine: sensitivity and adapt's probes on Ray workers against the local executor.

The models (``--models``): torchvision's MobileNetV3-Large and ResNet-50 (10 classes), each trained here for
``--train-steps`` steps on sklearn's digits, upscaled to ``--size`` pixels and repeated over 3 channels (cached in
benchmarks/results/cache/). Both graphs have many groups (every block's inner widths, the stages' residual
widths), so candidate evaluations dominate. They differ in how well one process uses the machine's cores: a
ResNet's large convolutions run nearly twice as fast on 2 threads as on 1, MobileNet's depthwise convolutions
and small layers hardly faster, so the second core helps only when a second process evaluates.

Phases, each timed on its own:

- **sensitivity**: ``ap.sensitivity`` over every cluster of groups at ratios 0.25/0.5/0.75, the metric the
  validation loss over ``--val`` images. ``local``: this process, torch at ``--threads`` threads (the machine's
  cores: what a user runs). ``ray``: ``RayExecutor(workers=--workers, threads=1)``, timed twice: ``cold`` (the
  workers started and the model shipped inside the timed call; the Ray cluster itself is started before, as a
  cluster is before a job) and ``warm`` (the same executor again, workers and model already there). The tables
  must be identical, or (the workers running fewer threads than this process, so a convolution may add its terms
  in another order) differ only in their last bits: the largest difference is recorded, and whether
  ``ap.allocate_from_sensitivity`` at ``--macs`` gives the same plan from both tables.
- **adapt**: ``ap.adapt`` to ``--macs`` of the MACs with a ClassificationTask (``--finetune`` optimizer steps a
  step, ``--iterations`` steps at most, ``probe_budget=--probes``), local and on Ray (a fresh executor, timed
  cold). The plans and histories must be identical. Only the probes run on the workers: the fine-tuning and the
  steps' full evaluations stay in this process.
- **alternatives** (not in the defaults; ``--phases alternatives --out scaleout_alternatives``): ``ap.adapt`` as in
  *adapt* (first step ``--step``, the task's Adam at ``--lr``) with ``alternatives=--alternatives``: each step cuts, fine-tunes and measures that
  many sizes at once and keeps the largest within tolerance. Run here, on Ray (a fresh executor, timed cold: each
  size's fine-tuning and evaluation on a worker), and here with one size at a time for reference. The Ray and the
  local run must be identical.
- **ladder**: ``ap.ladder`` with rungs at ``--ladder-rungs`` of the MACs (``--ladder-steps`` joint recovery steps
  of Adam at ``--ladder-lr``;
  each rung's allocation run with ``--probes`` and ``--iterations``), local and on Ray (timed cold): the allocation
  runs' probes and the finished rungs' evaluations run on the workers. The rungs must come out identical.
- **ddp**: the first model cut to half its MACs and fine-tuned ``--ddp-steps`` Adam steps (batches of 64), in one
  process at ``--threads`` threads and under ``torchrun`` with 2 processes of 1 thread (gloo; each process half of
  every batch, gradients averaged): fine-tuning time and validation accuracy.

    python benchmarks/scaleout.py                        # both models, both phases (about 20 minutes on 2 cores)
    python benchmarks/scaleout.py --phases sensitivity   # just the sensitivity phase

On a cluster, the same call takes ``RayExecutor(workers=N, address="ray://head:10001")`` (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from common import RESULTS, environment, log, save
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits as 3 x size x size images (normalised), split 1400 / the rest with a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def trained_model(name: str, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> nn.Module:
    from safetensors.torch import load_file, save_file
    from torchvision import models

    from adaprune.task import recalibrate_bn

    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10)
    cache = RESULTS / "cache" / f"scaleout_{name}_{args.size}px_{args.train_steps}steps.safetensors"
    if cache.exists():
        model.load_state_dict(load_file(str(cache)))
        return model.eval()

    xt, yt = data[0], data[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=args.train_steps)
    g = torch.Generator().manual_seed(1)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        idx = torch.randint(0, len(yt), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:  # (the loss in train mode)
            log(f"{name} train step {step}: loss {loss.item():.3f}")
    log(f"{name}: trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s")
    # BatchNorm's running statistics from the final weights (MobileNetV3's momentum 0.01 would still be near the
    # initial ones after a few hundred steps): a cumulative average over the training images
    recalibrate_bn(model, [(xt[i:i + 64], None) for i in range(0, len(yt), 64)], max_batches=len(yt))
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return model.eval()


def head(model: nn.Module) -> nn.Module:
    """The classifier's last layer (kept whole): ResNet's ``fc``, MobileNet's ``classifier[-1]``."""
    return model.fc if hasattr(model, "fc") else model.classifier[-1]


class ValLoss:
    """The mean cross-entropy over the validation images (what sensitivity measures); picklable."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __call__(self, model: nn.Module) -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(self.y), 128):
            total += float(nn.functional.cross_entropy(model(self.x[i:i + 128]), self.y[i:i + 128], reduction="sum"))
        return -total / len(self.y)  # higher is better, as sensitivity reads it


def rows(result: Any) -> list[tuple[str, float, float]]:
    return [(r.cluster, r.ratio, r.metric) for r in result.rows]


def sensitivity_phase(args: argparse.Namespace, model: nn.Module, data: tuple[torch.Tensor, ...],
                      ray_started: float) -> dict[str, Any]:
    import adaprune as ap
    from adaprune.sensitivity import clusters as cluster_groups

    measure = ValLoss(data[2][:args.val], data[3][:args.val])
    x = data[2][:2]
    graph = ap.trace(model, x, ignore=[head(model)])
    clusters = len(cluster_groups(model, graph.groups))
    out: dict[str, Any] = {"groups": len(graph.groups), "clusters": clusters, "ratios": [0.25, 0.5, 0.75],
                           "evaluations": clusters * 3 + 1, "val_images": int(min(args.val, len(data[3])))}
    t0 = time.perf_counter()
    local = ap.sensitivity(model, x, measure, ratios=(0.25, 0.5, 0.75), graph=graph)
    out["local_s"] = time.perf_counter() - t0
    log(f"{type(model).__name__} sensitivity local: {out['local_s']:.1f} s ({out['evaluations']} evaluations)")
    with ap.RayExecutor(workers=args.workers, threads=1) as ex:
        t0 = time.perf_counter()
        remote = ap.sensitivity(model, x, measure, ratios=(0.25, 0.5, 0.75), graph=graph, executor=ex)
        out["ray_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = ap.sensitivity(model, x, measure, ratios=(0.25, 0.5, 0.75), graph=graph, executor=ex)
        out["ray_warm_s"] = time.perf_counter() - t0
    out["ray_cluster_start_s"] = ray_started
    out["identical"] = rows(remote) == rows(local) and rows(again) == rows(local) and \
        remote.baseline == local.baseline
    out["largest_difference"] = max(abs(a[2] - b[2]) for a, b in zip(rows(remote), rows(local)))
    out["metric_range"] = [min(r[2] for r in rows(local)), local.baseline]
    budget = ap.Budget(macs=args.macs)
    plans = [ap.allocate_from_sensitivity(model, x, t, budget, graph=graph).to_json() for t in (local, remote)]
    out["same_allocation"] = plans[0] == plans[1]
    out["speedup_cold"] = out["local_s"] / out["ray_cold_s"]
    out["speedup_warm"] = out["local_s"] / out["ray_warm_s"]
    log(f"sensitivity ray: cold {out['ray_cold_s']:.1f} s ({out['speedup_cold']:.2f}x), warm "
        f"{out['ray_warm_s']:.1f} s ({out['speedup_warm']:.2f}x), identical: {out['identical']} (largest difference "
        f"{out['largest_difference']:.2g}, same allocation: {out['same_allocation']})")
    return out


def adapt_runs(args: argparse.Namespace, model: nn.Module, data: tuple[torch.Tensor, ...], lr: float,
               settings: dict[str, Any], runs: list[tuple[str, int, str]], out: dict[str, Any]) -> dict[str, Any]:
    """``ap.adapt`` of a copy of ``model`` once per ``(name, alternatives, "local" or "ray")`` of ``runs`` (Ray: a
    fresh executor, timed cold), each recorded in ``out[name]``; then the "local" and "ray" runs compared."""
    import adaprune as ap

    xt, yt, xv, yv = data

    def task() -> ap.ClassificationTask:
        return ap.ClassificationTask(DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True),
                                     DataLoader(TensorDataset(xv[:args.val], yv[:args.val]), batch_size=128), lr=lr)

    results = {}
    for name, k, where in runs:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if where == "local":
            res = ap.adapt(m, xv[:2], task(), ap.Budget(macs=args.macs), ignore=[head(m)], alternatives=k, **settings)
        else:
            with ap.RayExecutor(workers=args.workers, threads=1) as ex:
                res = ap.adapt(m, xv[:2], task(), ap.Budget(macs=args.macs), ignore=[head(m)], executor=ex,
                               alternatives=k, **settings)
        wall = time.perf_counter() - t0
        results[name] = res
        out[name] = {"wall_s": wall, "steps": len({h.step for h in res.history}), "tried": len(res.history),
                     "accepted": sum(h.accepted for h in res.history), "evaluations": res.evaluations,
                     "optimizer_steps": res.optimizer_steps, "budget_met": res.budget_met,
                     "accuracy_before": res.before.get("accuracy"), "accuracy_after": res.after.get("accuracy"),
                     "macs_after": res.costs_after["macs"] / res.costs_before["macs"]}
        log(f"adapt {name} (alternatives={k}): {wall:.0f} s, {out[name]['steps']} steps ({len(res.history)} sizes "
            f"tried), accuracy {res.before.get('accuracy'):.3f} -> {res.after.get('accuracy'):.3f}, "
            f"MACs {out[name]['macs_after']:.3f}")
    a, b = results["local"], results["ray"]
    out["same_plan"] = a.plan.to_json() == b.plan.to_json()
    out["same_decisions"] = [h.accepted for h in a.history] == [h.accepted for h in b.history]
    out["identical"] = out["same_plan"] and \
        [(h.accepted, h.metrics, h.costs) for h in a.history] == [(h.accepted, h.metrics, h.costs) for h in b.history]
    out["speedup"] = out["local"]["wall_s"] / out["ray"]["wall_s"]
    log(f"speedup {out['speedup']:.2f}x, same plan: {out['same_plan']}, identical: {out['identical']}")
    return out


def adapt_phase(args: argparse.Namespace, model: nn.Module, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    settings = {"tolerance": args.tolerance, "max_iterations": args.iterations, "finetune_steps": args.finetune,
                "probe_budget": args.probes, "seed": 0}
    out: dict[str, Any] = {"macs": args.macs, **settings}
    return adapt_runs(args, model, data, 0.01, settings, [("local", 1, "local"), ("ray", 1, "ray")], out)


def alternatives_phase(args: argparse.Namespace, model: nn.Module, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """adapt with ``alternatives=--alternatives`` (each step's sizes cut, fine-tuned and measured at once), here and
    on Ray, beside the one-size-at-a-time run here."""
    settings = {"tolerance": args.tolerance, "max_iterations": args.iterations, "finetune_steps": args.finetune,
                "probe_budget": args.probes, "seed": 0, "step": args.step, "max_step": max(args.step, 0.6)}
    out: dict[str, Any] = {"macs": args.macs, "alternatives": args.alternatives, "lr": args.lr, **settings}
    k = args.alternatives
    return adapt_runs(args, model, data, args.lr, settings,
                      [("one_size", 1, "local"), ("local", k, "local"), ("ray", k, "ray")], out)


def ladder_phase(args: argparse.Namespace, model: nn.Module, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """``ap.ladder`` with rungs at ``--ladder-rungs`` of the MACs, locally and on a fresh Ray executor (timed cold):
    the rungs' allocation runs evaluate their probes on the workers, and the finished rungs are evaluated there at
    once (each exported with its own BatchNorm statistics); the joint recovery stays in this process."""
    import adaprune as ap

    xt, yt, xv, yv = data

    def task() -> ap.ClassificationTask:
        return ap.ClassificationTask(DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True),
                                     DataLoader(TensorDataset(xv[:args.val], yv[:args.val]), batch_size=128),
                                     lr=0.01)

    rungs = [ap.Budget(macs=r) for r in args.ladder_rungs]
    allocation = {"probe_budget": args.probes, "max_iterations": args.iterations}
    out: dict[str, Any] = {"rungs": args.ladder_rungs, "finetune_steps": args.ladder_steps, "lr": args.ladder_lr,
                           **allocation}
    built = {}
    for name in ("local", "ray"):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if name == "local":
            lad = ap.ladder(m, xv[:2], task(), rungs, tolerance=args.tolerance, ignore=[head(m)],
                            finetune_steps=args.ladder_steps, lr=args.ladder_lr, allocation=allocation)
        else:
            with ap.RayExecutor(workers=args.workers, threads=1) as ex:
                lad = ap.ladder(m, xv[:2], task(), rungs, tolerance=args.tolerance, ignore=[head(m)],
                                finetune_steps=args.ladder_steps, lr=args.ladder_lr, allocation=allocation,
                                executor=ex)
        wall = time.perf_counter() - t0
        built[name] = lad
        out[name] = {"wall_s": wall, "evaluations": lad.evaluations,
                     "accuracy": [r.metrics.get("accuracy") for r in lad.rungs],
                     "macs": [r.costs["macs"] / lad.rungs[0].costs["macs"] for r in lad.rungs]}
        log(f"ladder {name}: {wall:.0f} s, accuracy per rung {[round(a, 3) for a in out[name]['accuracy']]}")
    a, b = built["local"], built["ray"]
    out["same_widths"] = [r.widths for r in a.rungs] == [r.widths for r in b.rungs]
    out["identical"] = out["same_widths"] and [r.metrics for r in a.rungs] == [r.metrics for r in b.rungs]
    out["largest_difference"] = max(abs(x - y) for r, q in zip(a.rungs, b.rungs) for k in r.metrics
                                    for x, y in [(r.metrics[k], q.metrics[k])])
    out["speedup"] = out["local"]["wall_s"] / out["ray"]["wall_s"]
    log(f"ladder speedup {out['speedup']:.2f}x, same widths: {out['same_widths']}, identical: {out['identical']}")
    return out


def ddp_phase(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Recovery fine-tuning of the half-MACs model: 1 process at --threads threads, then torchrun with 2
    processes of 1 thread each (gloo), the same batches, each process half of every batch."""
    import subprocess
    import tempfile

    weights = RESULTS / "cache" / f"scaleout_{name}_{args.size}px_{args.train_steps}steps.safetensors"
    worker = str(Path(__file__).resolve().parent / "_ddp_worker.py")
    out: dict[str, Any] = {"model": name, "steps": args.ddp_steps, "batch": 64}
    for procs, threads in ((1, args.threads), (2, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            tail = [worker, str(weights), name, str(args.size), str(args.ddp_steps), str(threads), tmp]
            cmd = [sys.executable, *tail] if procs == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *tail]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(procs)]
        out[f"{procs}_processes"] = {"threads_each": threads, "finetune_s": ranks[0]["seconds"], "wall_s": wall,
                                     "accuracy": [r["accuracy"] for r in ranks]}
        log(f"DDP {procs} process(es) x {threads} thread(s): fine-tune {ranks[0]['seconds']:.1f} s, accuracy "
            f"{[round(r['accuracy'], 4) for r in ranks]}")
    out["speedup"] = out["1_processes"]["finetune_s"] / out["2_processes"]["finetune_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v3_large", "resnet50"],
                   choices=["mobilenet_v3_large", "resnet50", "resnet18", "mobilenet_v2"])
    p.add_argument("--phases", nargs="+", default=["sensitivity", "adapt", "ladder", "ddp"],
                   choices=["sensitivity", "adapt", "alternatives", "ladder", "ddp"])
    p.add_argument("--alternatives", type=int, default=2, help="step sizes tried at once (the alternatives phase)")
    p.add_argument("--step", type=float, default=0.25, help="adapt's first step (the alternatives phase)")
    p.add_argument("--lr", type=float, default=0.01, help="the task's fine-tuning rate (Adam; the alternatives phase)")
    p.add_argument("--ladder-rungs", nargs="+", type=float, default=[0.5, 0.25], help="the ladder's rungs (MACs)")
    p.add_argument("--ladder-steps", type=int, default=20, help="the ladder's joint recovery steps")
    p.add_argument("--ladder-lr", type=float, default=1e-3, help="the ladder's joint recovery learning rate (Adam)")
    p.add_argument("--ddp-steps", type=int, default=100, help="fine-tuning steps of the DDP phase")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--val", type=int, default=397, help="validation images (at most 397)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the local runs")
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--finetune", type=int, default=10)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--out", default="scaleout")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment(args.threads), "config": vars(args)}
    data = digits(args.size)
    import ray

    import adaprune as ap

    t0 = time.perf_counter()
    with ap.RayExecutor(workers=args.workers) as first:  # starts the local cluster (up before a job, as a cluster is)
        first.pids()
    ray_started = time.perf_counter() - t0
    payload["environment"]["ray"] = ray.__version__
    payload["models"] = {}
    for name in args.models:
        model = trained_model(name, args, data)
        record: dict[str, Any] = {}
        payload["models"][name] = record
        if "sensitivity" in args.phases:
            record["sensitivity"] = sensitivity_phase(args, model, data, ray_started)
            save(args.out, payload)
        if "adapt" in args.phases:
            record["adapt"] = adapt_phase(args, model, data)
            save(args.out, payload)
        if "alternatives" in args.phases:
            record["alternatives"] = alternatives_phase(args, model, data)
            save(args.out, payload)
        if "ladder" in args.phases:
            record["ladder"] = ladder_phase(args, model, data)
            save(args.out, payload)
    if "ddp" in args.phases:
        payload["ddp"] = ddp_phase(args, args.models[0])
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    log(f"wrote {save(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
