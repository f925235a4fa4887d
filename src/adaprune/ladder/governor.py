"""``ap.Governor``: run the widest rung of a ladder that is expected to meet a deadline, as load changes.

The governor is a drop-in callable: ``governor(x)`` runs the ladder's model at the rung it picks and
returns the output. It keeps, per rung, the latency measured on a quiet machine (``base_ms``, measured
at construction or given), and one number for the machine's current state: the *load factor*, the
``quantile`` (the 90th percentile by default) over its last ``window`` (12) calls of measured latency /
that rung's base latency: an upper quantile rather than the median, so that the calls that ran long
(a busy machine's scheduling delays) count and two slow calls in twelve already raise it, while a
slowdown is forgotten only after about ten quiet calls (quick down, slow up). A rung is expected to
take ``base_ms[k] * load``. (On the benchmark's load trace the 75th percentile of 8 calls missed 6-10%
of the deadlines in the phases with two competing processes, where 90th of 12 missed 2-6%.)

Each call it picks:

- **down at once**: when the current rung is expected to exceed ``headroom * deadline_ms``, the widest
  rung expected within it (the smallest when none is);
- **up slowly** (hysteresis, so it does not flap): one rung wider only after ``patience`` calls in a
  row in which that wider rung was expected within ``up * headroom * deadline_ms`` (``up < 1``: a
  margin below the point where it would switch down again).

The clock is injectable (``clock``, seconds), so the logic is tested with simulated latencies; the
benchmark (``benchmarks/ladder.py``) measures it for real under a replayed load trace.

Backends: ``"torch"`` switches the live model in place (views of one set of weights,
:meth:`Ladder.use`); ``"onnxruntime"`` runs one ONNX Runtime session per rung, exported from
:meth:`Ladder.export` when first needed (each session holds its rung's weights).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._check import as_float, as_int
from ..calls import call_model
from ..errors import ConfigError
from .build import Ladder


@dataclass
class GovernorStats:
    """What a governor did.

    Attributes:
        calls: calls served.
        misses: calls whose measured latency exceeded the deadline.
        switches: rung changes.
        per_rung_calls: calls served per rung.
        per_rung_ms: total measured milliseconds per rung.
        trace: per call ``(rung, measured ms, load factor after it)`` (the last ``keep`` calls).
    """

    calls: int = 0
    misses: int = 0
    switches: int = 0
    per_rung_calls: list[int] = field(default_factory=list)
    per_rung_ms: list[float] = field(default_factory=list)
    trace: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def miss_rate(self) -> float:
        return self.misses / self.calls if self.calls else 0.0


class Governor:
    """Runs the widest rung expected to meet ``deadline_ms`` (see the module doc).

    Args:
        ladder: the ladder whose rungs it chooses between.
        deadline_ms: the latency every call should stay within.
        example_inputs: inputs to measure each rung's quiet latency on (not needed with ``base_ms``).
        backend: ``"torch"`` (in place, one set of weights) or ``"onnxruntime"``.
        base_ms: each rung's latency on a quiet machine, ms (default: measured here, ``repeats`` runs).
        headroom: the fraction of the deadline a rung is expected to use at most (< 1 leaves a margin
            for the noise of one call).
        up: how far below the switch-down point a wider rung must be expected before moving up.
        patience: calls in a row the wider rung must qualify before the governor moves up.
        window: calls the load factor is taken over.
        quantile: which quantile of those calls' measured/quiet ratios is the load factor (0.5: the median).
        clock: a clock in seconds (default ``time.perf_counter``); injectable for tests.
        keep: how many calls ``stats.trace`` keeps.
    """

    def __init__(self, ladder: Ladder, deadline_ms: float, *, example_inputs: Any = None, backend: str = "torch",
                 base_ms: Sequence[float] | None = None, headroom: float = 0.9, up: float = 0.95, patience: int = 5,
                 window: int = 12, quantile: float = 0.9, clock: Callable[[], float] = time.perf_counter,
                 repeats: int = 20,
                 keep: int = 100_000) -> None:
        if not isinstance(ladder, Ladder):
            raise ConfigError(f"Governor: ladder is {type(ladder).__name__}; expected an adaprune.Ladder (ap.ladder)")
        self.ladder = ladder
        self.deadline_ms = as_float(deadline_ms, "deadline_ms", low=0.0, low_open=True, where="Governor")
        self.headroom = as_float(headroom, "headroom", low=0.0, high=1.0, low_open=True, where="Governor")
        self.up = as_float(up, "up", low=0.0, high=1.0, low_open=True, where="Governor")
        self.patience = as_int(patience, "patience", low=1, where="Governor")
        self.window = as_int(window, "window", low=1, where="Governor")
        self.quantile = as_float(quantile, "quantile", low=0.0, high=1.0, where="Governor")
        self.keep = as_int(keep, "keep", low=0, where="Governor")
        if backend not in ("torch", "onnxruntime"):
            raise ConfigError(f"Governor: backend={backend!r}; expected 'torch' or 'onnxruntime'")
        self.backend, self.clock = backend, clock
        self._sessions: dict[int, Any] = {}
        self._example = example_inputs
        n = len(ladder)
        if base_ms is None:
            if example_inputs is None:
                raise ConfigError("Governor: give example_inputs (to measure each rung's latency) or base_ms")
            base_ms = [self._quiet_ms(k, example_inputs, as_int(repeats, "repeats", low=1)) for k in range(n)]
        self.base_ms = [as_float(v, f"base_ms[{i}]", low=0.0, low_open=True, where="Governor")
                        for i, v in enumerate(base_ms)]
        if len(self.base_ms) != n:
            raise ConfigError(f"Governor: base_ms has {len(self.base_ms)} values for a ladder of {n} rungs")
        self.rung = self.widest(1.0)
        self._ratios: deque[float] = deque(maxlen=self.window)
        self._streak = 0
        self.stats = GovernorStats(per_rung_calls=[0] * n, per_rung_ms=[0.0] * n)

    # -- the policy ------------------------------------------------------------------------------
    @property
    def load(self) -> float:
        """The load factor: the ``quantile`` of measured / quiet latency over the last ``window`` calls (1
        before any)."""
        if not self._ratios:
            return 1.0
        ordered = sorted(self._ratios)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(self.quantile * len(ordered)) - 1))]

    def expected_ms(self, k: int) -> float:
        """Rung ``k``'s expected latency under the current load."""
        return self.base_ms[k] * self.load

    def widest(self, load: float) -> int:
        """The widest rung expected within ``headroom * deadline`` at ``load`` (the smallest if none)."""
        limit = self.headroom * self.deadline_ms
        return next((k for k in range(len(self.base_ms)) if self.base_ms[k] * load <= limit), len(self.base_ms) - 1)

    def choose(self) -> int:
        """The rung for the next call (and the hysteresis state updated)."""
        limit = self.headroom * self.deadline_ms
        if self.expected_ms(self.rung) > limit:  # down at once
            self._streak = 0
            return self.widest(self.load)
        if self.rung > 0 and self.expected_ms(self.rung - 1) <= self.up * limit:  # up, slowly
            self._streak += 1
            if self._streak >= self.patience:
                self._streak = 0
                return self.rung - 1
        else:
            self._streak = 0
        return self.rung

    def observe(self, k: int, ms: float) -> None:
        """Record one call of rung ``k`` that took ``ms``."""
        self._ratios.append(ms / self.base_ms[k])
        s = self.stats
        s.calls += 1
        s.misses += ms > self.deadline_ms
        s.per_rung_calls[k] += 1
        s.per_rung_ms[k] += ms
        if self.keep:
            s.trace.append((k, ms, self.load))
            if len(s.trace) > self.keep:
                del s.trace[: len(s.trace) - self.keep]

    # -- running ---------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        k = self.choose()
        if k != self.rung:
            self.stats.switches += 1
            self.rung = k
        t0 = self.clock()
        out = self._run(k, args, kwargs)
        self.observe(k, (self.clock() - t0) * 1000.0)
        return out

    def _run(self, k: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.backend == "torch":
            model = self.ladder.use(k) if self.ladder.current != k else self.ladder.model
            with torch.no_grad():
                return model(*args, **kwargs)
        session = self._session(k)
        names = [i.name for i in session.get_inputs()]
        tensors = list(args) + [kwargs[n] for n in names[len(args):]]
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        outs = session.run(None, feeds)
        return torch.from_numpy(outs[0]) if len(outs) == 1 else [torch.from_numpy(o) for o in outs]

    def _session(self, k: int) -> Any:
        if k not in self._sessions:
            import tempfile
            from pathlib import Path

            import onnxruntime as ort

            from ..onnx_export import export_onnx

            if self._example is None:
                raise ConfigError("Governor(backend='onnxruntime') needs example_inputs to export each rung")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"rung{k}.onnx"
                export_onnx(self.ladder.export(k).eval(), self._example, path)
                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                self._sessions[k] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[k]

    def _quiet_ms(self, k: int, x: Any, repeats: int) -> float:
        """Median latency of rung ``k`` on ``x`` (after two warm-up calls)."""
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            if self.backend == "torch":
                with torch.no_grad():
                    call_model(self.ladder.use(k) if self.ladder.current != k else self.ladder.model, x)
            else:
                args = x if isinstance(x, tuple) else (x,)
                self._run(k, args, {})
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1000.0)
        self.ladder.use(0)
        return statistics.median(times)


__all__ = ["Governor", "GovernorStats"]
