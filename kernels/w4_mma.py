"""W4A8 / W4A16 GEMM for small M (decode and short prompts, M <= 128) on tensor cores: y = Q_act(x) @ W^T + bias.

The weight is the left MMA operand ("swap AB": output features fill the MMA's M dimension, the few tokens its N
dimension, padded to 16), so a GEMV uses the tensor cores instead of one fp32 FMA per weight on CUDA cores.
Each K-step is one quantization group: the packed codes are decoded in registers to fp16 integers (BitMoD grid
x 2 in [-16, 16], or INT4 code - zero point), the MMA accumulates their products with the FP8 activation codes
(exact in fp16) in fp32, and the group scale multiplies that partial sum once per output. The token scale, the
BitMoD 1/2, bias and the output cast are applied once per output at the end. With groups of 64 and 128
(gemm_w4.MMA_VARIANT): W4A8 on FP8 tensor cores by default, the decoded integers and the activation codes as E4M3
(exact; the MMA's adds are of reduced precision, ~1e-4 relative), or opt-in quarter-planes (below); both feed the
weights to the MMA from registers.

Decode (common.decode_halves, shared with the decode attention's K/V): on the GPU common.decode_word16 (inline
PTX, one 32-bit word of 8 codes per invocation); under the interpreter the same values come from decode_w4. Each
word's codes 0..3 go to a "lo" half-plane (k % 8 < 4) and codes 4..7 to a "hi" one (k % 8 >= 4), multiplied
against activations stored in the same order (act_quant.quantize_activation_fp8_halves). In quarter-planes
(common.decode_quarters, act_quant's _QUARTERS) codes 2p and 2p + 1 go to plane p: pairs of consecutive k per
thread, the 16-bit MMA's register operand layout, so sm_90 takes them without a shared-memory relayout.

Split-K: when the output has too few tiles to fill the GPU, programs split the groups and write fp32 partials
that a second kernel sums in a fixed order (deterministic) before the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (cdiv, clamped_rows, decode_halves, decode_quarters, next_power_of_2, pdl_begin, pdl_launch,
                     shared_memory_bytes, sm_count)


@triton.jit
def _group_words(words_ptr, rows, stride_ww, g, GROUP: tl.constexpr):
    """int32 words [rows, GROUP / 8] (8 codes each) of group g of each row."""
    GW: tl.constexpr = GROUP // 8
    ow = tl.arange(0, GW)
    return tl.load(words_ptr + rows[:, None] * stride_ww + g * GW + ow[None, :])


@triton.jit
def _decode_group(words_ptr, rows, stride_ww, g, aux, GROUP: tl.constexpr, IS_BITMOD: tl.constexpr, USE_ASM: tl.constexpr,
                  BF16: tl.constexpr):
    """fp16 [rows, GROUP / 2] half-planes (lo: k % 8 < 4, hi: k % 8 >= 4) of group g of each row; with BF16,
    bf16 from the PTX decode and fp32 from the pure-Triton one (the interpreter has no usable bf16)."""
    return decode_halves(_group_words(words_ptr, rows, stride_ww, g, GROUP), aux, IS_BITMOD, USE_ASM, BF16)


@triton.jit
def _plane_dot(w, x_ptrs, m_mask, part, FP8: tl.constexpr, BF16: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """part + w [BLOCK_N, C] @ x^T for one plane of decoded weights w and activations x [BLOCK_M, C] at x_ptrs, in
    E4M3 (FP8), bf16 (BF16) or fp16."""
    x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
    if FP8:
        w = w.to(tl.float8e4nv)
    if BF16:
        if NATIVE_BF16:
            w = w.to(tl.bfloat16)
        else:  # the interpreter mis-evaluates bf16: exact fp32 products instead
            w, x = w.to(tl.float32), x.to(tl.float32)
    return tl.dot(w, tl.trans(x), part)


@triton.jit
def _w4_mma_kernel(
    x_ptr, xs_ptr, words_ptr, s_ptr, aux_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, stride_xm, stride_ww, stride_sn, stride_an, stride_ym, groups_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
    IS_BITMOD: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, ROW_SCALE: tl.constexpr,
    BF16: tl.constexpr, NATIVE_BF16: tl.constexpr, FP8: tl.constexpr = False, QUARTERS: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """x in half-plane order (x[m, :K/2] = lo plane, x[m, K/2:] = hi plane): W4A8 (ROW_SCALE) FP8 codes with
    token scales xs, held in fp16 (fp16 MMA) or, with FP8, as E4M3 (the decoded weights converted to E4M3 too, exact,
    for FP8 MMA; GROUP >= 64); W4A16 the 16-bit activations themselves (bf16 if BF16, else fp16), xs unused.
    QUARTERS (16-bit MMA, GROUP >= 64): x and the decoded weights in quarter-planes instead (act_quant's _QUARTERS,
    common.decode_quarters). SPLIT_K > 1 writes unscaled fp32 partials part[pid_k, m, n] for _rows_epilogue_kernel."""
    HG: tl.constexpr = GROUP // 2
    pdl_begin(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, n_mask, rows = clamped_rows(pid_n, BLOCK_N, N)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_h = tl.arange(0, HG)
    half = K // 2
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for g in range(g_start, g_end):
        aux = tl.load(aux_ptr + rows * stride_an + g)
        scale = tl.load(s_ptr + rows * stride_sn + g).to(tl.float32)
        if QUARTERS:
            QG: tl.constexpr = GROUP // 4
            q0, q1, q2, q3 = decode_quarters(_group_words(words_ptr, rows, stride_ww, g, GROUP), aux, IS_BITMOD,
                                             USE_ASM, BF16)
            x_q = x_rows + g * QG + tl.arange(0, QG)[None, :]
            part = _plane_dot(q0, x_q, m_mask, None, False, BF16, NATIVE_BF16)
            part = _plane_dot(q1, x_q + K // 4, m_mask, part, False, BF16, NATIVE_BF16)
            part = _plane_dot(q2, x_q + K // 2, m_mask, part, False, BF16, NATIVE_BF16)
            part = _plane_dot(q3, x_q + 3 * (K // 4), m_mask, part, False, BF16, NATIVE_BF16)
        else:
            lo, hi = _decode_group(words_ptr, rows, stride_ww, g, aux, GROUP, IS_BITMOD, USE_ASM, BF16)
            x_h = x_rows + g * HG + offs_h[None, :]
            part = _plane_dot(lo, x_h, m_mask, None, FP8, BF16, NATIVE_BF16)
            part = _plane_dot(hi, x_h + half, m_mask, part, FP8, BF16, NATIVE_BF16)
        acc += part * scale[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if ROW_SCALE:
            acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
        if IS_BITMOD:
            acc = acc * 0.5
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc, mask=out_mask)


@triton.jit
def _rows_epilogue_kernel(part_ptr, xs_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr,
                          BLOCK: tl.constexpr, IS_BITMOD: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr,
                          PDL: tl.constexpr = False):
    """y[m, n] = (sum of part[s, m, n] over s, in split order) * xs[m] (if ROW_SCALE) (* 1/2 for BitMoD) + bias[n],
    cast to y's dtype: the split-K reduction, and (SPLIT_K = 1) the epilogue of the prefill path's fp32 product."""
    pdl_begin(PDL)
    m = tl.program_id(1).to(tl.int64)  # m * N exceeds int32 for long prefills of wide layers
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    total = tl.load(part_ptr + m * N + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if ROW_SCALE:
        total = total * tl.load(xs_ptr + m)
    if IS_BITMOD:
        total = total * 0.5
    if HAS_BIAS:
        total += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs, total.to(y_ptr.dtype.element_ty), mask=mask)


# Launch parameters (BLOCK_N, num_warps, num_stages) and the split-K target: fixed, not autotuned, so a decode
# call costs no autotuner lookup. MMA_OVERRIDE (benchmarks only) replaces them.
MMA_CONFIG = (64, 4, 4)
MMA_OVERRIDE: tuple[int, int, int] | None = None
MMA_PROGRAMS_PER_SM = 4  # split K until the grid has about this many programs per SM
SHARED_RESERVE = 16384  # bytes of shared memory a program needs beside its pipeline stages (layout conversions)


def _sm_count(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 8  # the interpreter: a small "GPU", so tests split K


def fitting_stages(stages: int, block_m: int, block_n: int, group: int, x_bytes: int, device: torch.device) -> int:
    """At most `stages` pipeline stages, as many as fit the GPU's shared memory per program: each holds one group of
    the activations (block_m rows of x_bytes each) and of the packed weight (block_n rows of group / 2 bytes)."""
    if device.type != "cuda":
        return stages
    per_stage = group * (block_m * x_bytes + block_n // 2)
    return max(1, min(stages, (shared_memory_bytes(device) - SHARED_RESERVE) // per_stage))


def w4_mma_matmul(x_halves: torch.Tensor, x_scales: torch.Tensor | None, words: torch.Tensor,
                  scales: torch.Tensor, aux: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, group: int,
                  is_bitmod: bool, use_asm: bool, split_k: int | None = None, quarters: bool = False) -> None:
    """y [M, N] = x @ W^T for M <= 128 (callers validate: gemm_w4.w4_matmul).

    x_halves [M, K] in half-plane order: W4A8 FP8 codes (fp16, or float8_e4m3fn for FP8 tensor cores, groups of
    64 and 128) with x_scales fp32 [M]; W4A16 the bf16 or fp16 activations with x_scales None. words: the packed
    weight as int32 [N, K/8] (8 codes each); split_k=None picks the split from the grid size. With `quarters`, x
    is in quarter-plane order instead (16-bit only; act_quant's "quarters" layouts)."""
    fp8 = x_halves.dtype == torch.float8_e4m3fn
    if (fp8 or quarters) and group < 64:
        raise ValueError(f"w4_mma_matmul: FP8 codes and quarter-planes need groups of 64 or 128 (dots of K >= 32 / 16 "
                         f"per plane), got {group}; pass fp16 half-planes")
    if fp8 and quarters:
        raise ValueError("w4_mma_matmul: FP8 codes come in half-planes only")
    m, k = x_halves.shape
    n = words.shape[0]
    block_n, warps, stages = MMA_OVERRIDE or MMA_CONFIG
    block_m = max(16, next_power_of_2(m))
    stages = fitting_stages(stages, block_m, block_n, group, x_halves.element_size(), y.device)
    n_groups = k // group
    tiles = cdiv(n, block_n)
    if split_k is None:
        split_k = max(1, min(n_groups, 16, (MMA_PROGRAMS_PER_SM * _sm_count(y.device)) // tiles))
    per_split = cdiv(n_groups, split_k)
    split_k = cdiv(n_groups, per_split)  # no empty splits
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=y.device) if split_k > 1 else y
    row_scale = x_scales is not None
    xs_arg = x_scales if row_scale else scales
    bias_arg = bias if bias is not None else xs_arg
    _w4_mma_kernel[(tiles, split_k)](
        x_halves, xs_arg, words, scales, aux, bias_arg, y, part,
        m, n, k, x_halves.stride(0), words.stride(0), scales.stride(0), aux.stride(0), y.stride(0), per_split,
        GROUP=group, BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=split_k, IS_BITMOD=is_bitmod,
        HAS_BIAS=bias is not None, USE_ASM=use_asm, ROW_SCALE=row_scale, BF16=x_halves.dtype == torch.bfloat16,
        NATIVE_BF16=y.is_cuda, FP8=fp8, QUARTERS=quarters, num_warps=warps,
        num_stages=stages, **pdl_launch(y))
    if split_k > 1:
        rows_epilogue(part, x_scales, bias, y, is_bitmod)


EPILOGUE_ROWS_PER_LAUNCH = 65535  # the grid's second dimension holds at most 65535 rows


def rows_epilogue(part: torch.Tensor, x_scales: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor,
                  is_bitmod: bool = False) -> None:
    """y = part.sum(0) (* x_scales[:, None] unless None) (* 1/2 for BitMoD) + bias in one pass; part fp32
    [S, M, N] contiguous, y [M, N] with unit stride along N."""
    if not part.is_contiguous() or part.dtype != torch.float32 or y.stride(-1) != 1:
        raise ValueError("rows_epilogue: part must be a contiguous float32 [S, M, N] tensor and y unit-stride along N")
    split_k, m, n = part.shape
    block = min(1024, next_power_of_2(n))
    for m0 in range(0, m, EPILOGUE_ROWS_PER_LAUNCH):
        rows = min(EPILOGUE_ROWS_PER_LAUNCH, m - m0)
        xs = x_scales[m0:] if x_scales is not None else part
        _rows_epilogue_kernel[(cdiv(n, block), rows)](
            part[:, m0:], xs, bias if bias is not None else xs, y[m0:], m, n, y.stride(0), SPLIT_K=split_k, BLOCK=block,
            IS_BITMOD=is_bitmod, HAS_BIAS=bias is not None, ROW_SCALE=x_scales is not None, num_warps=4, **pdl_launch(y))
