"""A per-group latency lookup table, calibrated with real measurements as the controller goes.

Each entry is the latency saved per MAC saved in one group (cluster), on the budget's backend. It
starts at the model's average (current latency / current MACs) and, after every measured step,
the entries of the groups that step cut are scaled by measured saving / predicted saving, so
groups whose channels are cheap in MACs but expensive in time (or the reverse) are learnt.

The MACs a group saves are always those of a concrete plan (whole channels): the controller counts
the plan's exact MACs saving on the cut model and splits it over the groups the plan cuts
(``Controller.macs_by_cluster``). The allocator predicts with it and the calibration after a step
uses it for the plan that was applied, so a rate learnt from one step predicts the next consistently.
"""

from __future__ import annotations

from collections.abc import Mapping


class LatencyTable:
    def __init__(self, table: dict[str, float] | None = None) -> None:
        self.table: dict[str, float] = dict(table or {})

    def rate(self, key: str, default: float) -> float:
        return self.table.get(key, default)

    def predict_saving(self, macs_saved: Mapping[str, float], default: float) -> float:
        """Predicted milliseconds saved when each group saves ``macs_saved[group]`` MACs."""
        return sum(self.rate(k, default) * v for k, v in macs_saved.items())

    def calibrate(self, macs_saved: Mapping[str, float], measured_ms: float, default: float) -> None:
        """Scale the entries of the groups in ``macs_saved`` so their prediction matches ``measured_ms``."""
        predicted = self.predict_saving(macs_saved, default)
        if predicted <= 0 or measured_ms <= 0:
            return
        factor = min(4.0, max(0.25, measured_ms / predicted))
        for k in macs_saved:
            self.table[k] = self.rate(k, default) * factor
