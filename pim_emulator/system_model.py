"""One decode step of a Llama-family model on a system: latency, energy, memory, per-op breakdown.

Per decoder layer the step runs: attn_norm, q/k/v_proj, rope, kv_append, qk (Q.K^T), softmax,
pv (P.V), o_proj, residual, mlp_norm, gate/up_proj, act (SiLU x up), down_proj, residual; then the
final norm and lm_head once.  Each operation goes to the NPU or the PIM by the system's policy;
the step time is the plain sum (no NPU/PIM overlap, P3LLM.md 4.5).  All decoder layers are
identical, so one layer is evaluated and multiplied by the layer count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .dram import HBM2, DramSpec
from .energy import EnergyBreakdown, EnergySpec, npu_energy, pim_energy
from .models import ModelShape
from .npu import NpuSpec, npu_op
from .systems import SystemSpec
from .timing import PimTiming, pim_attention, pim_gemv

GemvModel = Callable[..., PimTiming]

# Vector-unit lane operations per element of the NPU-side elementwise work.
RMSNORM_OPS = 4  # square, accumulate, normalise, weight
ROPE_OPS = 3  # two multiplies and an add per rotated element
SOFTMAX_OPS = 5  # max, subtract, exp, sum, divide (incl. P quantization)
SILU_MUL_OPS = 5  # sigmoid (3), x * sigmoid, * up
RESIDUAL_OPS = 1
QUANT_OPS = 4  # per new K/V element: min/max, scale, round, pack


@dataclass(frozen=True)
class Hardware:
    dram: DramSpec = HBM2
    npu: NpuSpec = field(default_factory=NpuSpec)
    energy: EnergySpec = field(default_factory=EnergySpec)


@dataclass(frozen=True)
class OpRecord:
    """One operation of the step, summed over the layers it occurs in."""

    name: str
    engine: str  # "npu" or "pim"
    count: int  # occurrences per step (layers, or 1)
    seconds: float
    energy_j: float
    dram_bytes: float  # over the external bus
    internal_bits: float  # bank-to-PCU reads (PIM only)
    macs: float


@dataclass(frozen=True)
class StepResult:
    model: str
    system: str
    batch: int
    context: int
    dram: str
    latency_s: float
    energy_j: float
    memory_bytes: dict[str, float]
    ops: tuple[OpRecord, ...]

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.latency_s

    @property
    def energy_per_token_j(self) -> float:
        return self.energy_j / self.batch

    def breakdown_s(self) -> dict[str, float]:
        return {o.name: o.seconds for o in self.ops}

    def to_record(self) -> dict:
        return {
            "model": self.model, "system": self.system, "batch": self.batch, "context": self.context,
            "dram": self.dram, "latency_s": self.latency_s, "energy_j": self.energy_j,
            "tokens_per_s": self.tokens_per_s, "energy_per_token_j": self.energy_per_token_j,
            "memory_bytes": dict(self.memory_bytes),
            "breakdown": [{"op": o.name, "engine": o.engine, "count": o.count, "latency_s": o.seconds,
                           "energy_j": o.energy_j, "dram_bytes": o.dram_bytes, "internal_bits": o.internal_bits,
                           "macs": o.macs} for o in self.ops],
        }


def memory_footprint(model: ModelShape, system: SystemSpec, batch: int, context: int) -> dict[str, float]:
    """Bytes resident in DRAM: decoder weights, lm_head, 16-bit embeddings, KV cache."""
    decoder = model.decoder_params * system.weight_storage_bits / 8
    w_bits, meta_bits, _, _ = system.lm_head_format(1)
    head = model.vocab * model.hidden * (w_bits + meta_bits) / 8
    embeddings = model.vocab * model.hidden * 2
    kv = batch * context * model.layers * 2 * model.kv_dim * system.kv_storage_bits / 8
    return {"decoder_weights": decoder, "lm_head": head, "embeddings": embeddings, "kv_cache": kv,
            "total": decoder + head + embeddings + kv}


class _StepBuilder:
    """Accumulates OpRecords for one step."""

    def __init__(self, hw: Hardware, system: SystemSpec, gemv: GemvModel):
        self.hw, self.system, self.gemv = hw, system, gemv
        self.ops: list[OpRecord] = []

    def _add(self, name: str, engine: str, count: int, cycles: float, e: EnergyBreakdown, dram_bytes: float,
             internal_bits: float, macs: float) -> None:
        self.ops.append(OpRecord(name, engine, count, count * self.hw.dram.cycles_to_s(cycles), count * e.total_j,
                                 count * dram_bytes, count * internal_bits, count * macs))

    def npu(self, name: str, count: int, *, macs: float = 0.0, vector_ops: float = 0.0, dram_bytes: float = 0.0,
            mac_pj: float = 0.0) -> None:
        t = npu_op(self.hw.dram, self.hw.npu, macs=macs, vector_ops=vector_ops, dram_bytes=dram_bytes)
        self._add(name, "npu", count, t.cycles, npu_energy(t, self.hw.dram, self.hw.energy, mac_pj), dram_bytes,
                  0.0, macs)

    def pim(self, name: str, count: int, t: PimTiming) -> None:
        """A PIM op.  Scale metadata is not timed: the paper's model (4.5) streams only operand codes
        (scales are fused into neighbouring NPU operations, 2.5)."""
        dram, pcu = self.hw.dram, self.system.pcu
        assert pcu is not None
        self._add(name, "pim", count, t.cycles, pim_energy(t, dram, pcu, self.hw.energy), t.bus_bits / 8,
                  t.internal_bits, t.macs)

    def linear(self, name: str, count: int, cout: int, cin: int, batch: int, weight_bits: int,
               meta_bits: float, on_pim: bool, act_bits: int) -> None:
        if on_pim:
            t = self.gemv(self.hw.dram, self.system.pcu, cout=cout, cin=cin, n_inputs=batch,
                          weight_bits=weight_bits, input_bits=act_bits)
            self.pim(name, count, t)
        else:
            self.npu(name, count, macs=batch * cout * cin, dram_bytes=cout * cin * (weight_bits + meta_bits) / 8,
                     mac_pj=self.hw.energy.npu_mac_pj(weight_bits, act_bits))


def decode_step(model: ModelShape, system: SystemSpec, batch: int, context: int, hw: Hardware | None = None,
                gemv: GemvModel = pim_gemv) -> StepResult:
    """Model one decode step of `batch` sequences with `context` cached tokens each.

    `gemv` is the PIM GEMV timing model: the closed form (default) or command_model.command_gemv.
    """
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1, got batch={batch} context={context}")
    hw = hw or Hardware()
    s, m, L = system, model, model.layers
    b = _StepBuilder(hw, s, gemv)
    lin_pim = s.linear_on_pim(batch)
    h, kvd = m.hidden, m.kv_dim

    b.npu("attn_norm", L, vector_ops=batch * h * RMSNORM_OPS)
    for name, (cout, cin) in m.linear_shapes().items():
        if name == "o_proj":
            _attention(b, m, s, batch, context)
            b.npu("mlp_norm", L, vector_ops=batch * h * RMSNORM_OPS)
        b.linear(name, L, cout, cin, batch, s.weight_bits, s.weight_meta_bits, lin_pim, s.act_bits)
        if name == "v_proj":
            b.npu("rope", L, vector_ops=batch * (m.q_dim + kvd) * ROPE_OPS)
            b.npu("kv_append", L, vector_ops=batch * 2 * kvd * QUANT_OPS,
                  dram_bytes=batch * 2 * kvd * s.kv_storage_bits / 8)
        if name == "up_proj":
            b.npu("act", L, vector_ops=batch * m.intermediate * SILU_MUL_OPS)
    b.npu("residual", L, vector_ops=batch * h * 2 * RESIDUAL_OPS)  # both residual adds of the layer

    b.npu("final_norm", 1, vector_ops=batch * h * RMSNORM_OPS)
    w_bits, meta_bits, a_bits, on_pim = s.lm_head_format(batch)
    b.linear("lm_head", 1, m.vocab, h, batch, w_bits, meta_bits, on_pim, a_bits)

    ops = tuple(b.ops)
    return StepResult(model=m.name, system=s.name, batch=batch, context=context, dram=hw.dram.name,
                      latency_s=sum(o.seconds for o in ops), energy_j=sum(o.energy_j for o in ops),
                      memory_bytes=memory_footprint(m, s, batch, context), ops=ops)


def _attention(b: _StepBuilder, m: ModelShape, s: SystemSpec, batch: int, ctx: int) -> None:
    """Q.K^T, softmax and P.V of one layer."""
    L, units = m.layers, batch * m.kv_heads
    kv_bytes = batch * ctx * m.kv_dim * s.kv_storage_bits / 8  # one of K or V
    macs = batch * m.heads * ctx * m.head_dim
    if s.qk_runs_on_pim(m.post_rope_keys):
        t = pim_attention(b.hw.dram, s.pcu, units=units, cout=ctx, cin=m.head_dim, n_inputs=m.group_size,
                          weight_bits=s.kv_bits, input_bits=s.query_bits, gemv=b.gemv)
        b.pim("qk", L, t)
    else:
        b.npu("qk", L, macs=macs, dram_bytes=kv_bytes, mac_pj=b.hw.energy.npu_mac_pj(s.kv_bits, s.query_bits))
    b.npu("softmax", L, vector_ops=batch * m.heads * ctx * SOFTMAX_OPS)
    if s.pv_on_pim:
        t = pim_attention(b.hw.dram, s.pcu, units=units, cout=m.head_dim, cin=ctx, n_inputs=m.group_size,
                          weight_bits=s.kv_bits, input_bits=s.p_bits, gemv=b.gemv)
        b.pim("pv", L, t)
    else:
        b.npu("pv", L, macs=macs, dram_bytes=kv_bytes, mac_pj=b.hw.energy.npu_mac_pj(s.kv_bits, s.p_bits))
