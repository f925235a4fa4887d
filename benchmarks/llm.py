"""One-shot sparsity on a small LLaMA trained here: held-out perplexity of magnitude, Wanda and SparseGPT,
each per layer and with OWL's per-layer fractions, at several sparsities and N:M patterns.

Data (offline, deterministic): ``--corpus source`` (the default), the standard library's own ``.py`` files
cut into blocks at blank lines (the first ``--blocks`` of them, files in sorted order); or ``docstrings``,
one text per documented stdlib object (``transformer.docstring_pairs``; 1,666 texts, which a model of this
size overfits). Split by position: every 10th text is held out for the test perplexity, the rest trains
the tokenizer (byte-pair encoding from the ``tokenizers`` library, ``--vocab`` tokens) and the model.
Texts are truncated to ``--seq`` tokens.

Model: ``LlamaForCausalLM`` from its config (``--hidden``, ``--layers``, 4 heads over 2 KV heads, FFN
``--ffn``), trained with AdamW (lr 2e-3, cosine, batches of 32) for ``--train-steps`` steps, and cached
in ``--cache`` by its settings.

Methods: ``adaprune.sparsify`` with ``importance`` magnitude, wanda or sparsegpt, ``scope`` layer or owl,
every decoder Linear (the embedding and the output layer are kept dense, as the papers do); calibration =
``--calib`` training texts (the same for every method). Recorded: test perplexity, the sparsity reached,
wall time.

    python benchmarks/llm.py                       # the default grid
    python benchmarks/llm.py --sparsities 0.5 --patterns --out scratch
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import environment, save

import adaprune as ap


def texts(corpus: str, limit: int) -> tuple[list[str], dict[str, Any]]:
    """``docstrings``: one text per documented stdlib object; ``source``: the stdlib's own ``.py`` files
    (sorted; tests, idlelib, lib2to3 and site-packages left out) cut into blocks at blank lines, the first
    ``limit`` blocks of at least 40 characters."""
    if corpus == "docstrings":
        from transformer import docstring_pairs

        pairs, info = docstring_pairs()
        return [f"{q} {d}" for _, q, d in pairs], info
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__")
    files = sorted(f for f in root.rglob("*.py") if not any(part in skip for part in f.relative_to(root).parts))
    out: list[str] = []
    read = 0
    for read, f in enumerate(files, 1):
        out += [b.strip() for b in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if len(b.strip()) >= 40]
        if len(out) >= limit:
            break
    out = out[:limit]
    digest = hashlib.sha256("\n".join(out).encode()).hexdigest()[:16]
    return out, {"root": str(root), "files_read": read, "blocks": len(out), "sha256_16": digest,
                 "python": sys.version.split()[0]}


def tokenizer_for(train: list[str], vocab: int) -> Any:
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(train, tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def trained(args: argparse.Namespace, tok: Any, task: ap.LanguageModelingTask) -> tuple[torch.nn.Module, float]:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.seq, pad_token_id=tok.pad_token_id)
    key = hashlib.sha256(json.dumps([cfg.to_dict(), args.train_steps, args.seq, args.vocab, args.corpus, args.blocks,
                                     len(task.train or [])], sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(args.cache) / f"llama-{key}"
    if (path / "config.json").exists():
        return transformers.LlamaForCausalLM.from_pretrained(path).eval(), 0.0
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warm = max(1, args.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm)
                                              * 0.5 * (1 + math.cos(math.pi * s / args.train_steps)))
    batches = task.train or []
    t = time.perf_counter()
    model.train()
    for step in range(args.train_steps):
        b = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, b, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"train step {step}: loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - t
    model.eval()
    model.save_pretrained(path)
    return model, seconds


def parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    """The options of the model and its data (shared with ``llm_structured.py``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--calib", type=int, default=128, help="training texts for calibration")
    p.add_argument("--corpus", choices=["docstrings", "source"], default="source")
    p.add_argument("--blocks", type=int, default=40_000, help="source blocks read (--corpus source)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/adaprune-llm-cache")
    return p


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The corpus, tokenizer, task (test texts), the trained (or cached) model, calibration batches and the
    dense model's test metrics."""
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    corpus, info = texts(args.corpus, args.blocks)
    test, train = corpus[::10], [t for i, t in enumerate(corpus) if i % 10]
    tok = tokenizer_for(train, args.vocab)
    task = ap.LanguageModelingTask(test, train, tokenizer=tok, max_length=args.seq, batch_size=32)
    model, train_s = trained(args, tok, task)
    calib = [(b, b["input_ids"]) for b in (task.train or [])[:max(1, args.calib // 32)]]
    dense = task.evaluate(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"corpus {len(corpus)} texts ({len(train)} train, {len(test)} test); {params:,} params; "
          f"dense test perplexity {dense['perplexity']:.2f} on {int(dense['tokens'])} tokens", flush=True)
    return {"task": task, "model": model, "calib": calib, "dense": dense,
            "config": {**vars(args), "corpus_info": info, "texts": len(corpus), "train": len(train),
                       "test": len(test), "params": params, "train_seconds": train_s}}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    p.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.6, 0.7])
    p.add_argument("--patterns", nargs="*", default=["2:4", "4:8"])
    p.add_argument("--importances", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--out", default="llm")
    args = p.parse_args(argv)
    ready = prepare(args)
    task, model, calib, dense = ready["task"], ready["model"], ready["calib"], ready["dense"]
    runs: list[dict[str, Any]] = []
    cells = [("sparsity", s) for s in args.sparsities] + [("pattern", q) for q in args.patterns]
    for kind, value in cells:
        for importance in args.importances:
            for scope in (["layer", "owl"] if kind == "sparsity" else ["layer"]):
                m = copy.deepcopy(model)
                t = time.perf_counter()
                res = ap.sparsify(m, importance=importance, scope=scope, calibration=calib,
                                  ignore=["lm_head", "model.embed_tokens"], **{kind: value})
                seconds = time.perf_counter() - t
                ppl = task.evaluate(m)["perplexity"]
                runs.append({"kind": kind, "value": value, "importance": importance, "scope": scope,
                             "perplexity": ppl, "sparsity": res.overall, "seconds": seconds})
                print(f"{kind} {value} {importance:9s} {scope:5s} perplexity {ppl:8.2f} (sparsity {res.overall:.3f}, "
                      f"{seconds:.1f} s)", flush=True)
    payload = {"environment": environment(args.threads), "config": ready["config"], "dense": dense, "runs": runs}
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    print(f"wrote {save(args.out, payload)}")
    return 0 if all(math.isfinite(r["perplexity"]) for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
