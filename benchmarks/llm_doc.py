"""The one-shot sparsity section of docs/benchmarks.md, from benchmarks/results/llm.json (see llm.py)."""

from __future__ import annotations

from typing import Any

LABELS = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
KINDS = {"docstrings": "Python standard-library docstrings",
         "source": "blocks of the Python standard library's source (split at blank lines)"}


def llm_section(payload: dict[str, Any]) -> list[str]:
    cfg, runs, dense = payload["config"], payload["runs"], payload["dense"]
    cells = [("sparsity", v) for v in cfg["sparsities"]] + [("pattern", v) for v in cfg["patterns"]]
    heads = [f"{v:.0%}" if k == "sparsity" else str(v) for k, v in cells]
    lines = ["## One-shot sparsity on a small LLaMA: held-out perplexity (`benchmarks/llm.py`)", "",
             (f"`LlamaForCausalLM` from its config ({cfg['layers']} layers, hidden {cfg['hidden']}, FFN {cfg['ffn']}, "
              f"4 heads over 2 KV heads, {cfg['params']:,} parameters), trained here for {cfg['train_steps']} AdamW steps "
              f"on {cfg['train']} {KINDS[cfg.get('corpus', 'docstrings')]} (BPE tokenizer of {cfg['vocab']} tokens trained "
              f"on them, texts cut at {cfg['seq']} tokens); test perplexity on {cfg['test']} held-out ones "
              f"({int(dense['tokens'])} tokens). Every decoder Linear is sparsified (embedding and output layer dense); "
              f"calibration: {cfg['calib']} training texts, the same for every method. No fine-tuning after. "
              "'+ OWL': per-layer fractions from each layer's outlier weights (`scope=\"owl\"`)."), "",
             f"Dense test perplexity: **{dense['perplexity']:.2f}**.", "",
             "| method | " + " | ".join(heads) + " | seconds (at 50%) |",
             "|---|" + "---|" * (len(heads) + 1)]
    found = {(r["kind"], r["value"], r["importance"], r["scope"]): r for r in runs}
    for importance in cfg["importances"]:
        for scope in ("layer", "owl"):
            row = [found.get((k, v, importance, scope)) for k, v in cells]
            if not any(row):
                continue
            name = LABELS.get(importance, importance) + (" + OWL" if scope == "owl" else "")
            first = found.get(("sparsity", cfg["sparsities"][0], importance, scope)) if cfg["sparsities"] else None
            seconds = f"{first['seconds']:.1f}" if first else "-"
            lines.append(f"| {name} | " + " | ".join("-" if r is None else f"{r['perplexity']:.2f}" for r in row)
                         + f" | {seconds} |")
    return lines


__all__ = ["llm_section"]
