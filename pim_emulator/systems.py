"""System definitions: operand bit-widths + the policy mapping each decode operation to NPU or PIM.

Every system is a SystemSpec; `get_system(name, **overrides)` returns a preset, optionally changed
(e.g. get_system("p3-llm", pim_linear_max_batch=8)).  Metadata bits are per stored element:
  * 4-bit group-quantized weights, group 128: FP16 scale + 2-bit BitMoD selector (P3/Ecco) = 18/128,
    or FP16 scale + 4-bit zero point (AWQ) = 20/128;
  * INT4 KV, one group per (token, kv-head) of head_dim = 128: FP16 scale + 4-bit zero = 20/128;
  * INT8 (SmoothQuant) KV, per (token, head) FP16 scale = 16/128; W8 per-channel scales ~ 0;
  * MX8 (Pimba): 8-bit elements with one 8-bit shared exponent per 32 = 8/32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .pim_unit import HBM_PIM_FP16, P3_PCU, P3_PCU_TEP, PIMBA_SPU, PIMBA_SPU_ENHANCED, PcuSpec

NEVER = 0  # pim_linear_max_batch value: linear layers never run on the PIM
ALWAYS = 1 << 30  # ... always run there


@dataclass(frozen=True)
class SystemSpec:
    """One evaluated system: number formats and engine-mapping policy."""

    name: str
    description: str
    weight_bits: int
    weight_meta_bits: float
    act_bits: int  # input activations of the linear layers
    kv_bits: int
    kv_meta_bits: float
    query_bits: int  # query as the input of Q.K^T
    p_bits: int  # attention probabilities as the input of P.V
    pcu: PcuSpec | None  # None: NPU-only system
    pim_linear_max_batch: int  # linear layers on the PIM while batch <= this
    qk_on_pim: bool
    qk_needs_post_rope_keys: bool  # quantized keys: Q.K^T on PIM only for post-RoPE models
    pv_on_pim: bool
    # The timing model treats lm_head like every other nn.Linear (P3LLM.md 5: "all nn.Linear,
    # lm_head included"): same formats, same engine.  False keeps it 16-bit on the NPU, as the
    # accuracy setup stores it (embeddings are always 16-bit).
    lm_head_like_linear: bool = True

    def __post_init__(self) -> None:
        if self.pcu is None and (self.pim_linear_max_batch or self.qk_on_pim or self.pv_on_pim):
            raise ValueError(f"system {self.name} maps work to the PIM but has no PCU")

    def linear_on_pim(self, batch: int) -> bool:
        return self.pcu is not None and batch <= self.pim_linear_max_batch

    def lm_head_format(self, batch: int) -> tuple[int, float, int, bool]:
        """(weight bits, metadata bits, input bits, on PIM) of lm_head at this batch."""
        if self.lm_head_like_linear:
            return self.weight_bits, self.weight_meta_bits, self.act_bits, self.linear_on_pim(batch)
        return 16, 0.0, 16, False

    def qk_runs_on_pim(self, post_rope_keys: bool) -> bool:
        return self.qk_on_pim and (post_rope_keys or not self.qk_needs_post_rope_keys)

    @property
    def weight_storage_bits(self) -> float:
        return self.weight_bits + self.weight_meta_bits

    @property
    def kv_storage_bits(self) -> float:
        return self.kv_bits + self.kv_meta_bits


_BITMOD_META = 18 / 128
_AWQ_META = 20 / 128
_KV4_META = 20 / 128
_KV8_META = 16 / 128
_MX8_META = 8 / 32

_FP16 = dict(weight_bits=16, weight_meta_bits=0.0, act_bits=16, kv_bits=16, kv_meta_bits=0.0, query_bits=16, p_bits=16)
_W4A8KV4 = dict(weight_bits=4, weight_meta_bits=_BITMOD_META, act_bits=8, kv_bits=4, kv_meta_bits=_KV4_META,
                query_bits=8, p_bits=8)
_NPU_ONLY = dict(pcu=None, pim_linear_max_batch=NEVER, qk_on_pim=False, qk_needs_post_rope_keys=False, pv_on_pim=False)

SYSTEM_PRESETS: dict[str, SystemSpec] = {s.name: s for s in (
    SystemSpec("npu-fp16", "NPU only, W16A16KV16", **_FP16, **_NPU_ONLY),
    # HBM-PIM: FP16 everything on PIM at batch 1-2, linear layers on the NPU from batch 4 (4.3).
    SystemSpec("hbm-pim", "NPU + HBM-PIM (FP16 PCU), W16A16KV16", **_FP16, pcu=HBM_PIM_FP16,
               pim_linear_max_batch=2, qk_on_pim=True, qk_needs_post_rope_keys=False, pv_on_pim=True),
    SystemSpec("ecco", "Ecco: W4A8KV4 NPU streaming compressed data, no PIM", **_W4A8KV4, **_NPU_ONLY),
    # Pimba original: FP16 linear layers on the NPU, attention on MX8 KV on the PIM.
    SystemSpec("pimba", "Pimba: FP16 linear on NPU, MX8 KV attention on PIM (1 MAC/lane)",
               weight_bits=16, weight_meta_bits=0.0, act_bits=16, kv_bits=8, kv_meta_bits=_MX8_META,
               query_bits=8, p_bits=8, pcu=PIMBA_SPU, pim_linear_max_batch=NEVER, qk_on_pim=True,
               qk_needs_post_rope_keys=False, pv_on_pim=True),
    # Pimba enhanced: W8A8KV8 with 2 MACs per lane.  Interpretation (documented choice): like the
    # original, Pimba keeps linear layers off the PIM (its SPUs target attention/state updates), so
    # W8A8 linear layers stream from DRAM on the NPU and only KV8 attention runs on the SPUs.
    SystemSpec("pimba-enhanced", "Pimba enhanced: W8A8 linear on NPU, KV8 attention on PIM (2 MACs/lane)",
               weight_bits=8, weight_meta_bits=0.0, act_bits=8, kv_bits=8, kv_meta_bits=_MX8_META,
               query_bits=8, p_bits=8, pcu=PIMBA_SPU_ENHANCED, pim_linear_max_batch=NEVER, qk_on_pim=True,
               qk_needs_post_rope_keys=False, pv_on_pim=True),
    SystemSpec("npu-smoothquant", "NPU with SmoothQuant W8A8KV8", weight_bits=8, weight_meta_bits=0.0,
               act_bits=8, kv_bits=8, kv_meta_bits=_KV8_META, query_bits=8, p_bits=8, **_NPU_ONLY),
    SystemSpec("npu-awq", "NPU with AWQ W4A16KV16", weight_bits=4, weight_meta_bits=_AWQ_META, act_bits=16,
               kv_bits=16, kv_meta_bits=0.0, query_bits=16, p_bits=16, **_NPU_ONLY),
    # P3-LLM: linear on PIM at batch 1-4 (NPU from 8), Q.K^T (post-RoPE models) and P.V on PIM.
    SystemSpec("p3-llm", "P3-LLM: W4A8KV4P8 on the TEP PCU", **_W4A8KV4, pcu=P3_PCU_TEP, pim_linear_max_batch=4,
               qk_on_pim=True, qk_needs_post_rope_keys=True, pv_on_pim=True),
    # Ablation steps: P3-LLM without TEP and/or with 16-bit P (P.V on the NPU).  Linear layers go
    # to whichever engine is faster, the rule behind the paper's HBM-PIM (<= 2) and P3 (<= 4)
    # policies: without TEP every batch row is a separate W4 pass, so from batch 4 the NPU's single
    # W4 stream wins (keeping batch 4 on the PIM would make batch 4 slower than batch 8).
    SystemSpec("pim-w4a8kv4", "ablation: W4A8KV4 on the P3 PCU, no TEP, P16 (P.V on NPU)",
               **{**_W4A8KV4, "p_bits": 16}, pcu=P3_PCU, pim_linear_max_batch=2, qk_on_pim=True,
               qk_needs_post_rope_keys=True, pv_on_pim=False),
    SystemSpec("pim-w4a8kv4-tep", "ablation: + TEP, P16 (P.V on NPU)", **{**_W4A8KV4, "p_bits": 16},
               pcu=P3_PCU_TEP, pim_linear_max_batch=4, qk_on_pim=True, qk_needs_post_rope_keys=True,
               pv_on_pim=False),
)}
ALL_SYSTEMS: tuple[str, ...] = tuple(SYSTEM_PRESETS)


def get_system(name: str, **overrides) -> SystemSpec:
    """A preset by name, with optional field overrides (e.g. pim_linear_max_batch=8)."""
    key = name.lower()
    if key not in SYSTEM_PRESETS:
        raise ValueError(f"unknown system '{name}'; choose one of {', '.join(SYSTEM_PRESETS)}")
    valid = {f.name for f in fields(SystemSpec)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown SystemSpec field(s) {bad}; valid fields: {sorted(valid)}")
    return replace(SYSTEM_PRESETS[key], **overrides) if overrides else SYSTEM_PRESETS[key]
