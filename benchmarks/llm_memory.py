"""Peak memory of one-shot sparsity on a 1.1 B-parameter LLaMA, block by block and in place.

The model: TinyLlama-1.1B's architecture (22 layers, hidden 2048, FFN 5632, 32 heads over 4 KV heads, vocabulary
32,000) built from its config; its weights are drawn here (normal, std 0.02: no download), so the run measures
memory and time, not quality. Each setting runs in a fresh process: the model is built on the meta device and
materialised once in the setting's dtype (no float32 copy on the way to bfloat16), then
``ap.sparsify(importance=..., sparsity=0.5, calibration=..., inplace=True)`` prunes every decoder Linear (the
output layer kept dense) with calibration on ``--samples`` random sequences of ``--tokens`` tokens.

Recorded per setting: the model's bytes (parameters and buffers), the process's resident memory (RSS) before the
model was built (the interpreter, torch and transformers) and after, its peak RSS (``ru_maxrss``) over the whole
run, and the wall time of the ``sparsify`` call. The figure the issue asks for is the model's own share of the
peak: (peak RSS - RSS before the model) / model bytes. "Before the model" is after a one-layer, 64-wide model of
the same class was sparsified the same way, so that the libraries' code and kernels are already loaded.

Each setting runs under two glibc malloc settings: ``fixed`` (``MALLOC_MMAP_THRESHOLD_=65536``: every large block
is mapped on its own and returned to the system when freed) and ``default`` (glibc's dynamic threshold, under which
freed blocks may stay in the process and count in its RSS).

    python benchmarks/llm_memory.py                      # fp32 and bf16, SparseGPT, each in its own process
    python benchmarks/llm_memory.py --layers 2 --out x   # a quick check on 2 layers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ALLOCATORS = {"fixed": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (kilobytes on Linux)


def one(dtype_name: str, method: str, layers: int, samples: int, tokens: int, threads: int) -> dict[str, Any]:
    """One setting, in this process."""
    import torch
    import transformers

    import adaprune as ap

    torch.set_num_threads(threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    shape = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
             "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}
    # the runtime first: a one-layer, 64-wide model of the same class sparsified the same way loads every code
    # path (and kernel) the real run takes, so that the RSS measured next is the interpreter and its libraries
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **shape, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 1})).to(dtype).eval()
    ap.sparsify(small, importance=method, sparsity=0.5, ignore=["lm_head"], inplace=True,
                calibration=[({"input_ids": torch.randint(0, 256, (1, 16))}, None)])
    del small
    before = rss_bytes()
    cfg = transformers.LlamaConfig(**shape, num_hidden_layers=layers)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # a few rows at a time: drawing a bfloat16 tensor goes through a float32 one of its size
                for rows in p.view(-1, p.shape[-1]).split(256):
                    rows.normal_(0.0, 0.02, generator=g)
        model.model.rotary_emb.__init__(cfg)  # its inv_freq buffer was left empty by to_empty
    model.eval()
    build_s = time.perf_counter() - t0
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    after = rss_bytes()
    ids = torch.randint(0, cfg.vocab_size, (samples, tokens), generator=g)
    calibration = [({"input_ids": ids[i:i + 1]}, None) for i in range(samples)]
    t0 = time.perf_counter()
    res = ap.sparsify(model, importance=method, sparsity=0.5, calibration=calibration, ignore=["lm_head"],
                      inplace=True)
    seconds = time.perf_counter() - t0
    peak = peak_bytes()
    return {"dtype": dtype_name, "method": method, "layers": layers, "params": sum(p.numel() for p in model.parameters()),
            "model_bytes": model_bytes, "rss_before_model": before, "rss_with_model": after, "peak_rss": peak,
            "peak_over_model": (peak - before) / model_bytes, "peak_rss_over_model": peak / model_bytes,
            "build_s": build_s, "sparsify_s": seconds, "overall_sparsity": res.overall,
            "layers_pruned": len(res.sparsity), "samples": samples, "tokens": tokens, "threads": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", default=["sparsegpt"], choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama-1.1B has 22)")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--tokens", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocators", nargs="+", default=["fixed", "default"], choices=sorted(ALLOCATORS),
                   help="glibc malloc settings: 'fixed' sets MALLOC_MMAP_THRESHOLD_=65536, so that every large block "
                        "is mapped on its own and goes back to the system when freed; 'default' leaves glibc's "
                        "dynamic threshold, under which freed blocks can stay in the process")
    p.add_argument("--out", default="llm_memory")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "dtype,method": run one setting here, print its JSON
    args = p.parse_args()
    if args.one:
        dtype, method = args.one.split(",")
        print("RESULT " + json.dumps(one(dtype, method, args.layers, args.samples, args.tokens, args.threads)))
        return 0
    from common import environment, save

    payload: dict[str, Any] = {"environment": environment(args.threads), "config": vars(args), "runs": []}
    settings = [(m, d, a) for a in args.allocators for m in args.methods for d in args.dtypes]
    for method, dtype, allocator in settings:
        cmd = [sys.executable, __file__, "--one", f"{dtype},{method}", "--layers", str(args.layers),
               "--samples", str(args.samples), "--tokens", str(args.tokens), "--threads", str(args.threads)]
        env = {k: v for k, v in os.environ.items() if k not in ALLOCATORS["fixed"]} | ALLOCATORS[allocator]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{dtype} {method} ({allocator}) failed ({out.returncode}):\n{out.stderr[-3000:]}")
        rec = json.loads(lines[-1][len("RESULT "):]) | {"allocator": allocator}
        payload["runs"].append(rec)
        print(f"{method} {dtype} ({allocator} malloc): model {rec['model_bytes'] / 2**30:.2f} GiB, RSS before model "
              f"{rec['rss_before_model'] / 2**30:.2f} GiB, peak {rec['peak_rss'] / 2**30:.2f} GiB: model's share "
              f"{rec['peak_over_model']:.3f}x; sparsify {rec['sparsify_s']:.0f} s", flush=True)
        save(args.out, payload)  # (after every setting: a long run keeps what it measured)
    payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    print(f"wrote {save(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
