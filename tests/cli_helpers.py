"""Shared by the command-line tests: a trained tiny digits CNN on disk, configs, and the CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from typer.testing import CliRunner

from adaprune.cli import app
from adaprune.examples.digits import DigitsCNN, load_digits_data, train

CLI_MODULE = sys.modules["adaprune.cli.app"]
SRC = str(Path(__file__).resolve().parents[1] / "src")

SLOW_TASK = """
import time
import adaprune as ap


def make(train, val, delay=0.0, evaluate_delay=0.0):
    task = ap.ClassificationTask(train, val)
    finetune, evaluate = task.finetune, task.evaluate

    def slow(model, steps):
        time.sleep(delay)
        finetune(model, steps)

    def slow_evaluate(model):
        time.sleep(evaluate_delay)
        return evaluate(model)

    task.finetune, task.evaluate = slow, slow_evaluate
    return task
"""

LOADERS = """
import torch


def make_loaders(n=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16), torch.utils.data.DataLoader(ds, batch_size=16)
"""


def make_workdir(tmp_path_factory) -> Path:
    """A trained tiny digits CNN, a slowed task, an npz data file and a loaders module."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cli")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_digits_data(0)
    model = DigitsCNN(8)
    train(model, data, epochs=3, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "base.safetensors"))
    (root / "slowtask.py").write_text(SLOW_TASK)
    (root / "loaders.py").write_text(LOADERS)
    np.savez(
        root / "digits.npz",
        x_train=data.x_train.numpy(),
        y_train=data.y_train.numpy(),
        x_val=data.x_val.numpy(),
        y_val=data.y_val.numpy(),
    )
    return root


def config(workdir: Path, name: str, **overrides) -> Path:
    cfg = {
        "model": {
            "factory": "adaprune.examples.digits:DigitsCNN",
            "kwargs": {"width": 8},
            "weights": "base.safetensors",
        },
        "data": {"kind": "digits", "batch_size": 64},
        "budget": {"macs": 0.75},
        "tolerance": 0.05,
        "ignore": ["fc"],
        "run_dir": f"runs/{name}",
        "options": {"finetune_steps": 10, "max_iterations": 6, "step": 0.15},
        "report": {"repeats": 3},
    }
    cfg.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def interrupt_when(command: str, cfg: Path, state: Path, ready: Callable[[dict], bool]) -> tuple[int, str]:
    """Run ``python -m adaprune COMMAND CFG`` in a child process and send it SIGINT once the JSON file
    ``state`` exists and ``ready(its contents)``; returns the child's exit code and stderr."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "adaprune", command, str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if state.exists() and ready(json.loads(state.read_text())):
                break
            assert child.poll() is None, child.communicate()
            time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    return child.returncode, err


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])

