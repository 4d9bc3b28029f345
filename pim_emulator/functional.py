"""Functional P3 PIM GEMVs on p3quant's packed tensors, bit-exact to the PE model of arith_p3.

Every multiplier output is gathered from `product_table` (the PE's aligned products of each 8-bit
code with each 4-bit integer), and the PE accumulators are summed and overflow-checked by
`accumulate`, so the whole GEMV runs as integer tensor ops with no per-element Python loop.

Where scales are applied (P3LLM.md 1, 2.5: dequantization scales are fused into neighbouring NPU
operations; the PIM only sees codes):
- Linear: one DRAM row holds 16 outputs x 128 reduction elements (8192 bits of 4-bit weights), i.e.
  one weight group per output, so the PIM reads out one integer partial sum per (output, group).
  The NPU then forms y = x_scale * sum_g acc_g * 2^-frac_bits * w_scale_g * unit in float64 and rounds
  once to float32 (unit = 1/2 for BitMoD's grid x 2 integers, 1 for INT4 code - zp).
- Q.K^T: one key token is one group (head_dim elements), so each score is one accumulator:
  q.k = acc * 2^-frac_bits * q_scale * k_scale (k_scale per token).
- P.V: the value scales are already folded into the E4M4 probabilities, so the PIM accumulates over
  all tokens and the NPU multiplies by 2^-frac_bits (and by max S_V, outside this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from p3quant.formats import BitMoDTensor, Int4Tensor, ScaledFp8Tensor
from p3quant.formats.bitmod import code_integers

from .arith_p3 import (
    DOT_WIDTH, WEIGHT_MAX, WEIGHT_MIN, OverflowReport, PeConfig, accumulate, decompose, input_format, lsb_exponent,
    product_table,
)

COLUMN_BITS = 256
OPERAND_BITS = 4
_WIDTH = WEIGHT_MAX - WEIGHT_MIN + 1  # columns of the product table
_CHUNK_ELEMENTS = 1 << 24  # products materialized at once (int64: 128 MiB)
_FP64_EXACT = 1 << 53  # integers float64 holds exactly


@dataclass
class PimStats:
    """What one functional PIM operation did (counts implied by the arithmetic and the PCU shape)."""

    macs: int = 0  # multiply-accumulates (one per product, zero padding excluded)
    column_accesses: int = 0  # 256-bit weight/KV slices fetched (TEP: one per pair of inputs)
    readouts: int = 0  # accumulators read out to the NPU
    overflow: OverflowReport = field(default_factory=OverflowReport)

    def merge(self, other: "PimStats") -> None:
        self.macs += other.macs
        self.column_accesses += other.column_accesses
        self.readouts += other.readouts
        self.overflow.merge(other.overflow)


def _fetches(operands: int, inputs: int, tep: bool) -> int:
    """Column accesses to stream `operands` 4-bit values once per (pair of, with TEP) input vectors."""
    passes = -(-inputs // (2 if tep else 1))
    return -(-operands * OPERAND_BITS // COLUMN_BITS) * passes


def _check_codes(codes: torch.Tensor, fmt_name: str) -> None:
    decompose(codes, input_format(fmt_name))  # raises on NaN codes and non-uint8 input


def weight_integers(w: BitMoDTensor | Int4Tensor, offset: int = 0, dtype: torch.dtype = torch.int32
                    ) -> tuple[torch.Tensor, float]:
    """(integer view + offset [..., K] as `dtype`, the view's unit: 1/2 for BitMoD, 1 for INT4).

    offset = -WEIGHT_MIN turns the view into column indices of the product table. Both nibbles of a
    byte share a group (even group sizes), so one lookup per byte in a [variant x 256, 2] table
    (variant = BitMoD selector or INT4 zero point) decodes two elements.
    """
    if isinstance(w, BitMoDTensor):
        per_code, variant, unit = code_integers().to(torch.int64), w.selectors, 0.5
    elif isinstance(w, Int4Tensor):
        per_code = torch.arange(16)[None, :] - torch.arange(16)[:, None]  # [zp, code] -> code - zp
        variant, unit = w.zeros, 1.0
    else:
        raise TypeError(f"the P3 PIM takes BitMoDTensor or Int4Tensor operands, got {type(w).__name__}")
    if w.group_size % 2:
        raise ValueError(f"group size {w.group_size} must be even (two 4-bit codes per byte)")
    byte = torch.arange(256)
    table = torch.stack((per_code[:, byte & 15], per_code[:, byte >> 4]), -1).reshape(-1, 2) + offset
    packed = w.packed.cpu().numpy().reshape(*w.shape[:-1], -1, w.group_size // 2).astype(np.int32)
    index = packed | (variant.cpu().numpy().astype(np.int32) << 8)[..., None]
    ints = np.take(table.to(dtype).numpy(), index, axis=0)
    return torch.from_numpy(ints).reshape(w.shape), unit


def _gather(table: torch.Tensor, offsets: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """table.flatten()[offsets + cols] (broadcast) via numpy's take, much faster here than torch indexing."""
    index = (offsets.cpu().to(torch.int32) + cols.cpu().to(torch.int32)).numpy()
    return torch.from_numpy(np.take(table.flatten().numpy(), index))


def _activation_bound(rows: torch.Tensor, table: torch.Tensor, group: int) -> torch.Tensor:
    """Upper bound of sum |product| per (row, group) from the input codes alone: [M, 1, G]."""
    worst = table.abs().amax(-1)[rows.long()]
    return worst.view(rows.shape[0], 1, -1, group).sum(-1)


def _products_exact(cfg: PeConfig) -> bool:
    """True when no product loses a bit (frac_bits at or below the FP8 LSB), i.e. products = A_k * w."""
    return cfg.frac_bits_for(input_format("fp8_e4m3")) >= -lsb_exponent(input_format("fp8_e4m3"))


def _linear_exact(rows: torch.Tensor, w: BitMoDTensor | Int4Tensor, table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Accumulators as an integer matmul in float64: exact, since every product is the integer
    A_k * w (A_k = the table's w = 1 column) and every partial sum is below the register bound < 2^53."""
    ints, unit = weight_integers(w, dtype=torch.float64)
    n, k = w.shape
    a = table[:, 1 - WEIGHT_MIN].double()[rows.long()]  # [M, K]
    gs = w.group_size
    acc = torch.einsum("ngs,mgs->mng", ints.view(n, -1, gs), a.view(a.shape[0], -1, gs))
    return acc.to(torch.int64), unit


def _linear_gather(rows: torch.Tensor, w: BitMoDTensor | Int4Tensor, table: torch.Tensor, bound: torch.Tensor,
                   cfg: PeConfig, stats: PimStats) -> tuple[torch.Tensor, float]:
    """Accumulators by gathering every (truncated) product from the table, chunked over outputs."""
    cols, unit = weight_integers(w, -WEIGHT_MIN)
    n, k = w.shape
    m, g = rows.shape[0], k // w.group_size
    row_offsets = rows.int() * _WIDTH
    acc = torch.empty(m, n, g, dtype=torch.int64)
    stats.overflow = OverflowReport()
    step = max(1, _CHUNK_ELEMENTS // k)
    for r in range(m):
        for lo in range(0, n, step):
            products = _gather(table, row_offsets[r], cols[lo:lo + step]).view(1, -1, g, w.group_size)
            part, report = accumulate(products, cfg, bound[r:r + 1])
            acc[r, lo:lo + step] = part[0]
            stats.overflow.merge(report)
    return acc, unit


def linear_accumulators(x: ScaledFp8Tensor, w: BitMoDTensor | Int4Tensor, cfg: PeConfig = PeConfig(),
                        tep: bool = True) -> tuple[torch.Tensor, float, PimStats]:
    """The PIM's read-out for x @ W^T: int64 accumulators [M, N, G] (one per row, output and weight
    group; M = rows of x), the weight view's unit, and the stats."""
    if not isinstance(x, ScaledFp8Tensor) or not isinstance(w, (BitMoDTensor, Int4Tensor)):
        raise TypeError(f"pim_linear takes a ScaledFp8Tensor and a BitMoDTensor/Int4Tensor, "
                        f"got {type(x).__name__} and {type(w).__name__}")
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"pim_linear: x [..., {x.shape[-1]}] does not match weight {tuple(w.shape)}")
    if x.group_size % w.group_size:
        raise ValueError(f"activation groups ({x.group_size}) must be whole multiples of weight groups ({w.group_size})")
    if w.group_size % DOT_WIDTH:
        raise ValueError(f"weight group size {w.group_size} must be a multiple of the PE width {DOT_WIDTH}")
    _check_codes(x.codes, "fp8_e4m3")
    n, k = w.shape
    g = k // w.group_size
    rows = x.codes.reshape(-1, k)
    m = rows.shape[0]
    table = product_table("fp8_e4m3", cfg)
    bound = _activation_bound(rows, table, w.group_size)
    stats = PimStats(macs=m * n * k, column_accesses=_fetches(n * k, m, tep), readouts=m * n * g,
                     overflow=OverflowReport(accumulators=m * n * g))
    if _products_exact(cfg) and int(bound.max()) <= min(cfg.acc_max, _FP64_EXACT):
        acc, unit = _linear_exact(rows, w, table)
    else:
        acc, unit = _linear_gather(rows, w, table, bound, cfg, stats)
    return acc, unit, stats


def pim_linear(x: ScaledFp8Tensor, w: BitMoDTensor | Int4Tensor, cfg: PeConfig = PeConfig(), tep: bool = True
               ) -> tuple[torch.Tensor, PimStats]:
    """y = x @ W^T on the P3 PIM: x FP8-E4M3 [..., K] (per-token scale), W [N, K] BitMoD or INT4.

    Returns float32 [..., N] (the NPU-side epilogue of the module docstring) and the stats.
    """
    acc, unit, stats = linear_accumulators(x, w, cfg, tep)
    m, n, g = acc.shape
    frac = cfg.frac_bits_for(input_format("fp8_e4m3"))
    w_scale = w.scales.double().reshape(1, n, g) * (unit * 2.0**-frac)
    x_scale = x.scales.double().reshape(m, 1, -1).repeat_interleave(x.group_size // w.group_size, dim=-1)
    y = (acc.double() * w_scale * x_scale).sum(-1)
    return y.float().reshape(*x.shape[:-1], n), stats


def _expand_queries(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, Tq, ...] -> [B, H_kv, (H / H_kv) * Tq, ...]: the rows one KV stream serves (GQA)."""
    b, h = t.shape[:2]
    if h % kv_heads:
        raise ValueError(f"{h} query heads cannot share {kv_heads} kv heads evenly")
    return t.reshape(b, kv_heads, -1, *t.shape[3:])


def qk_accumulators(q: ScaledFp8Tensor, keys: Int4Tensor, cfg: PeConfig = PeConfig(), tep: bool = True
                    ) -> tuple[torch.Tensor, PimStats]:
    """The PIM's read-out for Q.K^T: int64 [B, H_kv, (H / H_kv) * Tq, T] accumulators (GQA rows of a
    kv-head together, one per score) for q FP8 [B, H, Tq, D] and keys INT4 [B, H_kv, T, D]."""
    if len(q.shape) != 4 or len(keys.shape) != 4 or q.shape[-1] != keys.shape[-1]:
        raise ValueError(f"pim_qk: query {tuple(q.shape)} and keys {tuple(keys.shape)} must be [B, H, T, D] alike")
    b, h, tq, d = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    if q.group_size != d or keys.group_size != d:
        raise ValueError("pim_qk needs one scale per (token, head) on both operands (group_size = head_dim)")
    if d % DOT_WIDTH:
        raise ValueError(f"head_dim {d} must be a multiple of the PE width {DOT_WIDTH}")
    _check_codes(q.codes, "fp8_e4m3")
    table = product_table("fp8_e4m3", cfg)
    cols, _ = weight_integers(keys, -WEIGHT_MIN)  # [B, Hkv, T, D]
    offsets = _expand_queries(q.codes.int() * _WIDTH, hkv)  # [B, Hkv, R, D]
    products = _gather(table, offsets.unsqueeze(-2), cols.unsqueeze(2))  # [B, Hkv, R, T, D]
    acc, report = accumulate(products, cfg)
    rows = h // hkv * tq
    return acc, PimStats(macs=b * h * tq * t * d, column_accesses=b * hkv * _fetches(t * d, rows, tep),
                         readouts=b * h * tq * t, overflow=report)


def pim_qk(q: ScaledFp8Tensor, keys: Int4Tensor, cfg: PeConfig = PeConfig(), tep: bool = True
           ) -> tuple[torch.Tensor, PimStats]:
    """Scores q.k (real units, before the softmax scaling) for q FP8 [B, H, Tq, D] per (token, head)
    and keys INT4 [B, H_kv, T, D] per (token, kv-head). Returns float32 [B, H, Tq, T] and the stats."""
    acc, stats = qk_accumulators(q, keys, cfg, tep)
    b, h, tq, _ = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    frac = cfg.frac_bits_for(input_format("fp8_e4m3"))
    q_scale = _expand_queries(q.scales.double(), hkv)  # [B, Hkv, R, 1]
    k_scale = keys.scales.double().reshape(b, hkv, 1, t)
    scores = acc.double() * 2.0**-frac * q_scale * k_scale
    return scores.float().reshape(b, h, tq, t), stats


def pv_accumulators(p_codes: torch.Tensor, values: Int4Tensor, cfg: PeConfig = PeConfig(), tep: bool = True
                    ) -> tuple[torch.Tensor, PimStats]:
    """The PIM's read-out for P8 @ (V_code - zp): int64 [B, H_kv, (H / H_kv) * Tq, D] accumulators for
    UE4M4 codes [B, H, Tq, T] and values INT4 [B, H_kv, T, D]. The reduction runs over tokens,
    padded with zero products to a multiple of the PE width."""
    if p_codes.dim() != 4 or len(values.shape) != 4 or p_codes.shape[-1] != values.shape[2]:
        raise ValueError(f"pim_pv: probabilities {tuple(p_codes.shape)} and values {tuple(values.shape)} do not match")
    b, h, tq, t = p_codes.shape
    hkv, d = values.shape[1], values.shape[3]
    _check_codes(p_codes, "ue4m4")
    table = product_table("ue4m4", cfg)
    cols, _ = weight_integers(values, -WEIGHT_MIN)  # [B, Hkv, T, D]
    offsets = _expand_queries(p_codes.int() * _WIDTH, hkv)  # [B, Hkv, R, T]
    products = _gather(table, offsets.unsqueeze(-1), cols.unsqueeze(2))  # [B, Hkv, R, T, D]
    products = products.transpose(-1, -2)
    pad = -t % DOT_WIDTH
    if pad:
        products = torch.nn.functional.pad(products, (0, pad))
    acc, report = accumulate(products, cfg)
    rows = h // hkv * tq
    return acc, PimStats(macs=b * h * tq * t * d, column_accesses=b * hkv * _fetches(t * d, rows, tep),
                         readouts=b * h * tq * d, overflow=report)


def pim_pv(p_codes: torch.Tensor, values: Int4Tensor, cfg: PeConfig = PeConfig(), tep: bool = True
           ) -> tuple[torch.Tensor, PimStats]:
    """P8 @ (V_code - zp) for UE4M4 codes [B, H, Tq, T] and values INT4 [B, H_kv, T, D]: float32
    [B, H, Tq, D] in the centered-code domain (the caller multiplies by max S_V), and the stats."""
    acc, stats = pv_accumulators(p_codes, values, cfg, tep)
    out = acc.double() * 2.0**-cfg.frac_bits_for(input_format("ue4m4"))
    return out.float().reshape(*p_codes.shape[:3], values.shape[3]), stats
