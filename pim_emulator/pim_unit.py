"""PIM compute-unit (PCU) descriptors: throughput shape, clocking, energy and area per MAC.

A PCU sits beside `banks_per_pcu` banks and consumes one column access (DramSpec.column_bits) of
one bank per step.  `pe_count` PEs each do a `macs_per_pe`-way dot product per step, so a step
consumes pe_count * macs_per_pe weight operands; a column holding more operands than that takes
several steps.  The throughput-enhanced PCU (TEP) runs its steps at `clock_multiplier` times the
FP16 unit's rate (one step per tCCD_L / clock_multiplier) and lets one fetched weight slice serve
`inputs_per_fetch` input vectors; the column itself still arrives once per tCCD_L.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PcuSpec:
    """One PIM compute unit type."""

    name: str
    pe_count: int
    macs_per_pe: int  # reduction width of one PE step
    weight_bits: tuple[int, ...]  # weight/KV operand widths this unit accepts
    input_bits: tuple[int, ...]  # broadcast input operand widths it accepts
    inputs_per_fetch: int  # input vectors served by one fetched weight slice (2 with TEP)
    clock_multiplier: int  # step rate relative to one step per tCCD_L (2 with TEP)
    result_bits: int  # width of one read-out result
    banks_per_pcu: int
    mac_energy_pj: float  # energy of one multiply-accumulate of this unit
    pe_area_um2: float | None  # None where the paper gives no figure
    source: str

    def __post_init__(self) -> None:
        if self.inputs_per_fetch > self.clock_multiplier:
            raise ValueError(f"PCU {self.name}: serving {self.inputs_per_fetch} inputs per fetched slice "
                             f"needs a clock multiplier of at least that much")

    @property
    def macs_per_step(self) -> int:
        return self.pe_count * self.macs_per_pe

    @property
    def tep(self) -> bool:
        return self.inputs_per_fetch > 1

    def steps_per_column(self, column_bits: int, weight_bits: int) -> int:
        """PE steps needed to consume one column access of `weight_bits` operands."""
        operands = column_bits // weight_bits
        return -(-operands // self.macs_per_step)

    def check_operands(self, weight_bits: int, input_bits: int) -> None:
        if weight_bits not in self.weight_bits or input_bits not in self.input_bits:
            raise ValueError(f"PCU {self.name} takes weights of {self.weight_bits} bits and inputs of "
                             f"{self.input_bits} bits, not W{weight_bits}A{input_bits}; map this "
                             f"operation to the NPU or pick another PCU")

    def without_tep(self) -> "PcuSpec":
        return replace(self, name=self.name.replace("-tep", ""), inputs_per_fetch=1, clock_multiplier=1)


# Samsung HBM-PIM (Aquabolt-XL) FP16 unit: 16 FP16 lanes, one operand each per column access.
# PE area and energy are the paper's 28 nm figures (P3LLM.md 4.1).
HBM_PIM_FP16 = PcuSpec(
    name="hbm-pim-fp16", pe_count=16, macs_per_pe=1, weight_bits=(16,), input_bits=(16,),
    inputs_per_fetch=1, clock_multiplier=1, result_bits=32, banks_per_pcu=2,
    mac_energy_pj=0.69, pe_area_um2=1023.0, source="P3-LLM paper 4.1 (HBM-PIM FP16 MAC PE)",
)

# P3-LLM PCU: 16 PEs x 4-way dot products of 8-bit x 4-bit operands (6-bit multipliers), 32-bit
# results; 0.18 pJ/MAC, 1109 um^2 per PE (P3LLM.md 4.2).  With TEP: 2x clock, 2 inputs per slice.
P3_PCU_TEP = PcuSpec(
    name="p3-pcu-tep", pe_count=16, macs_per_pe=4, weight_bits=(4,), input_bits=(8,),
    inputs_per_fetch=2, clock_multiplier=2, result_bits=32, banks_per_pcu=2,
    mac_energy_pj=0.18, pe_area_um2=1109.0, source="P3-LLM paper 4.2 (P3 PE, TEP)",
)
P3_PCU = P3_PCU_TEP.without_tep()

# Pimba's State-update Processing Unit, shared by two banks, MX8 arithmetic (8-bit elements, one
# shared 8-bit exponent per 32).  The paper models the original as one 8-bit MAC per lane (16
# lanes) and the enhanced version as two MACs per lane.  Energy per MAC is not given: it is the
# P3 PE's 0.18 pJ scaled by multiplier area ~ width^2 from 6-bit to 8-bit multipliers:
# 0.18 * (8/6)^2 = 0.32 pJ.
PIMBA_MAC_ENERGY_PJ = 0.18 * (8 / 6) ** 2
PIMBA_SPU = PcuSpec(
    name="pimba-spu", pe_count=16, macs_per_pe=1, weight_bits=(8,), input_bits=(8,),
    inputs_per_fetch=1, clock_multiplier=1, result_bits=32, banks_per_pcu=2,
    mac_energy_pj=PIMBA_MAC_ENERGY_PJ, pe_area_um2=None,
    source="Pimba (arXiv 2507.10178) as described in P3-LLM 4.6; MAC energy scaled from the P3 PE",
)
PIMBA_SPU_ENHANCED = replace(PIMBA_SPU, name="pimba-spu-enhanced", macs_per_pe=2)

PCU_PRESETS: dict[str, PcuSpec] = {p.name: p for p in (HBM_PIM_FP16, P3_PCU, P3_PCU_TEP, PIMBA_SPU,
                                                       PIMBA_SPU_ENHANCED)}
