"""The compression section of docs/benchmarks.md, from benchmarks/results/compression.json (see compression.py)."""

from __future__ import annotations

import math
import statistics
from typing import Any

ORDER = ("dense", "prune", "share4", "share3", "share2", "share1", "int8", "prune+share4", "prune+int8", "prune+share4+int8",
         "compress(share)", "compress")
TITLES = {"mnist1d": "MNIST-1D CNN (width 32)", "digits": "digits CNN (width 32)",
          "resnet18": "torchvision ResNet-18, 224 px (weights as initialised: size and speed)",
          "minilm": "MiniLM-L6 (pretrained), docstring retrieval"}
SCORE = {"mnist1d": "test acc. %", "digits": "test acc. %", "resnet18": "logit agreement", "minilm": "test recall@1"}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _pm(values: list[float], scale: float, digits: int) -> str:
    m = _mean(values) * scale
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale / len(values) ** 0.5:.{digits}f}"


def _ms(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"  # NaN: not measured


def _bytes(v: float) -> str:
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB"


def model_table(model: str, rows: list[dict[str, Any]], setup: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, float]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["row"], []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    scale, digits = (100.0, 2) if "acc" in SCORE[model] else (1.0, 3)
    dense_file = rows[0]["disk_bytes"] / rows[0]["ratio"]
    lines = [f"### {TITLES.get(model, model)}", "",
             (f"Seeds {seeds}; disk budget of the adaptive rows {setup['budget']} of the float32 file "
              f"({_bytes(dense_file)}), tolerance {setup['tolerance']} on the task's validation metric, "
              f"{setup['finetune_steps']} recovery steps per step"
              + (f"; hybrid options {setup['compress_options']}" if setup.get("compress_options") else "")
              + ". Mean ± standard error over seeds."), "",
             f"| method | {SCORE[model]} | disk | x smaller | MACs | params | torch ms | ORT ms | method s | steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, dict[str, float]] = {}
    for name in ORDER:
        rs = by.get(name)
        if not rs:
            continue
        score = [r["score"] for r in rs]
        summary[name] = {"score": _mean(score), "disk": _mean([r["disk_bytes"] for r in rs]),
                         "x": _mean([r["x_smaller"] for r in rs]), "seconds": _mean([r["seconds"] for r in rs]),
                         "torch": _mean([r["torch_ms"] for r in rs if r["torch_ms"] is not None] or [float("nan")]),
                         "ort": _mean([r["ort_ms"] for r in rs if r["ort_ms"] is not None] or [float("nan")]),
                         "macs": _mean([r["macs"] for r in rs])}
        met = [r.get("budget_met") for r in rs if "budget_met" in r]
        label = name + (f" (budget met {sum(bool(m) for m in met)}/{len(met)})" if met else "")
        steps = sorted({r["steps"] for r in rs})
        lines.append(
            f"| {label} | {_pm(score, scale, digits)} | {_bytes(summary[name]['disk'])} | {summary[name]['x']:.1f} | "
            f"{summary[name]['macs'] / 1e6:.2f} M | {_mean([r['params'] for r in rs]) / 1e3:.1f} k | "
            f"{_ms(summary[name]['torch'])} | {_ms(summary[name]['ort'])} | {summary[name]['seconds']:.1f} | "
            f"{'/'.join(map(str, steps))} |")
    return lines, summary


def _score(model: str, v: float) -> str:
    return f"{100 * v:.2f}%" if "acc" in SCORE[model] else f"{v:.3f}"


def answers(model: str, s: dict[str, dict[str, float]], limit: float | None = None) -> list[str]:
    """The section's questions, answered from this model's numbers (``limit``: the disk budget in bytes)."""
    if "dense" not in s:
        return []
    d = s["dense"]

    def sc(v: float) -> str:
        return _score(model, v)

    singles = [n for n in ("prune", "share4", "share3", "share2", "share1", "int8") if n in s]
    out = []
    if singles:
        most = max(singles, key=lambda n: s[n]["x"])
        keep = max(singles, key=lambda n: s[n]["score"])
        cost = max(singles, key=lambda n: s[n]["seconds"])
        timed = [n for n in singles if not math.isnan(s[n]["ort"]) and not math.isnan(d["ort"])]
        fast = min(timed, key=lambda n: s[n]["ort"]) if timed else None
        faster = fast is not None and s[fast]["ort"] < 0.95 * d["ort"]  # within 5%: noise on this machine
        speed = ("ONNX Runtime latency was not measured" if fast is None else
                 f"fastest on ONNX Runtime: **{fast}** ({s[fast]['ort']:.3f} ms against dense {d['ort']:.3f} ms)" if faster
                 else f"none runs more than 5% faster than dense on ONNX Runtime ({d['ort']:.3f} ms): sharing and "
                      "int8 weights shrink storage, not the float compute")
        out.append(f"- compresses most of the single methods: **{most}** ({s[most]['x']:.1f}x); keeps the score best: "
                   f"**{keep}** ({sc(s[keep]['score'])} against dense {sc(d['score'])}); costs most to apply: **{cost}** "
                   f"({s[cost]['seconds']:.1f} s); {speed}.")
    if "compress" in s:
        c = s["compress"]
        out.append(f"- the adaptive hybrid: {c['x']:.1f}x smaller, score {sc(c['score'])} (dense {sc(d['score'])}), "
                   f"{c['seconds']:.1f} s, ONNX Runtime {_ms(c['ort'])} ms, {c['macs'] / max(d['macs'], 1):.2f} of the "
                   "dense MACs.")
        if limit:
            fit = [n for n in s if n not in ("dense", "compress") and s[n]["disk"] <= limit]
            over = [n for n in s if n not in ("dense", "compress") and s[n]["disk"] > limit]
            out.append(f"- at the budget ({_bytes(limit)}): "
                       + (", ".join(f"{n} {sc(s[n]['score'])}" for n in fit) + " fit it (mean size)" if fit
                          else "no other row fits it")
                       + f", against the hybrid's {sc(c['score'])}; over it: {', '.join(over) or 'none'}.")
    return out


def compression_section(payload: dict[str, Any]) -> list[str]:
    rows, setups, a = payload["rows"], payload.get("setups", {}), payload["args"]
    lines = [("## Pruning, weight sharing and int8, side by side, and combined (`benchmarks/compression.py`, "
              "`compression.json`)"), "",
             ("Every row starts from the same trained model and gets the same optimizer steps (the hybrid's count "
              "per seed: what its method spent, then fine-tuning of the compressed model up to it). Disk = the "
              "weights file of `ap.save(model, dir, compress=True)` (bit-packed indices and codebooks, int8, "
              "zstandard, the plan inside); x smaller is against the dense model's float32 `model.safetensors`. "
              "Latency: batch 1, one thread; torch runs shared weights as floats (sharing saves storage, not "
              "compute) and int8 rows with torchao's int8 weight-only Linear layers (convolutions stay float); "
              "ONNX Runtime runs the float export, int8 rows its dynamic int8 quantization. `prune+...` rows: adapt "
              f"to {a.get('hand_prune', 0.5)} of the params, then the recipe. See the script's docstring for each row."), ""]
    for model in ("mnist1d", "digits", "resnet18", "minilm"):
        rs = [r for r in rows if r["model"] == model]
        if not rs:
            continue
        setup = setups.get(model, {})
        table, summary = model_table(model, rs, setup)
        dense = [r for r in rs if r["row"] == "dense"]
        limit = setup.get("budget", 0) * _mean([r["disk_bytes"] / r["ratio"] for r in dense]) if dense else None
        lines += table + [""] + answers(model, summary, limit) + [""]
    return lines


README_START, README_END = "<!-- compression-headline:start -->", "<!-- compression-headline:end -->"


def headline(payload: dict[str, Any]) -> str:
    """README's sentence about the compression table, from its numbers (the models with data)."""
    parts = []
    for model in ("mnist1d", "digits", "minilm"):
        rs = [r for r in payload["rows"] if r["model"] == model]
        by = {n: [r for r in rs if r["row"] == n] for n in ("dense", "compress")}
        if not by["dense"] or not by["compress"]:
            continue
        scale = 100.0 if "acc" in SCORE[model] else 1.0
        unit = " points" if scale == 100.0 else ""
        d = _mean([r["score"] for r in by["dense"]]) * scale
        c = _mean([r["score"] for r in by["compress"]]) * scale
        x = _mean([r["x_smaller"] for r in by["compress"]])
        what = SCORE[model].replace(" %", "")
        parts.append(f"{TITLES[model].split(' (')[0].split(',')[0]}: {x:.1f}x smaller on disk, {what} "
                     f"{c:.2f}{'%' if unit else ''} against dense {d:.2f}{'%' if unit else ''} ({c - d:+.2f}{unit}; "
                     f"{len({r['seed'] for r in by['compress']})} seed{'s' if len({r['seed'] for r in by['compress']}) > 1 else ''})")
    return "; ".join(parts)


def write_readme(payload: dict[str, Any], readme: Any) -> bool:
    """Replace README's compression headline block (between the markers) with :func:`headline`."""
    text = readme.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        return False
    head, rest = text.split(README_START)
    block = (f"{README_START}\n<!-- generated by benchmarks/make_doc.py from benchmarks/results/compression.json: "
             f"do not edit -->\nThe adaptive hybrid, measured: {headline(payload)}.\n{README_END}")
    readme.write_text(head + block + rest.split(README_END, 1)[1])
    return True
