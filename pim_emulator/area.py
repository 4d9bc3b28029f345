"""The paper's area figures for the PIM compute units (P3LLM.md 4.1-4.2), and what follows from them."""

from __future__ import annotations

from dataclasses import dataclass

from .pim_unit import HBM_PIM_FP16, P3_PCU_TEP, PcuSpec


@dataclass(frozen=True)
class PimAreaFigures:
    """Area numbers stated by the paper (28 nm logic figures for PEs, DRAM-die figures for the rest)."""

    fp16_pe_um2: float = HBM_PIM_FP16.pe_area_um2 or 0.0
    p3_pe_um2: float = P3_PCU_TEP.pe_area_um2 or 0.0
    p3_pcu_total_mm2: float = 8.4  # all P3 PCUs of one HBM die
    p3_buffers_mm2: float = 6.2  # their input/output buffers
    p3_die_fraction: float = 0.175  # PCUs + buffers as a share of the HBM die
    hbm_pim_die_fraction: float = 0.164

    @property
    def p3_pe_area_ratio(self) -> float:
        """P3 PE over FP16 PE: the paper's 1.08x."""
        return self.p3_pe_um2 / self.fp16_pe_um2

    @property
    def implied_die_mm2(self) -> float:
        """HBM die area implied by (PCUs + buffers) / die fraction."""
        return (self.p3_pcu_total_mm2 + self.p3_buffers_mm2) / self.p3_die_fraction

    @property
    def implied_hbm_pim_overhead_mm2(self) -> float:
        return self.hbm_pim_die_fraction * self.implied_die_mm2


def macs_per_area_ratio(new: PcuSpec, base: PcuSpec) -> float:
    """Peak MACs per step and PE area, relative: the iso-area throughput argument (4x at 1.08x area)."""
    if new.pe_area_um2 is None or base.pe_area_um2 is None:
        raise ValueError(f"the paper gives no PE area for {new.name if new.pe_area_um2 is None else base.name}")
    throughput = (new.macs_per_step * new.clock_multiplier) / (base.macs_per_step * base.clock_multiplier)
    return throughput / (new.pe_area_um2 / base.pe_area_um2)
