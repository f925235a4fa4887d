"""``ap.Governor``: the widest rung expected to meet the deadline, with hysteresis.

Deterministic tests run a real ladder model under a simulated clock: each forward pass advances the
clock by the rung's quiet latency times the load of a replayed trace (phases of load 1, 3, 1.6, 1).

- under the trace the governor misses the deadline in at most 5% of calls, where the fixed full model
  misses in over 30%, and it serves wider rungs on average than the fixed smallest rung (fails when the
  governor is replaced by a fixed choice: it is compared against both);
- with a load that flickers around a switching point it switches at most twice, where the same policy
  without hysteresis (``up=1``, ``patience=1``) flaps;
- with the real clock, on both backends, it serves outputs equal to the rung's own and its counts add up.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.errors import ConfigError
from adaprune.ladder import GovernorStats
from adaprune.ladder.build import Ladder, Rung
from adaprune.ladder.nested import NestedWidths, order_channels

BASE_MS = [10.0, 6.0, 3.5, 2.0]
TRACE = [1.0] * 30 + [3.0] * 30 + [1.6] * 30 + [1.0] * 30
DEADLINE = 12.0  # headroom 0.9: 10.8 ms, the full model at load 1, rung 1 at 1.6, rung 2 at 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def small_ladder() -> Ladder:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 6)
    graph = ap.trace(model, x, ignore=[model.head])
    order_channels(model, graph, {g.name: torch.rand(g.size) for g in graph.groups})
    nested = NestedWidths(model, graph, [{g.name: w for g in graph.groups} for w in (18, 12, 6)])
    rungs = [Rung(k, None, dict(nested.widths[k]), {}, {}, True, 0.0, True) for k in range(4)]
    return Ladder(nested, rungs, {}, 0, 0)


class SimulatedClock:
    """Seconds that advance only when the ladder's model runs: by the rung's quiet latency times the
    load at that call."""

    def __init__(self, ladder: Ladder, load: Callable[[int], float]) -> None:
        self.t, self.calls, self.load = 0.0, 0, load
        ladder.model.register_forward_hook(self.ran)
        self.ladder = ladder

    def ran(self, module: nn.Module, args: object, out: object) -> None:
        self.t += BASE_MS[self.ladder.current] * self.load(self.calls) / 1000.0
        self.calls += 1

    def __call__(self) -> float:
        return self.t


def replay(policy: str, load: Callable[[int], float], calls: int, **options: float) -> GovernorStats:
    ladder = small_ladder()
    clock = SimulatedClock(ladder, load)
    x = torch.randn(4, 6)
    if policy == "governor":
        gov = ap.Governor(ladder, DEADLINE, base_ms=BASE_MS, clock=clock, **options)
        for _ in range(calls):
            gov(x)
        return gov.stats
    fixed = ap.Governor(ladder, DEADLINE, base_ms=BASE_MS, clock=clock, headroom=1.0)
    k = 0 if policy == "full" else len(BASE_MS) - 1
    for _ in range(calls):  # the same bookkeeping, the rung never chosen
        t0 = clock()
        with torch.no_grad():
            ladder.use(k)(x)
        fixed.observe(k, (clock() - t0) * 1000.0)
    return fixed.stats


def mean_rung(stats: GovernorStats) -> float:
    return sum(k * n for k, n in enumerate(stats.per_rung_calls)) / stats.calls


def test_the_governor_meets_the_deadline_where_the_full_model_does_not() -> None:
    load = TRACE.__getitem__
    governed, full, smallest = (replay(p, load, len(TRACE)) for p in ("governor", "full", "smallest"))
    assert full.miss_rate >= 0.3
    assert governed.miss_rate <= 0.05, governed.trace
    assert smallest.miss_rate == 0.0 and mean_rung(governed) < mean_rung(smallest) - 1.0
    assert governed.calls == len(TRACE) == sum(governed.per_rung_calls)
    assert governed.per_rung_calls[0] >= 45  # the quiet phases run the full model
    rungs = [k for k, _, _ in governed.trace]
    assert rungs[-1] == 0 and rungs[40] == 2  # back to full after the load; under load 3, rung 2 (10.5 ms)


def test_hysteresis_keeps_a_flickering_load_from_flapping() -> None:
    def flicker(i: int) -> float:  # around the point where the full model's expected latency crosses 10.8 ms
        return 1.16 if i % 2 else 1.0

    steady = replay("governor", flicker, 200)
    flapping = replay("governor", flicker, 200, up=1.0, patience=1, window=1)
    assert steady.switches <= 2
    assert flapping.switches >= 20


def test_real_clock_serves_the_rungs_outputs_on_both_backends() -> None:
    pytest.importorskip("onnxruntime")
    x = torch.randn(4, 6)
    for backend in ("torch", "onnxruntime"):
        ladder = small_ladder()
        gov = ap.Governor(ladder, 1000.0, example_inputs=x, backend=backend, repeats=3)
        assert len(gov.base_ms) == 4 and all(v > 0 for v in gov.base_ms)
        out = gov(x)
        expected = ladder.export(gov.rung).eval()(x)
        torch.testing.assert_close(torch.as_tensor(out), expected, rtol=1e-4, atol=1e-5)
        assert gov.stats.calls == 1 and sum(gov.stats.per_rung_calls) == 1 and gov.stats.misses == 0


def test_bad_arguments_are_named() -> None:
    ladder = small_ladder()
    with pytest.raises(ConfigError, match="deadline_ms"):
        ap.Governor(ladder, 0.0, base_ms=BASE_MS)
    with pytest.raises(ConfigError, match="base_ms has 2 values for a ladder of 4 rungs"):
        ap.Governor(ladder, 5.0, base_ms=[1.0, 2.0])
    with pytest.raises(ConfigError, match="example_inputs"):
        ap.Governor(ladder, 5.0)
    with pytest.raises(ConfigError, match="backend"):
        ap.Governor(ladder, 5.0, base_ms=BASE_MS, backend="tvm")
    with pytest.raises(ConfigError, match="expected an adaprune.Ladder"):
        ap.Governor(object(), 5.0, base_ms=BASE_MS)  # type: ignore[arg-type]
