"""An energy estimate from MACs and bytes moved, with documented per-operation energies.

Figures are Horowitz's 45 nm numbers ("Computing's energy problem", ISSCC 2014), the ones most
pruning papers (Han et al., 2016; Yang et al., 2017) use: a 32-bit float multiply 3.7 pJ plus an
add 0.9 pJ per MAC, and 640 pJ per 32-bit word read from DRAM. The estimate charges every MAC and
one DRAM read of every weight byte per inference; activations are assumed to stay on chip. It ranks
models, it is not a measurement: absolute joules on a real device differ.
"""

from __future__ import annotations

from dataclasses import dataclass

PJ_PER_MAC_FP32 = 3.7 + 0.9
PJ_PER_DRAM_WORD = 640.0
BYTES_PER_WORD = 4


@dataclass(frozen=True)
class EnergyModel:
    pj_per_mac: float = PJ_PER_MAC_FP32
    pj_per_dram_word: float = PJ_PER_DRAM_WORD

    def microjoules(self, macs: int, weight_bytes: int) -> float:
        pj = macs * self.pj_per_mac + weight_bytes / BYTES_PER_WORD * self.pj_per_dram_word
        return pj * 1e-6


def energy_uj(macs: int, weight_bytes: int, model: EnergyModel | None = None) -> float:
    """Estimated energy of one inference in microjoules."""
    return (model or EnergyModel()).microjoules(macs, weight_bytes)
