"""Model-zoo sweep: adaprune and Torch-Pruning side by side on every torchvision classification model,
the small Hugging Face architectures of ``benchmarks/hf_models.py`` and the families of
``benchmarks/zoo_models.py`` (torchvision detection/segmentation/video/optical flow, Ultralytics YOLO,
MONAI, a timm sample; models named ``<family>:<name>``).

Each (tool, model, ratio) runs in its own process (``benchmarks/_zoo_worker.py``) under a time limit
and a memory limit. Records go to ``benchmarks/results/zoo.json`` (written after every run, so a
killed sweep resumes where it stopped) and ``docs/zoo.md`` is regenerated from them.

    python benchmarks/zoo.py                                  # everything, resumes
    python benchmarks/zoo.py --only resnet18 hf-bert --force  # re-run some models
    python benchmarks/zoo.py --ratios 0.5 --tools adaprune --timeout 300
    python benchmarks/zoo.py --rerun-failed 'ImportError'     # redo runs that failed this way
    python benchmarks/zoo.py --report-only                    # regenerate docs/zoo.md from the JSON
    python benchmarks/zoo.py --families new                   # only the zoo_models.py families
    python benchmarks/zoo.py --families tv-det,yolo --only yolo:yolov8n

A run PASSES when forward works after pruning, the output shape is unchanged (for the zoo_models.py
families: the whole output tree) and the MACs fell. Classification and HF models run at 0.5 and 0.3
by default, the zoo_models.py families at 0.5 (``--ratios`` sets one list for all).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "_zoo_worker.py")
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "zoo.json")
DEFAULT_DOC = os.path.join(ROOT, "docs", "zoo.md")
TOOLS = ("adaprune", "torch-pruning")
TOOL_TITLE = {"adaprune": "adaprune", "torch-pruning": "Torch-Pruning"}
OLD_FAMILIES = ("hf", "torchvision")
DEFAULT_RATIOS = {"hf": [0.5, 0.3], "torchvision": [0.5, 0.3]}  # every other family: NEW_RATIOS
NEW_RATIOS = [0.5]

_LIST_SNIPPET = r"""
import json, torchvision
from benchmarks.hf_models import specs
out = []
for name in specs():
    out.append([name, "hf", 0.0])
for name in torchvision.models.list_models(module=torchvision.models):
    ws = list(torchvision.models.get_model_weights(name))
    out.append([name, "torchvision", float(ws[0].meta.get("_ops", 0.0)) if ws else 0.0])
from benchmarks.zoo_models import new_model_rows
out += new_model_rows()
print(json.dumps(out))
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [os.path.join(ROOT, "src"), ROOT]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
    )
    return env


