"""Energy model: DRAM access energy per bit, MAC energy per PE type, scratchpad (SRAM) energy.

Dynamic energy only (no static/background power), like the paper's model (P3LLM.md 4.5).
Given by the paper: HBM access 650 pJ / 64 bit; PIM MACs 0.69 pJ (FP16 PE), 0.18 pJ (P3 PE).
Every other value is a named field below with the reason it was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dram import DramSpec
from .npu import NpuTiming
from .pim_unit import PcuSpec
from .timing import PimTiming


@dataclass(frozen=True)
class EnergySpec:
    # Energy of a bank-to-PCU access as a fraction of an external access.  Not given by the paper.
    # A PIM access skips the TSVs, the base die and the off-chip PHY, which account for most of an
    # HBM access's energy (O'Connor et al., MICRO 2017, "Fine-Grained DRAM": data movement and
    # I/O dominate, row activation is the smaller part).  0.4 is a calibration inside that range:
    # it is the best compromise for the paper's three energy ratios (docs/pim_emulator.md lists the gaps).
    pim_internal_access_fraction: float = 0.4
    # NPU MAC energies: the paper's PE figures (28 nm), reused so that NPU and PIM MACs are priced
    # alike; 8x8-bit MACs are the P3 PE scaled by multiplier width^2, (8/6)^2 * 0.18 pJ.
    npu_fp16_mac_pj: float = 0.69
    npu_w8a8_mac_pj: float = 0.18 * (8 / 6) ** 2
    npu_w4a8_mac_pj: float = 0.18
    # One vector-unit lane op (softmax/norm/RoPE), priced as one FP16 MAC.
    npu_vector_op_pj: float = 0.69
    # Scratchpad access energy per bit: 20 pJ per 64-bit access of a 32 KB SRAM bank (Horowitz,
    # ISSCC 2014, 45 nm), i.e. the banked 16 MB scratchpad is priced per bank access.
    sram_pj_per_bit: float = 20 / 64
    # Each DRAM-streamed bit is written into the scratchpad once and read out once.
    sram_accesses_per_streamed_bit: int = 2

    def npu_mac_pj(self, weight_bits: int, input_bits: int) -> float:
        """MAC energy of the NPU's array for one operand pair (weights are dequantized to the
        activation format when the activation is 16-bit, as in W4A16 AWQ kernels)."""
        if input_bits >= 16:
            return self.npu_fp16_mac_pj
        if weight_bits <= 4:
            return self.npu_w4a8_mac_pj
        return self.npu_w8a8_mac_pj


@dataclass(frozen=True)
class EnergyBreakdown:
    dram_j: float
    compute_j: float
    sram_j: float

    @property
    def total_j(self) -> float:
        return self.dram_j + self.compute_j + self.sram_j


PJ = 1e-12


def npu_energy(t: NpuTiming, dram: DramSpec, spec: EnergySpec, mac_pj: float) -> EnergyBreakdown:
    bits = t.dram_bytes * 8
    return EnergyBreakdown(
        dram_j=bits * dram.access_energy_pj_per_bit * PJ,
        compute_j=(t.macs * mac_pj + t.vector_ops * spec.npu_vector_op_pj) * PJ,
        sram_j=bits * spec.sram_accesses_per_streamed_bit * spec.sram_pj_per_bit * PJ,
    )


def pim_energy(t: PimTiming, dram: DramSpec, pcu: PcuSpec, spec: EnergySpec) -> EnergyBreakdown:
    internal = t.internal_bits * dram.access_energy_pj_per_bit * spec.pim_internal_access_fraction
    external = t.bus_bits * dram.access_energy_pj_per_bit
    return EnergyBreakdown(dram_j=(internal + external) * PJ, compute_j=t.macs * pcu.mac_energy_pj * PJ,
                           sram_j=0.0)
