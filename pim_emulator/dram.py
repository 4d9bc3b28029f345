"""DRAM device specifications (organisation, timing, access energy) for the PIM emulator.

Timing values are in memory-clock cycles of `clock_hz`, the clock that the external bus width
`bus_bits_per_cycle` refers to.  All-bank PIM commands are issued in lock-step to every bank of a
channel, so only per-channel parameters matter; `stacks` multiplies the channel count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DramSpec:
    """One DRAM device as the PIM timing models see it."""

    name: str
    stacks: int  # devices (HBM stacks / LPDDR packages) in the system
    channels: int  # independent (pseudo-)channels per stack
    banks_per_channel: int
    bank_groups: int
    page_bits: int  # row-buffer size of one bank
    column_bits: int  # bits delivered by one column access of one bank
    bus_bits_per_cycle: int  # external data bus of one channel, bits per memory cycle
    clock_hz: float
    tRCD: int
    tRP: int
    tRAS: int
    tRTP: int
    tCCD_L: int
    tCCD_S: int
    access_energy_pj_per_bit: float  # external (off-chip) access energy
    source: str

    def __post_init__(self) -> None:
        for field_name in ("stacks", "channels", "banks_per_channel", "page_bits", "column_bits",
                           "bus_bits_per_cycle", "tCCD_L", "tCCD_S"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"DramSpec {self.name}: {field_name} must be positive")
        if self.page_bits % self.column_bits:
            raise ValueError(f"DramSpec {self.name}: page_bits must be a multiple of column_bits")

    @property
    def total_channels(self) -> int:
        return self.stacks * self.channels

    @property
    def columns_per_row(self) -> int:
        return self.page_bits // self.column_bits

    @property
    def external_bytes_per_cycle(self) -> float:
        """Peak external bandwidth of the whole system, bytes per memory cycle."""
        return self.total_channels * self.bus_bits_per_cycle / 8

    @property
    def external_bandwidth_Bps(self) -> float:
        return self.external_bytes_per_cycle * self.clock_hz

    def cycles_to_s(self, cycles: float) -> float:
        return cycles / self.clock_hz

    def with_stacks(self, stacks: int) -> "DramSpec":
        return replace(self, stacks=stacks)


# The paper's HBM2 (P3LLM.md 4.1/4.4): 16 pseudo-channels, 16 banks in 4 groups, 1 KB page,
# 256-bit column access (64-bit pseudo-channel, burst 4), 128 bits per 1 GHz cycle per channel
# (256 GB/s per stack), tRCD = tRP = 14, tCCD_L = 4, tCCD_S = 2, 650 pJ per 64 bits.
# tRAS and tRTP are not given by the paper: JEDEC JESD235 HBM2 speed bins have tRAS = 33 ns and
# tRTP(L) = 4 ns; at the 1 GHz clock that is 33 and 4 cycles.
HBM2 = DramSpec(
    name="hbm2", stacks=1, channels=16, banks_per_channel=16, bank_groups=4, page_bits=8192,
    column_bits=256, bus_bits_per_cycle=128, clock_hz=1e9, tRCD=14, tRP=14, tRAS=33, tRTP=4,
    tCCD_L=4, tCCD_S=2, access_energy_pj_per_bit=650 / 64,
    source="P3-LLM paper (arXiv 2511.06838) evaluation setup; tRAS/tRTP from JEDEC JESD235 HBM2",
)

# HBM3 (JEDEC JESD238A, 6.4 Gb/s per pin): 16 channels x 2 pseudo-channels of 32 DQ, burst 8 ->
# 256-bit column access, 1 KB page, 16 banks in 4 groups.  Cycles of a 1.6 GHz clock, so the
# pseudo-channel moves 32 pins x 4 bits = 128 bits per cycle (819 GB/s per stack).  Core timings
# of the 6.4 Gb/s bin: tRCD = tRP = 14 ns (23 cycles), tRAS = 33 ns (53), tRTP = 5 ns (8),
# tCCD_L = 2.5 ns (4), tCCD_S = one burst (2).  Access energy: JEDEC does not specify it; the
# paper's HBM2 figure is reused so comparisons across DRAM types isolate timing effects.
HBM3 = DramSpec(
    name="hbm3", stacks=1, channels=32, banks_per_channel=16, bank_groups=4, page_bits=8192,
    column_bits=256, bus_bits_per_cycle=128, clock_hz=1.6e9, tRCD=23, tRP=23, tRAS=53, tRTP=8,
    tCCD_L=4, tCCD_S=2, access_energy_pj_per_bit=650 / 64,
    source="JEDEC JESD238A HBM3 (6.4 Gb/s bin); energy reused from the P3-LLM paper's HBM2",
)

# LPDDR5-6400 (JEDEC JESD209-5B, x16 channel, bank-group mode): 16 banks in 4 groups, 2 KB page,
# BL16 x 16 DQ = 256-bit column access, CK = 800 MHz with 8 data beats per CK -> 128 bits per
# cycle per channel (12.8 GB/s); 4 channels per package (a x64 package, 51.2 GB/s).  Cycle counts
# follow the LPDDR5_6400 timing preset of Ramulator 2 (nRCD 15, nRPpb 15, nRAS 34, nRTP 4,
# nCCD 4 for BL16 within a bank group; 2 across groups).  Energy reused from the paper's HBM2.
LPDDR5 = DramSpec(
    name="lpddr5", stacks=1, channels=4, banks_per_channel=16, bank_groups=4, page_bits=16384,
    column_bits=256, bus_bits_per_cycle=128, clock_hz=0.8e9, tRCD=15, tRP=15, tRAS=34, tRTP=4,
    tCCD_L=4, tCCD_S=2, access_energy_pj_per_bit=650 / 64,
    source="JEDEC JESD209-5B LPDDR5-6400 (Ramulator 2 preset LPDDR5_6400); energy from the paper's HBM2",
)

DRAM_PRESETS: dict[str, DramSpec] = {d.name: d for d in (HBM2, HBM3, LPDDR5)}


def get_dram(name: str) -> DramSpec:
    """Look a DRAM preset up by name (case-insensitive)."""
    key = name.lower()
    if key not in DRAM_PRESETS:
        raise ValueError(f"unknown DRAM '{name}'; choose one of {sorted(DRAM_PRESETS)}")
    return DRAM_PRESETS[key]
