"""NPU model: systolic arrays + vector units + scratchpad behind the DRAM's external bus.

An operation's time is max(compute, DRAM bytes / external bandwidth) (P3LLM.md 4.5): decode
operands (weights, KV cache) stream from DRAM once; activations live in the scratchpad.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dram import DramSpec


@dataclass(frozen=True)
class NpuSpec:
    """The paper's NPU (4.4): 4 cores of 128x128 systolic array + 128-way vector unit + 16 MB SRAM."""

    cores: int = 4
    array_rows: int = 128
    array_cols: int = 128
    vector_lanes: int = 128
    scratchpad_bytes: int = 16 * 2**20  # per core
    clock_hz: float = 1e9
    # Fraction of peak MACs a decode GEMV/GEMM sustains.  Not stated by the paper; 1.0 is the
    # roofline the paper's "max(compute, bytes / bus width)" describes.  Decode at batch <= 8 is
    # memory-bound for any value above ~0.05, so the results barely depend on it.
    systolic_utilization: float = 1.0

    @property
    def peak_macs_per_cycle(self) -> float:
        return self.cores * self.array_rows * self.array_cols * self.systolic_utilization

    @property
    def vector_ops_per_cycle(self) -> int:
        return self.cores * self.vector_lanes


@dataclass(frozen=True)
class NpuTiming:
    """Time of one NPU operation in memory cycles (the DRAM clock), with its two bounds."""

    cycles: float
    compute_cycles: float
    memory_cycles: float
    dram_bytes: float
    macs: float
    vector_ops: float


def npu_op(dram: DramSpec, npu: NpuSpec, *, macs: float = 0.0, vector_ops: float = 0.0,
           dram_bytes: float = 0.0) -> NpuTiming:
    """Time of an NPU operation doing `macs` array MACs and `vector_ops` lane ops on `dram_bytes`."""
    if min(macs, vector_ops, dram_bytes) < 0:
        raise ValueError("NPU work and traffic must be non-negative")
    npu_cycles = macs / npu.peak_macs_per_cycle + vector_ops / npu.vector_ops_per_cycle
    compute = npu_cycles * dram.clock_hz / npu.clock_hz
    memory = dram_bytes / dram.external_bytes_per_cycle
    return NpuTiming(cycles=max(compute, memory), compute_cycles=compute, memory_cycles=memory,
                     dram_bytes=dram_bytes, macs=macs, vector_ops=vector_ops)
