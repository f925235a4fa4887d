"""``make demo``: prune three torchvision models at ratio 0.5 and show what it bought.

Built-in models with random weights (no download): ResNet-18, MobileNetV2, ShuffleNetV2. For each,
the table shows MACs, parameters and measured CPU latency (torch eager, batch 1, median of repeats)
before and after structured pruning, and checks that the pruned model still runs with the same
output shape. The adaptive loop (task metric in the loop) replaces this demo once it exists.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from . import prune


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 15) -> float:
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _models() -> list[tuple[str, nn.Module, nn.Module]]:
    import torchvision

    out = []
    for name in ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"):
        m = torchvision.models.get_model(name, weights=None)
        head = m.fc if hasattr(m, "fc") else m.classifier[-1]
        out.append((name, m, head))
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    torch.manual_seed(0)
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 224, 224)
    console = Console()
    table = Table(title="adaprune.prune(ratio=0.5, importance='l2', allocation='uniform'), classifier kept")
    for col in ("model", "MACs (M)", "params (M)", "latency ms (torch CPU, bs 1)", "speed-up", "prune time"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, model, head in _models():
        original = copy.deepcopy(model).eval()
        base_ms = _latency_ms(original, x)
        t0 = time.perf_counter()
        res = prune(model, x, ratio=0.5, ignore=[head])
        took = time.perf_counter() - t0
        ms = _latency_ms(model, x)
        with torch.no_grad():
            assert model(x).shape == original(x).shape
        table.add_row(
            name,
            f"{res.before.macs / 1e6:,.0f} -> {res.after.macs / 1e6:,.0f}",
            f"{res.before.params / 1e6:.2f} -> {res.after.params / 1e6:.2f}",
            f"{base_ms:.1f} -> {ms:.1f}",
            f"{base_ms / ms:.2f}x",
            f"{took:.2f} s",
        )
    console.print(table)
    console.print(
        "Random-weight models: the figures show structure and speed, not accuracy. "
        "Re-run with `make demo`."
    )


if __name__ == "__main__":
    main()
