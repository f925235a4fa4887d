"""docs/benchmarks.md sections for benchmarks/scaleout.py (Ray against local) and benchmarks/search.py (search
allocator against the sensitivity allocator)."""

from __future__ import annotations

import statistics
from typing import Any

NAMES = {"mobilenet_v3_large": "MobileNetV3-Large", "resnet50": "ResNet-50", "resnet18": "ResNet-18",
         "mobilenet_v2": "MobileNetV2"}


def scaleout_section(payload: dict[str, Any]) -> list[str]:
    cfg, env = payload["config"], payload["environment"]
    lines = ["## Scale-out: candidate evaluations on Ray workers (`benchmarks/scaleout.py`)", "",
             (f"torchvision models (10 classes) trained {cfg['train_steps']} steps on sklearn's digits at {cfg['size']} px. "
              f"**Sensitivity**: every cluster of groups at ratios 0.25/0.5/0.75, the metric the validation loss over "
              f"{cfg['val']} images. *local*: this process at {cfg['threads']} torch threads; *Ray*: "
              f"`RayExecutor(workers={cfg['workers']}, threads=1)` on a local cluster (Ray {env.get('ray', '?')}), "
              "*cold* with the workers started and the model shipped inside the timed call (the cluster itself "
              "started before, as a cluster is up before a job), *warm* the same executor again. **Adapt**: "
              f"`ap.adapt` to {cfg['macs']:g} of the MACs, {cfg['finetune']} optimizer steps per step, at most "
              f"{cfg['iterations']} steps, `probe_budget={cfg['probes']}`; only the probes go to the workers."), "",
             ("| model | groups | clusters | evaluations | local s | Ray cold s | Ray warm s | speed-up cold | "
              "speed-up warm | tables identical | largest difference | same allocation |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in payload.get("models", {}).items():
        s = rec.get("sensitivity")
        if not s:
            continue
        lines.append(f"| {NAMES.get(name, name)} | {s['groups']} | {s['clusters']} | {s['evaluations']} | "
                     f"{s['local_s']:.1f} | {s['ray_cold_s']:.1f} | {s['ray_warm_s']:.1f} | {s['speedup_cold']:.2f}x | "
                     f"**{s['speedup_warm']:.2f}x** | {'yes' if s['identical'] else 'no'} | "
                     f"{s['largest_difference']:.1e} | {'yes' if s['same_allocation'] else 'no'} |")
    adapt_rows = [(n, r["adapt"]) for n, r in payload.get("models", {}).items() if r.get("adapt")]
    if adapt_rows:
        lines += ["", ("| model | local s | Ray s | speed-up | steps | accuracy before -> after (local) | MACs after | "
                       "same plan | same decisions | bit-identical history |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, a in adapt_rows:
            lo, ra = a["local"], a["ray"]
            lines.append(f"| {NAMES.get(name, name)} | {lo['wall_s']:.0f} | {ra['wall_s']:.0f} | {a['speedup']:.2f}x | "
                         f"{lo['steps']} | {lo['accuracy_before']:.3f} -> {lo['accuracy_after']:.3f} | "
                         f"{lo['macs_after']:.3f} | {'yes' if a['same_plan'] else 'no'} | "
                         f"{'yes' if a['same_decisions'] else 'no'} | {'yes' if a['identical'] else 'no'} |")
    ddp = payload.get("ddp")
    if ddp:
        one, two = ddp["1_processes"], ddp["2_processes"]
        lines += ["", (f"**DDP** (`torchrun --standalone --nproc_per_node 2`, gloo): {NAMES.get(ddp['model'], ddp['model'])} "
                       f"cut to half its MACs (uniform L2), fine-tuned {ddp['steps']} Adam steps on batches of "
                       f"{ddp['batch']} (each process half of every batch, gradients averaged)."), "",
                  "| processes x threads | fine-tune s | validation accuracy |", "|---|---|---|",
                  f"| 1 x {one['threads_each']} | {one['finetune_s']:.1f} | {one['accuracy'][0]:.4f} |",
                  (f"| 2 x {two['threads_each']} | {two['finetune_s']:.1f} | "
                  f"{' / '.join(f'{a:.4f}' for a in two['accuracy'])} (per process) |"),
                  "", f"Fine-tuning speed-up with 2 processes: {ddp['speedup']:.2f}x."]
    lines += ["", ("The workers run 1 torch thread each and this process 2: a convolution may then sum in another "
                   "order, which is the largest difference above; with equal threads the numbers are the same bit for "
                   "bit (tests/test_scale.py). How much two workers gain depends on how well one process already "
                   "uses both cores (a ResNet's large convolutions nearly twice as fast on 2 threads, MobileNet's "
                   "depthwise ones hardly).")]
    return lines


def ladder_section(payload: dict[str, Any]) -> list[str]:
    """``scaleout.py --phases ladder``: a ladder built locally and on Ray workers."""
    cfg = payload["config"]
    lines = ["## Scale-out: a ladder on Ray workers (`benchmarks/scaleout.py --phases ladder`)", "",
             (f"The models of the table above. `ap.ladder` with rungs at {', '.join(f'{r:g}' for r in cfg['ladder_rungs'])} "
              f"of the MACs, {cfg['ladder_steps']} joint recovery steps (Adam, lr {cfg['ladder_lr']:g}), each rung's allocation run with "
              f"`probe_budget={cfg['probes']}` and at most {cfg['iterations']} steps; *local*: this process at "
              f"{cfg['threads']} torch threads, *Ray*: `RayExecutor(workers={cfg['workers']}, threads=1)`, started inside "
              "the timed call. On Ray the allocation runs' probes and the finished rungs' evaluations (each rung "
              "exported with its own BatchNorm statistics, all at once) run on the workers; the joint recovery and the "
              "costs stay in this process."), "",
             ("| model | local s | Ray s | speed-up | evaluations | accuracy per rung (full first) | same widths | "
              "identical metrics | largest difference |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rec in payload.get("models", {}).items():
        lad = rec.get("ladder")
        if not lad:
            continue
        lo, ra = lad["local"], lad["ray"]
        lines.append(f"| {NAMES.get(name, name)} | {lo['wall_s']:.0f} | {ra['wall_s']:.0f} | {lad['speedup']:.2f}x | "
                     f"{lo['evaluations']} | {' / '.join(f'{a:.3f}' for a in lo['accuracy'])} | "
                     f"{'yes' if lad['same_widths'] else 'no'} | {'yes' if lad['identical'] else 'no'} | "
                     f"{lad['largest_difference']:.1e} |")
    lines += ["", ("The rungs' metrics are measured on the workers at 1 thread and here at 2, so they may differ in their "
                   "last bits (the largest difference); the widths, the accuracies and the joint recovery (here, seeded "
                   "by the ladder's seed) are the same. The ladder's cost here is the joint recovery and the allocation "
                   "runs' full evaluations, which stay in this process: Ray's workers take only the probes and the "
                   "rungs' final evaluations, and starting them and shipping the models costs more than that saves "
                   "on 2 cores.")]
    return lines


def alternatives_section(payload: dict[str, Any]) -> list[str]:
    """``scaleout.py --phases alternatives``: adapt trying several step sizes at once, here and on Ray workers."""
    cfg = payload["config"]
    k = cfg["alternatives"]
    t = cfg["threads"]
    lines = [(f"## Scale-out: {k} step sizes at once on Ray workers, this process at {t} thread{'s' if t > 1 else ''} "
              "(`benchmarks/scaleout.py --phases alternatives`)"), "",
             (f"The models of the scale-out table. `ap.adapt` to {cfg['macs']:g} of the MACs, tolerance "
              f"{cfg['tolerance']:g} (validation accuracy, {cfg['val']} images), first step {cfg['step']:g}, "
              f"{cfg['finetune']} optimizer steps (Adam, lr {cfg['lr']:g}) per size tried, at most {cfg['iterations']} steps, "
              f"`probe_budget={cfg['probes']}`. With `alternatives={k}` every step cuts, fine-tunes and measures "
              f"{k} sizes (each half the one before) and keeps the largest within tolerance: *local* one after "
              f"another in this process at {t} torch thread{'s' if t > 1 else ''}, *Ray* one per worker "
              f"(`RayExecutor(workers={cfg['workers']}, threads=1)`: 1 CPU reserved each, started inside the timed "
              f"call; each size runs at this process's thread count, so the numbers are this process's"
              + (f": here {t} threads on each 1-CPU worker, more than the machine's cores" if t > 1 else "")
              + "); *one size* is "
              "the default run (`alternatives=1`) here, for reference: it probes and blames again between the "
              "sizes it tries, so it is another run, not the same one slower."), "",
             ("| model | run | wall s | steps | sizes tried | accepted | optimizer steps | evaluations | "
              "accuracy before -> after | MACs after | budget met |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in payload.get("models", {}).items():
        alt = rec.get("alternatives")
        if not alt:
            continue
        for run, label in (("one_size", "one size, here"), ("local", f"{k} sizes, here"), ("ray", f"{k} sizes, Ray")):
            r = alt[run]
            lines.append(f"| {NAMES.get(name, name)} | {label} | {r['wall_s']:.0f} | {r['steps']} | {r['tried']} | "
                         f"{r['accepted']} | {r['optimizer_steps']} | {r['evaluations']} | "
                         f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} | {r['macs_after']:.3f} | "
                         f"{'yes' if r['budget_met'] else 'no'} |")
        lines += ["", (f"{NAMES.get(name, name)}: Ray against here with the same sizes, {alt['speedup']:.2f}x; same plan: "
                       f"{'yes' if alt['same_plan'] else 'no'}, same decisions: {'yes' if alt['same_decisions'] else 'no'}, "
                       f"bit-identical history: {'yes' if alt['identical'] else 'no'}.")]
    return lines


SEARCH_JUDGES = {
    "masked": ("", "masked", "masked, without fine-tuning, by minus the validation cross-entropy"),
    "bn": ("+bn", "adaptive BN", ("after re-estimating its BatchNorm statistics on 8 training batches "
                                 "(`adaprune.search.Recalibrated`, adaptive BN as EagleEye judges candidates)")),
    "tuned": ("+tuned", "short-tune", ("after {steps} Adam steps on the masked candidate (`adaprune.search.Tuned`, "
                                      "NetAdapt's short-term fine-tune, weights put back after)")),
}
"""``benchmarks/search.py``'s judges: the suffix of their rows, their name in the tables, how they judge."""


def search_section(payload: dict[str, Any]) -> list[str]:
    cfg, seeds = payload["config"], payload["seeds"]
    judges = cfg.get("judges", list(SEARCH_JUDGES))
    first = next(iter(seeds.values()))
    evaluations = first["sensitivity" + SEARCH_JUDGES[judges[0]][0]]["evaluations"]
    how = "; ".join(f"*{SEARCH_JUDGES[j][1]}*: {SEARCH_JUDGES[j][2]}" for j in judges).format(
        steps=cfg.get("judge_steps", 30))
    lines = [(f"## Search allocator against the sensitivity allocator at {evaluations} evaluations each, "
              f"{', '.join(SEARCH_JUDGES[j][1] for j in judges)} judge{'s' if len(judges) > 1 else ''} "
              "(`benchmarks/search.py`)"), "",
             (f"MNIST-1D, accuracy.py's CNN1D(32) (one base model per seed), {cfg['macs']:g} of the MACs. "
              f"*sensitivity*: `ap.sensitivity` (every cluster at {'/'.join(f'{r:g}' for r in cfg.get('ratios', [0.25, 0.5, 0.75]))}) "
              "then `ap.allocate_from_sensitivity`; "
              f"*search*: `ap.search` (Optuna TPE, 2 candidates at a time) with as many evaluations "
              f"({evaluations}); " + (
                  "*NetAdapt*: `ap.search(method=\"netadapt\")`, a greedy path of evaluations // clusters steps to the "
                  "budget (each step's budget geometrically nearer it), one candidate per cluster a step (that "
                  "cluster cut 3 times as fast as the others, the default, not tuned), the best-judged kept; at most as "
                  "many evaluations; " if "netadapt" in cfg.get("methods", []) else "") +
              "*uniform*: every group the same ratio, no evaluations. The same judge scores every "
              f"allocator's candidates, {how}. Every plan is "
              f"then fine-tuned with the same {cfg['steps']} Adam steps (lr {cfg['lr']:g}, batches of {cfg['batch']}) "
              "and scored on the 1,000 held-out test examples.")]
    if cfg.get("finetunes", 1) > 1:
        lines[-1] = lines[-1][:-len("and scored on the 1,000 held-out test examples.")] + (
            f"{cfg['finetunes']} times with other batch orders (the same {cfg['finetunes']} for every plan), and a "
            "plan's score is their mean accuracy on the 1,000 held-out test examples.")
    if any("repeats" in first[n] for n in first if isinstance(first[n], dict)):
        lines[-1] += (" A search's evaluations are all of different plans: a sampled candidate whose plan was "
                      "evaluated before is told that value and costs no evaluation (*repeats told*: mean per seed).")
    lines += ["", f"Seeds: {len(seeds)} base models ({', '.join(seeds)}).", "",
              "| allocation | evaluations | MACs kept | test accuracy (mean ± sd) | lowest | highest |",
              "|---|---|---|---|---|---|"]
    labels = {"uniform": "uniform"}
    for j in judges:
        suffix, name, _ = SEARCH_JUDGES[j]
        tail = "" if j == "masked" else f", {name} judge"
        labels.update({"sensitivity" + suffix: "sensitivity" + tail, "search" + suffix: "search" + tail,
                       "netadapt" + suffix: "NetAdapt" + tail})
    for name in [n for n in labels if n in payload["summary"]]:
        s = payload["summary"][name]
        accs = [seeds[k][name]["test_accuracy"] for k in seeds]
        kept = sum(seeds[k][name]["macs"] for k in seeds) / len(seeds)
        evals = str(first[name]["evaluations"])
        if "repeats" in first[name] and name.startswith("search"):  # sampled again, told, not evaluated
            evals += f" (+{sum(seeds[k][name]['repeats'] for k in seeds) / len(seeds):.1f} repeats told)"
        lines.append(f"| {labels[name]} | {evals} | {kept:.3f} | **{s['mean']:.4f} ± {s['sd']:.4f}** "
                     f"| {min(accs):.4f} | {max(accs):.4f} |")
    if "paired" in payload:
        names = {suffix: name for suffix, name, _ in SEARCH_JUDGES.values()}
        lines += ["", "Each search minus sensitivity on the same base models (Student-t 95% interval over the seeds):",
                  "", "| search | judge | mean difference | 95% interval | search wins / ties / losses |",
                  "|---|---|---|---|---|"]
        for method, key in (("TPE", "paired"), ("NetAdapt", "paired_netadapt")):
            for j, pr in payload.get(key, {}).items():
                lines.append(f"| {method} | {names[j]} | {pr['mean']:+.4f} | {pr['low']:+.4f} .. {pr['high']:+.4f} | "
                             f"{pr['wins']} / {pr['ties']} / {pr['losses']} |")
    shown = list(seeds)[:3]
    suffix = SEARCH_JUDGES[judges[0]][0]
    lines += ["", f"Widths kept (conv layers; the {SEARCH_JUDGES[judges[0]][1]} judge's plans), seeds {', '.join(shown)}: "
              + "; ".join(f"seed {k}: " + ", ".join(f"{n} {seeds[k][n + (suffix if n != 'uniform' else '')]['widths']}"
                                                    for n in ("uniform", "sensitivity", "search", "netadapt")
                                                    if n + (suffix if n != "uniform" else "") in seeds[k])
                          for k in shown) + "; dense [32, 64, 64, 128]."]
    return lines


def judges_section(payload: dict[str, Any]) -> list[str]:
    """benchmarks/search_judges.py: how well each judge ranks a search's plans by their fine-tuned accuracy."""
    cfg, seeds = payload["config"], payload["seeds"]
    how = "; ".join(f"*{SEARCH_JUDGES[j][1]}*: {SEARCH_JUDGES[j][2]}" for j in cfg["judges"]).format(
        steps=cfg.get("judge_steps", 30))
    lines = ["## How well each judge ranks the plans by their fine-tuned accuracy (`benchmarks/search_judges.py`)", "",
             (f"MNIST-1D, accuracy.py's CNN1D(32), {cfg['macs']:g} of the MACs, as in the search sections above: "
              f"`ap.search` with {cfg['trials']} evaluations per seed and judge ({how}), then every plan it evaluated "
              f"cut and fine-tuned with {cfg['steps']} Adam steps, {cfg['finetunes']} batch orders, and scored by their "
              "mean accuracy on the 1,000 held-out test examples. *Spearman*: rank correlation between the judge's "
              "value and that accuracy over the trials; *judge's first*: the accuracy of the plan the judge ranks "
              "first (the one a search returns, before its leftover channels are given back); *fine-tuning noise*: "
              "the standard deviation of one fine-tuning run's accuracy about its plan's mean (the within-plan "
              "variance over the batch orders, pooled over the plans)."), "",
             "| seed | judge | trials | Spearman | judge's first | best trial | mean of the trials | fine-tuning noise |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, judges in seeds.items():
        for j, r in judges.items():
            pairs = [t["test"] for t in r["trials"] if len(t["test"]) > 1]  # pooled within-plan variance
            noise = f"{statistics.mean(statistics.variance(p) for p in pairs) ** 0.5:.4f}" if pairs else "-"
            lines.append(f"| {seed} | {SEARCH_JUDGES[j][1]} | {len(r['trials'])} | {r['spearman']:+.3f} | "
                         f"{r['judged_first']:.4f} | {r['best']:.4f} | {r['mean']:.4f} | {noise} |")
    return lines
