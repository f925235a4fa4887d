"""Latency backends are one registry: every registered backend measures, and a new one is one entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.cost.latency import BACKENDS, Backend, measure_latency
from adaprune.errors import ConfigError

X = torch.randn(2, 4)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("name", BACKENDS.names())
def test_every_registered_backend_measures(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    lat = measure_latency(net(), X, backend=name, repeats=3, warmup=1)
    assert lat.backend == name and lat.median_ms > 0 and lat.repeats == 3 and lat.batch_size == 2


class Fixed(Backend):
    """A backend that reports 1 ms per MAC-free pass (a stand-in for a device's own timer)."""

    def timings(self, model, example_inputs, threads, warmup, repeats):
        return [1.0] * repeats


@pytest.fixture
def fixed_backend():
    BACKENDS.register("fixed-test")(Fixed)
    yield "fixed-test"
    BACKENDS._items.pop("fixed-test")


def test_a_registered_backend_is_accepted_everywhere(fixed_backend, tmp_path: Path):
    from adaprune.cli.config import parse_config

    assert measure_latency(net(), X, backend=fixed_backend, repeats=4).median_ms == 1.0
    assert ap.Budget(latency=0.5, backend=fixed_backend).backend == fixed_backend
    cfg = parse_config({"model": {"factory": "torchvision:resnet18"}, "data": {"kind": "digits"},
                        "budget": {"latency": 0.5, "backend": fixed_backend}}, tmp_path)
    assert cfg.budget is not None and cfg.budget.backend == fixed_backend


def test_an_unknown_backend_is_named_with_the_registered_ones(tmp_path: Path):
    from adaprune.cli.config import CliError, parse_config

    with pytest.raises(ConfigError, match="onnxruntime"):
        ap.Budget(latency=0.5, backend="tpu")
    with pytest.raises(ConfigError, match="torch"):
        measure_latency(net(), X, backend="tpu")
    with pytest.raises(CliError, match=r"budget\.backend: unknown backend 'tpu'"):
        parse_config({"model": {"factory": "torchvision:resnet18"}, "data": {"kind": "digits"},
                      "budget": {"latency": 0.5, "backend": "tpu"}}, tmp_path)
