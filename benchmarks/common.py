"""Shared helpers of the benchmarks: environment record, JSON results, timing and memory."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Installed distribution versions (package metadata; modules' ``__version__`` can lag behind)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "torch-pruning", "transformers", "onnxruntime", "onnx", "mnist1d",
                 "scikit-learn", "numpy", "adaprune"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, check=False).stdout.strip()
        return rev + ("+dirty(src)" if dirty else "")
    except OSError:
        return "?"


def environment(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_rev(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": list(os.getloadavg()),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    return path


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)
    sys.stdout.flush()


def bisect_ratio(at: Any, target: float, hi: float, steps: int) -> tuple[Any, float, int]:
    """The least pruning ratio in ``[0, hi]`` (to ``steps`` halvings) whose model ``at(ratio)`` returns with a
    MACs count <= ``target``: ``at`` maps a ratio to ``(model, macs)``. Returns ``(model, ratio, calls of at)``;
    when even ``hi`` does not reach the target, its model and ``hi``."""
    lo = 0.0
    best, found = at(hi)
    tries = 1
    if found > target:
        return best, hi, tries
    for _ in range(steps):
        mid = (lo + hi) / 2
        m, c = at(mid)
        tries += 1
        if c <= target:
            hi, best = mid, m
        else:
            lo = mid
    return best, hi, tries

