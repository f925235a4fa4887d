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
              "'+ OWL': one fraction per decoder layer (all its Linear layers together, as Yin et al.) from its share of "
              "outlier weights (`scope=\"owl\"`)."), "",
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


GIB = 2**30


def memory_section(payload: dict[str, Any]) -> list[str]:
    """The block-by-block memory section, from llm_memory.json (see llm_memory.py)."""
    cfg, runs = payload["config"], payload["runs"]
    first = runs[0]
    lines = ["## One-shot sparsity of a 1.1 B-parameter LLaMA in bounded memory (`benchmarks/llm_memory.py`)", "",
             (f"TinyLlama-1.1B's architecture from its config ({first['layers']} layers, {first['params']:,} parameters; "
              "weights drawn here, so this measures memory and time, not quality), "
              f"`ap.sparsify(importance=..., sparsity=0.5, inplace=True)` on every decoder Linear (output layer dense), "
              f"calibration {cfg['samples']} sequences of {cfg['tokens']} tokens, block by block (found and checked "
              "automatically). Each row is a fresh process; 'RSS before' is after the libraries were loaded and warmed "
              "on a one-layer model. **Model's share of the peak** = (peak RSS - RSS before) / model bytes. "
              "'fixed' malloc: `MALLOC_MMAP_THRESHOLD_=65536` (large blocks go back to the system when freed); "
              f"'default': glibc's dynamic threshold. {cfg['threads']} torch threads; wall times depend on the load "
              "(NOTES.md says which rows shared the machine)."), "",
             ("| method | dtype | malloc | model GiB | RSS before GiB | peak RSS GiB | model's share of the peak | "
             "sparsify s | sparsity |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['dtype']} | {r.get('allocator', 'default')} | "
                     f"{r['model_bytes'] / GIB:.2f} | {r['rss_before_model'] / GIB:.2f} | {r['peak_rss'] / GIB:.2f} | "
                     f"**{r['peak_over_model']:.2f}x** | {r['sparsify_s']:.0f} | {r['overall_sparsity']:.3f} |")
    return lines


def pretrained_section(payload: dict[str, Any]) -> list[str]:
    """The pretrained-encoder section, from sparse_pretrained.json (see sparse_pretrained.py)."""
    cfg, summ = payload["config"], payload["summary"]
    seeds = cfg["seeds"]
    dense = summ["dense"]["dense/-"]
    lines = [("## One-shot sparsity on a pretrained transformer: MiniLM-L6 (`benchmarks/sparse_pretrained.py`)"), "",
             (f"{cfg['model']}, {cfg['params']:,} parameters, pretrained (offline). Every Linear of the encoder "
              "sparsified by `ap.sparsify(sparsity= or pattern=, importance=, scope=)`; Wanda, SparseGPT and OWL "
              f"calibrated on the same {cfg['calib_texts']} training texts; no fine-tuning. Docstring retrieval of "
              f"`transformer.py`: {cfg['n_test']} held-out query/document pairs per seed (seeds {seeds}: the split and "
              "the calibration texts). *drift*: mean 1 - cos between the sparse and the dense model's embeddings "
              f"of the {2 * cfg['n_test']} held-out texts (lower is closer). Mean ± std over the seeds; dense recall@1 "
              f"{dense['recall@1_mean']:.4f} ± {dense['recall@1_sd']:.4f}, MRR {dense['mrr_mean']:.4f}."), "",
             "| sparsity | method | scope | drift | recall@1 | MRR |", "|---|---|---|---|---|---|"]
    for setting, rows in summ.items():
        if setting == "dense":
            continue
        label = f"{float(setting):.0%}" if setting.replace(".", "", 1).isdigit() else setting
        best = min(r["drift_mean"] for r in rows.values())
        for name, r in rows.items():
            method, scope = name.split("/")
            drift = f"{r['drift_mean']:.4f} ± {r['drift_sd']:.4f}"
            lines.append(f"| {label} | {method} | {scope} | {'**' + drift + '**' if r['drift_mean'] == best else drift} | "
                         f"{r['recall@1_mean']:.4f} ± {r['recall@1_sd']:.4f} | {r['mrr_mean']:.4f} ± {r['mrr_sd']:.4f} |")
    return lines


def structured_section(payload: dict[str, Any]) -> list[str]:
    """The structured section, from llm_structured.json (see llm_structured.py)."""
    cfg, runs, dense = payload["config"], payload["runs"], payload["dense"]
    lines = [("## Structured pruning of the small LLaMA: held-out perplexity at equal parameter counts "
             "(`benchmarks/llm_structured.py`)"), "",
             (f"The model, data and calibration of the section above (dense test perplexity {dense['perplexity']:.2f}; "
              f"{cfg['params']:,} parameters, {cfg['decoder_params']:,} in the decoder layers). Each column removes that "
              "fraction of the decoder's parameters (every method meets the same total count; heads, KV groups, FFN "
              "neurons and the residual width may go); no fine-tuning after. adaprune rows are "
              "`ap.prune(importance/allocation[/refit])`; Torch-Pruning runs its own LLM recipe (examples/LLMs/"
              f"prune_llm.py settings), its ratio bisected to the count, in a child process given {cfg['tp_timeout']} s"
              + (", with each of the releases " + " and ".join(
                  f"{cfg.get('tp_installed', '?')} (this environment's)" if v == "installed" else v
                  for v in cfg["tp_versions"]) if cfg.get("tp_versions") else "")
              + ". Each cell: test perplexity (parameters kept; Torch-Pruning's `round_to=4` widths may land below the "
              f"count). Removing {cfg['fractions'][-1]:.0%} of the decoder's parameters is "
              f"{cfg['fractions'][-1] * cfg['decoder_params'] / cfg['params']:.1%} of the model's."),
             "", "| method | " + " | ".join(f"{f:.0%} removed" for f in cfg["fractions"]) + " |",
             "|---|" + "---|" * len(cfg["fractions"])]
    names = {"l2/uniform": "adaprune, L2, uniform (magnitude baseline)", "wanda/global": "adaprune, Wanda, global",
             "wanda/global/refit": "adaprune, Wanda, global + refit", "l2/global/refit": "adaprune, L2, global + refit"}
    found = {(r["variant"], r["fraction"]): r for r in runs}
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    notes = []
    for v in variants:
        cells = []
        for f in cfg["fractions"]:
            r = found.get((v, f))
            if r is None:
                cells.append("-")
            elif "failed" in r:
                cells.append("failed")
                notes.append(f"- {v} at {f:.0%}: {r['failed']}" + (f" (in {r['where'][-1]})" if r.get("where") else ""))
            else:
                cells.append(f"{r['perplexity']:.2f} ({r['params'] / 1e6:.3f} M)")
        lines.append(f"| {names.get(v, v)} | " + " | ".join(cells) + " |")
    widths = [f"- {names.get(r['variant'], r['variant'])} at {r['fraction']:.0%}: hidden {r['widths']['hidden']}, "
              f"heads {r['widths']['heads']}, FFN {r['widths']['ffn']} ({r['params']:,} parameters)"
              for r in runs if "widths" in r and r["fraction"] == 0.3]
    return lines + [""] + (["Widths at 30%:", ""] + widths + [""] if widths else []) + notes