def zoo_models() -> Any:
    """benchmarks/zoo_models.py (no heavy imports at its top), importable however this script runs."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import benchmarks.zoo_models as zm

    return zm


def family_rank(fam: str) -> int:
    order = [*OLD_FAMILIES, *zoo_models().FAMILIES]
    return order.index(fam) if fam in order else len(order)


def list_models() -> list[tuple[str, str, float]]:
    """(name, family, GFLOPs at 224 from torchvision's weight metadata; 0 otherwise): HF first, then
    torchvision cheapest first, then the zoo_models.py families in their order."""
    out = subprocess.run([sys.executable, "-c", _LIST_SNIPPET], capture_output=True, text=True, env=child_env(),
                         cwd=ROOT, check=True)
    rows = [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
    return sorted(rows, key=lambda r: (family_rank(r[1]), r[2], r[0]))  # type: ignore[return-value]


def versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "torchvision", "transformers", "torch-pruning", "ultralytics", "monai", "timm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
            mem = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "?"
    return {
        "git_head": head,
        "cpu_count": os.cpu_count(), "cpu": cpu, "memory_gib": mem, "python": platform.python_version(),
        "platform": platform.platform(), "versions": versions(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def key(rec: dict[str, Any]) -> tuple[str, str, float]:
    return (rec["tool"], rec["model"], float(rec["ratio"]))


def load(path: str) -> dict[str, Any]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"machine": {}, "records": []}


def save(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Runner:
    """Launches workers, enforces the time and memory limits, kills children on shutdown."""

    def __init__(self, timeout: float, max_rss_gib: float) -> None:
        self.timeout = timeout
        self.max_rss = int(max_rss_gib * 2**30)
        self.children: set[subprocess.Popen[str]] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def kill_all(self) -> None:
        self.stopping = True
        with self.lock:
            for p in list(self.children):
                self._kill(p)

    @staticmethod
    def _kill(p: subprocess.Popen[str]) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the worker's own session (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self, tool: str, model: str, ratio: float, family: str) -> dict[str, Any] | None:
        cmd = [sys.executable, WORKER, "--tool", tool, "--model", model, "--ratio", str(ratio)]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=child_env(), start_new_session=True)
        with self.lock:
            self.children.add(p)
        out_chunks: list[str] = []
        err_chunks: list[str] = []
        readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
                   for s, c in ((p.stdout, out_chunks), (p.stderr, err_chunks))]
        for r in readers:
            r.start()
        killed, peak = "", 0
        while p.poll() is None:
            peak = max(peak, rss_bytes(p.pid))
            if time.monotonic() - t0 > self.timeout:
                killed = f"timeout after {self.timeout:.0f} s"
            elif peak > self.max_rss:
                killed = f"out of memory (RSS over the {self.max_rss / 2**30:.0f} GiB limit)"
            if killed or self.stopping:
                self._kill(p)
                p.wait()
                break
            time.sleep(0.25)
        for r in readers:
            r.join(timeout=10)
        with self.lock:
            self.children.discard(p)
        wall = time.monotonic() - t0
        if self.stopping and not killed:
            return None  # interrupted: not a result, rerun next time
        stdout, stderr = "".join(out_chunks), "".join(err_chunks)
        rec: dict[str, Any] | None = None
        for line in reversed(stdout.strip().splitlines()):
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                    break
                except json.JSONDecodeError:
                    pass
        if rec is None:
            if killed:
                reason = killed
            elif p.returncode in (-signal.SIGKILL, 137):
                reason = "out of memory (worker killed by SIGKILL, likely the kernel OOM killer)"
            else:
                tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
                reason = f"worker crashed (exit {p.returncode}): {tail[0][:300]}"
            rec = {"tool": tool, "model": model, "ratio": ratio, "family": family, "passed": False,
                   "reason": reason, "stderr_tail": stderr[-2000:]}
        rec["wall_seconds"] = wall
        rec["peak_rss_gib"] = round(peak / 2**30, 2)
        rec["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        return rec


# ----------------------------------------------------------------------------------------------- report

def category(rec: dict[str, Any]) -> str:
    r = rec.get("reason", "")
    if rec.get("passed"):
        return "pass"
    if r.startswith("timeout"):
        return "timeout"
    if r.startswith("out of memory"):
        return "oom"
    if r.startswith("check:"):
        return "check"
    return "error"


def cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "—"
    if rec.get("passed"):
        return f"✓ {rec['macs_ratio']:.2f}"
    return f"✗ {category(rec)}"


def fmt_count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


METHOD = (
    (
        "- Models: every `torchvision.models.list_models(module=torchvision.models)` model (weights=None) "
        "and the small random-weight Hugging Face models of `benchmarks/hf_models.py`; all in eval mode."
    ),
    (
        "- Input 1x3x64x64 for torchvision models that run at 64, 1x3x224x224 for `vit_*`, `swin_*`, "
        "`maxvit_t` (and any model that does not run at 64), 1x3x299x299 for `inception_v3`; HF inputs as "
        "in `hf_models.py`."
    ),
    (
        "- Head kept: the last `nn.Linear` with 1000 outputs (the last 1000-channel `Conv2d` for "
        "SqueezeNet); HF: the spec's head (classifier / LM head)."
    ),
    "- adaprune: `adaprune.prune(model, x, ratio=r, importance='l2', allocation='uniform', ignore=[head])`.",
    (
        "- Torch-Pruning: `tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), "
        "pruning_ratio=r, ignored_layers=[head], round_to=None)` then `pruner.step()`; HF inputs are passed "
        "as the kwargs dict (Torch-Pruning calls `model(**inputs)` for a dict); no `num_heads`, "
        "`unwrapped_parameters`, `output_transform` or custom pruners are given (out-of-the-box behaviour)."
    ),
    (
        "- PASS: forward works after pruning, the output shape is unchanged (the output tensor; `logits` for "
        "HF) and MACs fell. MACs and params are measured with `adaprune.count` for both tools. A cell shows "
        "✓ and MACs after / before, or ✗ and the kind of failure (error, check, timeout, oom); — means not run."
    ),
)


def render(data: dict[str, Any], expected: list[tuple[str, str, float]] | None,
           fam_ratios: dict[str, list[float]], tools: list[str]) -> str:
    """docs/zoo.md; ``fam_ratios``: the ratios each family is meant to run at (for 'Not run')."""
    zm = zoo_models()
    recs = {key(r): r for r in data["records"]}
    m = data.get("machine", {})
    v = m.get("versions", {})
    names_fam: dict[str, str] = {}
    order: list[str] = []
    for name, fam, _ in expected or []:
        names_fam[name] = fam
        order.append(name)
    for r in data["records"]:
        if r["model"] not in names_fam:
            names_fam[r["model"]] = r.get("family", "hf" if r["model"].startswith("hf-") else "torchvision")
            order.append(r["model"])
    new_order = [n for n in order if names_fam[n] not in OLD_FAMILIES]
    order = [n for n in order if names_fam[n] in OLD_FAMILIES]
    old_set, new_set = set(order), set(new_order)
    all_ratios = sorted({*(x for f in OLD_FAMILIES for x in fam_ratios.get(f, [])),
                         *(k[2] for k in recs if k[1] in old_set)}, reverse=True)
    new_ratios = sorted({*(x for f in zm.FAMILIES for x in fam_ratios.get(f, []) if new_order),
                         *(k[2] for k in recs if k[1] in new_set)}, reverse=True)
    all_tools = [t for t in TOOLS if t in tools or any(k[0] == t for k in recs)]

    last = max((r.get("finished", "") for r in data["records"]), default="—")
    src_hashes: dict[str, int] = {}
    for r in data["records"]:
        if r.get("tool") == "adaprune":
            h = r.get("adaprune_src", "unrecorded")
            src_hashes[h] = src_hashes.get(h, 0) + 1
    L = [
        "# Model-zoo sweep: adaprune and Torch-Pruning",
        "",
        (
            "Generated by `benchmarks/zoo.py` from `benchmarks/results/zoo.json`; do not edit by hand "
            "(rerun `python benchmarks/zoo.py --report-only`)."
        ),
        "",
        "## Machine",
        "",
        (
            f"- {m.get('cpu_count')} CPUs ({m.get('cpu', '?')}), {m.get('memory_gib')} GiB RAM, "
            f"Python {m.get('python')}, {m.get('platform', '')}"
        ),
        (
            f"- torch {v.get('torch')}, torchvision {v.get('torchvision')}, "
            f"transformers {v.get('transformers')}, torch-pruning {v.get('torch-pruning')}, "
            f"ultralytics {v.get('ultralytics', '?')}, monai {v.get('monai', '?')}, timm {v.get('timm', '?')}"
        ),
        f"- sweep started {m.get('date')} (git {m.get('git_head', '?')}); last record {last}",
        (
            f"- adaprune sources seen by the runs (hash of src/adaprune/*.py, recorded per run): "
            f"{', '.join(f'{h} ({n} runs)' for h, n in src_hashes.items()) or 'not recorded'}"
        ),
        (
            f"- each run in its own process, 1 torch thread, {m.get('jobs', 1)} run(s) at a time, "
            f"time limit {m.get('timeout', '?')} s, memory limit {m.get('max_rss_gib', '?')} GiB RSS"
        ),
        "",
        "## Method",
        "",
        *METHOD,
        *(zm.METHOD_NEW if new_order else ()),
        "",
        "## Summary",
        "",
    ]

    def tally(tool: str, fam: str, ratio: float) -> tuple[int, int, int]:
        names = [n for n in order if names_fam[n] == fam]
        done = [recs[(tool, n, ratio)] for n in names if (tool, n, ratio) in recs]
        return sum(1 for r in done if r.get("passed")), len(done), len(names)

    for tool in all_tools:
        parts = []
        for fam, title in (("torchvision", "torchvision"), ("hf", "HF")):
            each = []
            for ratio in all_ratios:
                ok, n, total = tally(tool, fam, ratio)
                missing = f" ({total - n} not run)" if n < total else ""
                each.append(f"{ok} of {n} at {ratio:g}{missing}")
            parts.append(f"{title} passed " + " and ".join(each))
        L.append(f"- **{TOOL_TITLE[tool]}**: " + "; ".join(parts) + ".")
    helpers = {"cell": cell, "fmt_count": fmt_count, "md_escape": md_escape, "title": TOOL_TITLE}
    new_summary, new_sections = zm.render_new(recs, new_order, names_fam, all_tools, new_ratios or [0.5], helpers)
    L += new_summary
    L.append("")

    head = ["model", "family", "input", "MACs", "params"]
    for tool in all_tools:
        for ratio in all_ratios:
            head.append(f"{TOOL_TITLE[tool]} {ratio:g}")
    if "adaprune" in all_tools:
        head.append(f"adaprune frozen @{all_ratios[0]:g}" if all_ratios else "adaprune frozen")
    L += ["## Per model", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(order, key=lambda n: (names_fam[n] != "torchvision", n)):
        any_rec = next((recs[k] for k in recs if k[1] == name and "macs_before" in recs[k]), None) \
            or next((recs[k] for k in recs if k[1] == name), None)
        if any_rec is None:
            inp = macs = params = "—"
        else:
            i = any_rec.get("input")
            inp = "x".join(map(str, i)) if isinstance(i, list) else (
                ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in i.items()) if isinstance(i, dict) else "?")
            macs, params = fmt_count(any_rec.get("macs_before")), fmt_count(any_rec.get("params_before"))
        row = [name, names_fam[name], inp, macs, params]
        for tool in all_tools:
            for ratio in all_ratios:
                row.append(cell(recs.get((tool, name, ratio))))
        if "adaprune" in all_tools:
            r = recs.get(("adaprune", name, all_ratios[0])) if all_ratios else None
            row.append(str(r["frozen"]) if r and "frozen" in r else "—")
        L.append("| " + " | ".join(md_escape(c) for c in row) + " |")
    L.append("")

    L += ["## Failures", ""]
    for tool in all_tools:
        L += [f"### {TOOL_TITLE[tool]}", ""]
        fails = [recs[(tool, n, r)] for r in all_ratios for n in order
                 if (tool, n, r) in recs and not recs[(tool, n, r)].get("passed")]
        if not fails:
            L += ["None.", ""]
            continue
        for r in fails:
            L.append(f"- `{r['model']}` at {float(r['ratio']):g}: {md_escape(r.get('reason', '?'))}")
        L.append("")

    if "adaprune" in all_tools and all_ratios:
        top = all_ratios[0]
        fro = [recs[("adaprune", n, top)] for n in order
               if ("adaprune", n, top) in recs and recs[("adaprune", n, top)].get("frozen")]
        L += [f"## adaprune: frozen groups at {top:g}", "",
              "Groups adaprune kept whole (count, then the first entries as module / op).", ""]
        if not fro:
            L.append("None.")
        for r in fro:
            first = ", ".join(f"`{md_escape(e[0])}` / {md_escape(e[1])}" for e in r.get("frozen_first", []))
            L.append(f"- `{r['model']}`: {r['frozen']} — {first}")
        L.append("")

    L += new_sections

    if expected is not None:
        not_run: dict[str, list[str]] = {}
        for name, fam, _ops in expected:
            for ratio in fam_ratios.get(fam, []):
                for tool in tools:
                    if (tool, name, ratio) not in recs:
                        not_run.setdefault(name, []).append(f"{TOOL_TITLE[tool]} {ratio:g}")
        if not_run:
            n_missing = sum(len(v) for v in not_run.values())
            L += ["## Not run", "", f"{n_missing} runs ({len(not_run)} models) have no record:", ""]
            L += [f"- `{name}`: {', '.join(what)}" for name, what in not_run.items()]
            L.append("")
    return "\n".join(L)


def write_doc(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    ap.add_argument("--families", metavar="FAM[,FAM...]",
                    help="only these families: torchvision, hf, tv-det, tv-seg, tv-video, tv-flow, yolo, monai, "
                         "timm; 'new' = every family beyond torchvision classification and HF, 'classic' = those two")
    ap.add_argument("--ratios", nargs="+", default=None,
                    help="pruning ratios for every family, run in this order (default: 0.5 0.3 for torchvision "
                         "classification and HF, 0.5 for the other families); accepts 0.5,0.3 too")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    ap.add_argument("--tools", default="adaprune,torch-pruning", help="comma-separated: adaprune,torch-pruning")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--max-rss-gib", type=float, default=12.0, help="kill a worker above this RSS (default 12)")
    ap.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    ap.add_argument("--rerun-failed", metavar="REGEX",
                    help="also rerun failed runs whose reason matches REGEX (e.g. 'ImportError|timeout')")
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--doc", default=DEFAULT_DOC)
    ap.add_argument("--report-only", action="store_true", help="only regenerate the Markdown from the JSON")
    args = ap.parse_args(argv)

    zm = zoo_models()
    all_fams = [*OLD_FAMILIES, *zm.FAMILIES]
    fam_ratios = {f: list(DEFAULT_RATIOS.get(f, NEW_RATIOS)) for f in all_fams}
    if args.ratios is not None:
        ratios: list[float] = []
        for r in args.ratios:
            ratios += [float(x) for x in r.split(",") if x.strip()]
        fam_ratios = {f: list(ratios) for f in all_fams}
    fams: set[str] = set()
    for f in (args.families or ",".join(all_fams)).split(","):
        f = f.strip()
        if f == "new":
            fams |= set(zm.FAMILIES)
        elif f == "classic":
            fams |= set(OLD_FAMILIES)
        elif f in all_fams:
            fams.add(f)
        elif f:
            ap.error(f"unknown family {f!r}; choose from {all_fams + ['new', 'classic']}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {bad}; choose from {list(TOOLS)}")

    data = load(args.json)
    models = list_models()
    if args.only:
        known = {m[0] for m in models}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            ap.error(f"unknown model(s) {unknown}")
        selected = [m for m in models if m[0] in set(args.only)]
    else:
        selected = models
    selected = [m for m in selected if m[1] in fams]

    if args.report_only:
        write_doc(args.doc, render(data, models, fam_ratios, tools))
        print(f"wrote {args.doc}")
        return 0

    if not data.get("machine") or not data["records"]:
        data["machine"] = machine()
    data["machine"].update(versions=versions(), jobs=args.jobs, timeout=args.timeout, max_rss_gib=args.max_rss_gib,
                           cpu_count=os.cpu_count())
    data["machine"].setdefault("date", _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    done = {key(r) for r in data["records"]}
    if args.rerun_failed:
        pattern = re.compile(args.rerun_failed)
        done -= {key(r) for r in data["records"] if not r.get("passed") and pattern.search(r.get("reason", ""))}
    run_order: list[float] = []
    for fam in all_fams:
        run_order += [r for r in fam_ratios[fam] if r not in run_order]
    todo = [(t, n, r, fam) for r in run_order for n, fam, _ in selected for t in tools
            if r in fam_ratios.get(fam, NEW_RATIOS) and (args.force or (t, n, r) not in done)]
    print(f"{len(todo)} runs to do ({len(data['records'])} records in {args.json})", flush=True)

    runner = Runner(args.timeout, args.max_rss_gib)
    lock = threading.Lock()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: stopping workers", flush=True)
        runner.kill_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    counter = {"n": 0}

    def one(item: tuple[str, str, float, str]) -> None:
        if runner.stopping:
            return
        tool, name, ratio, fam = item
        rec = runner.run(tool, name, ratio, fam)
        if rec is None:
            return
        with lock:
            data["records"] = [r for r in data["records"] if key(r) != (tool, name, ratio)] + [rec]
            save(args.json, data)
            write_doc(args.doc, render(data, models, fam_ratios, tools))
            counter["n"] += 1
            status = "PASS" if rec.get("passed") else "FAIL " + rec.get("reason", "")[:160]
            print(f"[{counter['n']}/{len(todo)}] {tool:13s} {name:40s} {ratio:g}  "
                  f"{rec.get('wall_seconds', 0):6.1f}s  {status}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    save(args.json, data)
    write_doc(args.doc, render(data, models, fam_ratios, tools))
    print(f"wrote {args.json} and {args.doc}", flush=True)
    return 130 if runner.stopping else 0


if __name__ == "__main__":
    sys.exit(main())
