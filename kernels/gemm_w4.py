"""Fused dequant-GEMM y = Q_act(x) @ W^T + bias over packed 4-bit weights (BitMoD or INT4 asymmetric).

Weights stay packed in memory ([N, K/2] uint8, low nibble = even k) and are decoded in registers to small
integers (BitMoD grid x 2 in [-16, 16], or INT4 code - zp); each group's scale multiplies the partial sum of
that group, once per output and group, never per element. Activations are 16-bit (W4A16) or FP8-E4M3 codes
with a per-token scale (W4A8, see act_quant.py); the token scale is applied once per output.

- M == 1 (decode GEMV): CUDA-core reduction; one program per BLOCK_N outputs walks the whole K, so bias and
  the output cast are fused. _w4_gemv_kernel decodes each weight straight to a biased fp32 value with byte
  permutations in inline PTX on the GPU (a pure-Triton decode under the interpreter), against activations in a
  split layout: W4A8's FP8 codes from the activation quantization, W4A16's 16-bit values rearranged by
  act_quant.split_16bit. w4_matmul_shared_input runs up to three weights fed one input (q/k/v, gate/up) as one
  GEMV launch.
- MMA_MIN_M <= M <= MMA_MAX_M (2..128): the tensor-core small-M kernel (w4_mma.py, weights as the left MMA
  operand; W4A8 on FP8 tensor cores where the GPU has them, else in fp16; W4A16 in the activations' 16-bit type;
  exact products, FP8 MMAs add in reduced precision).
- W4A8 at M >= DEQUANT_MIN_M (prefill): with groups of 128 on Hopper, the weight's integer values once to FP8
  (dequant_w4.weight_values_fp8) and cuBLAS's FP8 GEMM with 1x128 block scales on both operands (token scales,
  group scales); otherwise the weight dequantized once to fp16 (dequant_w4.py), cuBLAS with fp32 output, one
  fused epilogue pass.
- W4A16 at M >= DEQUANT_MIN_M (prefill): the weight dequantized once to the activations' 16-bit type (one
  rounding per weight, as Marlin-style W4A16 kernels) and cuBLAS; the tiled kernel below measured 0.10-0.18x bf16
  there (benchmarks/RESULTS.md, twelfth session).
- Otherwise (only where MMA_MAX_M and DEQUANT_MIN_M are set to leave a gap between them): the tiled tensor-core
  kernel (tl.dot) over K-blocks that never straddle a group. W4A8 multiplies FP8 x FP8 (both exact: every BitMoD
  grid value and INT4 code difference is an E4M3 number) on GPUs with FP8 tensor cores; W4A16 multiplies the
  integer weights in the activation dtype.
Accumulation is fp32; results differ from the torch reference by summation order, the FP8 tensor cores'
reduced-precision adds, the prefill paths' one rounding per weight, and, for W4A8, the reference rounding Q_act(x)
to x.dtype before its matmul.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from p3quant.formats import BitMoDTensor, Int4Tensor

from .act_quant import quantize_activation_fp8, quantize_activation_once
from .common import (bitmod_special2, cdiv, clamped_rows, decode_tables, decode_w4, device_capability, dot16,
                     fp8_dot_supported, interpreting, next_power_of_2, nvidia_compiled, on_input_device, pdl_launch,
                     pdl_launch_dependents, pdl_wait, require_device)
from .dequant_w4 import dequantize_w4, weight_values_fp8
from .w4_mma import rows_epilogue, w4_mma_matmul

SUPPORTED_GROUPS = (32, 64, 128)


# The GEMV's inner step, one int32 word of 8 codes (element 8j + i = nibble i) times its 8 activations, in inline
# PTX. Each code becomes the fp32 value f = 40 + v / 2, v its integer weight (BitMoD grid x 2, or INT4 code - zp):
# prmt looks it up in common.decode_tables' byte tables of v + 16, doubled here (bytes 2 (v + 16) in [0, 64]; see
# common.decode_word_ptx for the lookup and its sign-replicate trick), and a second prmt puts the byte under the
# fp32 exponent of 32 (0x42000000): bits 0x42000000 | (2 (v + 16) << 16) are 32 + (v + 16) / 2 exactly (the
# mantissa's unit there is 2**-18). One prmt per weight instead of a subtraction and an fp16 -> fp32 widening.
# The FMAs sit in the same asm block: its one output (not eight decoded values) leaves the block, which keeps
# Triton 3.6 from routing eight tensors through shared memory to change their layout, and halves the registers.
def _biased_dot_ptx() -> str:
    """PTX: $0 = $15 + sum over the 8 codes i of word $1 of f_i * a_i (a_i = $7 + i, fp32), f_i = 40 + v_i / 2
    decoded as described above (tables $2..$5, $6 = 0x42000000); the FMAs in code order."""
    body = """{
.reg .b32 wn, wh, wnh, P, N, R;
.reg .f32 f, s;
xor.b32 wn, $1, 0x88888888;
shr.u32 wh, $1, 16;
shr.u32 wnh, wn, 16;
mov.f32 s, $15;
"""
    for half, (sel, seln) in enumerate((("$1", "wn"), ("wh", "wnh"))):
        body += f"prmt.b32 P, $2, $3, {sel};\nprmt.b32 N, $4, $5, {seln};\nor.b32 R, P, N;\n"
        for i in range(4):
            body += f"prmt.b32 f, R, $6, 0x7{i}54;\nfma.rn.f32 s, f, ${7 + 4 * half + i}, s;\n"
    return body + "mov.f32 $0, s;\n}"


_ASM_BIASED_DOT = tl.constexpr(_biased_dot_ptx())
GEMV_BIAS = tl.constexpr(40.0)  # every decoded GEMV weight is 40 + v / 2


@triton.jit
def _ld(ptr, mask, EVEN: tl.constexpr):
    """Load, masked only when the K loop has a partial last block (masked loads zero-fill their registers)."""
    if EVEN:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _biased(words, i: tl.constexpr, aux, IS_BITMOD: tl.constexpr):
    return GEMV_BIAS + decode_w4((words >> (4 * i)) & 15, aux, IS_BITMOD).to(tl.float32) * 0.5


@triton.jit
def _word_dot(words, aux, a0, a1, a2, a3, a4, a5, a6, a7, init, G: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
              IS_BITMOD: tl.constexpr, USE_ASM: tl.constexpr):
    """init + sum over the 8 codes i of each int32 word [G, R, W] of (40 + v_i / 2) * a_i, in code order (v: BitMoD
    grid x 2, or INT4 code - zp; aux [G, R, 1] = the group's selector / zero point)."""
    shape: tl.constexpr = [G, R, W]
    if USE_ASM:
        tp0, tp1, tn0, tn1 = decode_tables(aux, IS_BITMOD)
        return tl.inline_asm_elementwise(
            _ASM_BIASED_DOT, "=f,r,r,r,r,r,r,f,f,f,f,f,f,f,f,f",
            [words, tl.broadcast_to(tp0 * 2, shape), tl.broadcast_to(tp1 * 2, shape), tl.broadcast_to(tn0 * 2, shape),
             tl.broadcast_to(tn1 * 2, shape), tl.full(shape, 0x42000000, tl.int32), tl.broadcast_to(a0, shape),
             tl.broadcast_to(a1, shape), tl.broadcast_to(a2, shape), tl.broadcast_to(a3, shape), tl.broadcast_to(a4, shape),
             tl.broadcast_to(a5, shape), tl.broadcast_to(a6, shape), tl.broadcast_to(a7, shape),
             tl.broadcast_to(init, shape)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        a = aux
        if IS_BITMOD:
            a = bitmod_special2(aux)
        a = tl.broadcast_to(a, shape)
        part = _biased(words, 0, a, IS_BITMOD) * a0 + init
        part = _biased(words, 1, a, IS_BITMOD) * a1 + part
        part = _biased(words, 2, a, IS_BITMOD) * a2 + part
        part = _biased(words, 3, a, IS_BITMOD) * a3 + part
        part = _biased(words, 4, a, IS_BITMOD) * a4 + part
        part = _biased(words, 5, a, IS_BITMOD) * a5 + part
        part = _biased(words, 6, a, IS_BITMOD) * a6 + part
        part = _biased(words, 7, a, IS_BITMOD) * a7 + part
        return part


@triton.jit
def _gemv_epilogue(out, xs_ptr, b_ptr, y_ptr, m, stride_ym, offs_n, n_mask, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row m's activation scale and the bias applied to one block of GEMV outputs, then the store."""
    if ROW_SCALE:
        out = out * tl.load(xs_ptr + m)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


# _w4_gemv_kernel's argument types before its constexprs, for offline sm_90 compiles (tests, benchmarks/sass_loop.py)
GEMV_ARG_TYPES = ["*fp32", "*fp32", "*i32", "*fp16", "*u8", "*bf16", "*bf16"] + ["i32"] * 7 + ["*i32", "*fp16", "*u8", "*bf16", "*bf16", "i32"] * 2


@triton.jit(do_not_specialize=["N", "N1", "N2"])
def _w4_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, aux_ptr, b_ptr, y_ptr,
    N, K, stride_xm, stride_wn, stride_sn, stride_an, stride_ym,
    w1_ptr, s1_ptr, aux1_ptr, b1_ptr, y1_ptr, N1, w2_ptr, s2_ptr, aux2_ptr, b2_ptr, y2_ptr, N2,
    KW: tl.constexpr, SEGMENTS: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IS_BITMOD: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, EVEN_K: tl.constexpr,
    ROW_SCALE: tl.constexpr = True, PDL: tl.constexpr = False,
):
    """Decode GEMV over int32 words of 8 codes (code i of word j = element 8j + i; stride_wn in words).

    SEGMENTS (1 to 3) weights of one K fed the same activations (q/k/v, gate/up) run in one launch: the
    programs of segment 1 (w1_ptr ... N1 rows) follow those of segment 0 (w_ptr ... N rows), then segment 2's;
    each segment has its own bias and output [1, N_i], and all share the weight strides (the output's row
    stride is segment 0's: a one-row launch never uses it).

    Tile [BLOCK_K / GROUP groups, BLOCK_N rows, GROUP / 8 words]: scale and selector / zero point are loaded
    once per (row, group) and broadcast in registers; the activations of a tile are loaded once per program and
    reused for all its rows. Groups lead the tile so that Triton 3.6 gives the weight loads the layout the
    arithmetic uses (rows first, it staged every prefetched word through shared memory to change layouts).
    x holds the activations as fp32, de-interleaved by k % 8, so the 8 activation vectors are contiguous 16-byte
    loads, and a ninth plane with each word's activation sum: W4A8's FP8 code values
    (act_quant.quantize_activation_fp8_split) with xs the token scale (ROW_SCALE), or W4A16's 16-bit values
    (act_quant.split_16bit; ROW_SCALE false, xs unused).

    Each weight is decoded to the fp32 value f = 40 + v / 2 (v: BitMoD grid x 2 or INT4 code - zp; USE_ASM on
    the GPU by _ASM_BIASED_DOT's two byte permutations, no conversion instruction; the pure-Triton decode under
    the interpreter, where inline asm does not run). Per word, the sum starts at -40 x (x: the word's 8 activations
    summed, exact in fp32, from the activations' ninth plane) and adds the 8 exact products f * a, so it is
    sum(f * a) - 40 sum(a) = sum(v * a) / 2; it is then scaled once by the group scale (x 2 for INT4, whose v is
    not doubled). Accumulation is fp32 throughout. Every product is exact (f has 7 significant bits, an E4M3 code 4,
    a bf16 value 8, an fp16 one 11) and a multiple of the word's finest product unit (half the smallest
    activation's quantum), so an FP8 word's running sum is exact unless its 8 activations differ in magnitude by more
    than ~2**10 (an unbiased sum: ~2**13), a bf16 word's unless by more than ~2**6; beyond that fp32 rounds it, as it
    rounds a word's activation sum (exact for FP8 codes).
    The activation rows fit the tile so that a thread holds all BLOCK_N rows of its words: each activation
    vector is loaded once per thread and reused for every row (block sizes: _gemv_config). The GPU and the
    interpreter paths decode and multiply-add each word in the same order; the sums across words and groups
    follow the compiled layout's reduction tree on the GPU and numpy's order in the interpreter.

    PDL: launched with programmatic dependent launch, the first K-step's weights, scales and selectors are in
    flight while the previous kernel (which produces the activations) still runs.
    """
    GW: tl.constexpr = GROUP // 8
    NG: tl.constexpr = BLOCK_K // GROUP
    pdl_launch_dependents(PDL)
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    if SEGMENTS > 1:
        first = tl.cdiv(N, BLOCK_N)
        if pid_n >= first:
            pid_n -= first
            w_ptr, s_ptr, aux_ptr, b_ptr, y_ptr, N = w1_ptr, s1_ptr, aux1_ptr, b1_ptr, y1_ptr, N1
            if SEGMENTS > 2:
                second = tl.cdiv(N1, BLOCK_N)
                if pid_n >= second:
                    pid_n -= second
                    w_ptr, s_ptr, aux_ptr, b_ptr, y_ptr, N = w2_ptr, s2_ptr, aux2_ptr, b2_ptr, y2_ptr, N2
    offs_n, n_mask, rows = clamped_rows(pid_n, BLOCK_N, N)
    kw = KW  # K // 8 as a compile-time constant: the 8 activation planes sit at immediate offsets
    ng_total = K // GROUP
    og = tl.arange(0, NG)
    ow = tl.arange(0, GW)[None, None, :]
    acc = tl.zeros([NG, BLOCK_N, GW], tl.float32)
    x_row = x_ptr + m * stride_xm
    w_rows = w_ptr + rows[None, :, None] * stride_wn
    s_rows = s_ptr + rows[None, :, None] * stride_sn
    a_rows = aux_ptr + rows[None, :, None] * stride_an
    # software prefetch: the next K-step's weights, scales and selectors / zero points are in flight while this
    # step computes (each program has little work, so its loads would otherwise wait alone on DRAM latency)
    g3 = og[:, None, None]
    g_mask = g3 < ng_total
    nxt_words = _ld(w_rows + g3 * GW + ow, g_mask, EVEN_K)
    nxt_scale = _ld(s_rows + g3, g_mask, EVEN_K)
    nxt_aux = _ld(a_rows + g3, g_mask, EVEN_K)
    pdl_wait(PDL)  # the activations, the token scale and the outputs belong to earlier kernels
    for g0 in range(0, ng_total, NG):
        gi = g0 + g3
        wi = gi * GW + ow  # [NG, 1, GW] word index
        words, scale, aux = nxt_words, nxt_scale.to(tl.float32), nxt_aux.to(tl.int32)
        gn = gi + NG
        pf_mask = gn < ng_total
        nxt_words = tl.load(w_rows + wi + NG * GW, mask=pf_mask, other=0)
        nxt_scale = tl.load(s_rows + gn, mask=pf_mask, other=0.0)
        nxt_aux = tl.load(a_rows + gn, mask=pf_mask, other=0)
        xm = gi < ng_total
        # activations [NG, 1, GW]: loaded once per thread and broadcast over the program's rows in registers
        x3 = x_row + wi
        a0 = _ld(x3, xm, EVEN_K)
        a1 = _ld(x3 + kw, xm, EVEN_K)
        a2 = _ld(x3 + 2 * kw, xm, EVEN_K)
        a3 = _ld(x3 + 3 * kw, xm, EVEN_K)
        a4 = _ld(x3 + 4 * kw, xm, EVEN_K)
        a5 = _ld(x3 + 5 * kw, xm, EVEN_K)
        a6 = _ld(x3 + 6 * kw, xm, EVEN_K)
        a7 = _ld(x3 + 7 * kw, xm, EVEN_K)
        init = _ld(x3 + 8 * kw, xm, EVEN_K) * -GEMV_BIAS  # the words' activation sums (act_quant's ninth plane)
        part = _word_dot(words, aux, a0, a1, a2, a3, a4, a5, a6, a7, init, NG, BLOCK_N, GW, IS_BITMOD, USE_ASM)
        acc += part * scale
    out = tl.sum(tl.sum(acc, axis=2), axis=0)
    if not IS_BITMOD:
        out = out * 2.0
    _gemv_epilogue(out, xs_ptr, b_ptr, y_ptr, m, stride_ym, offs_n, n_mask, ROW_SCALE, HAS_BIAS)


@triton.jit
def _w4_mm_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, aux_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_an, stride_ym, M_BUCKET,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IS_BITMOD: tl.constexpr, A_FP8: tl.constexpr, FP8_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP, GROUP divides K: no K tail
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_b)[None, :], mask=n_mask[:, None], other=0)
        packed = packed.to(tl.int32)
        g = k0 // GROUP
        aux = tl.load(aux_ptr + offs_n * stride_an + g, mask=n_mask, other=0).to(tl.int32)
        if IS_BITMOD:
            aux = bitmod_special2(aux)
        scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        lo = decode_w4(packed & 15, aux[:, None], IS_BITMOD)
        hi = decode_w4(packed >> 4, aux[:, None], IS_BITMOD)
        w = tl.interleave(lo, hi).to(tl.float16)  # [BLOCK_N, BLOCK_K], exact small integers
        if A_FP8:
            if FP8_DOT:
                b = w.to(tl.float8e4nv)
            else:
                a = a.to(tl.float16)
                b = w
        else:
            b = w.to(a.dtype)
        acc += dot16(a, tl.trans(b), NATIVE_BF16) * scale[None, :]
    if IS_BITMOD:
        acc = acc * 0.5
    if A_FP8:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Decode GEMV launch parameters (BLOCK_N, BLOCK_K, num_warps, num_stages): fixed, not autotuned,
# so a call costs no autotuner lookup. Small BLOCK_N keeps >= ~4 programs per SM on 4096-wide outputs (132 SMs)
# without split-K. GEMV_OVERRIDE (benchmarks only) replaces the choice.
GEMV_OVERRIDE: tuple[int, int, int, int] | None = None
# inline-PTX decode in the GEMV and the small-M kernel; checks switch it off to compare with the pure-Triton decode
GEMV_USE_ASM = True


def _gemv_config() -> tuple[int, int, int, int]:
    """The W4A8 GEMV's launch parameters. The same for every weight: BLOCK_K sets the fp32 summation order, so
    one launch over several weights (w4_matmul_shared_input) equals separate launches bit for bit."""
    if GEMV_OVERRIDE is not None:
        return GEMV_OVERRIDE
    # best total of a 12-config sweep on qkv / o / gate_up / down since the [groups, rows, words] tile order (H200,
    # benchmarks/bench_decode_gemm.py, 2026-11-29: 85.5 us against 92.9 for the earlier (4, 1024, 1, 1)), and
    # 3.45 against 3.67 ms per token end to end, each alone in a process (bench_e2e.py --gemv-config; 3.66 in a
    # later run alternating with bf16): 8 rows x 1024 K per step, two warps
    return (8, 1024, 2, 1)


# MMA_MIN_M <= M <= MMA_MAX_M runs the tensor-core small-M kernel (w4_mma.py); benchmarks/bench_small_m.py
# measures it against the CUDA-core GEMV (M = 1) and the tiled kernel around these bounds.
MMA_MIN_M = 2
MMA_MAX_M = 128
# The small-M kernel's operands, for groups of 64 and 128 (groups of 32 always take "halves"): "fp8" (default; W4A8
# on FP8 tensor cores where the GPU has them, else "halves"; the decoded weights are exact in E4M3, the MMA's adds
# are of reduced precision, ~1e-4; W4A16 takes "halves"), "halves" (half-planes, 16-bit MMA, exact) or "quarters"
# (quarter-planes, 16-bit MMA, exact). On an H200 "fp8" was the fastest at every M from 2 to 64 (mean over the
# Llama-3.1-8B shapes 1.32x bf16 at M = 16 against 1.15x for "halves"; benchmarks/RESULTS.md, twelfth session).
MMA_VARIANT = "fp8"
MMA_VARIANTS = ("halves", "quarters", "fp8")
# At least this many rows (prefill): the weight converted once (W4A8: to FP8 for the block-scaled path, else to
# fp16; W4A16: to the activations' type) and cuBLAS multiplies; benchmarks/bench_gemm.py measures the paths around it.
DEQUANT_MIN_M = MMA_MAX_M + 1
_MM_CONFIGS = {
    "small": [  # M <= 16: weight-streaming, many programs
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1), _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP_M=1), _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1),
    ],
    "medium": [  # M <= 128
        _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8), _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), _cfg(4, 4, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    ],
    "large": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ],
}


def _prune_block_k(configs, named_args, **kwargs):
    """Drop configs whose K-block would straddle a group (BLOCK_K must divide GROUP); keep at least one."""
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    kept = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]
    if kept:
        return kept
    fixed = triton.Config(dict(configs[0].kwargs, BLOCK_K=group), num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
    return [fixed]


_KEY_MM = ["N", "K", "M_BUCKET", "GROUP", "IS_BITMOD", "A_FP8", "FP8_DOT"]
_MM_TUNED = {
    name: triton.autotune(cfgs, key=_KEY_MM, prune_configs_by={"early_config_prune": _prune_block_k}, do_bench=_bench)(_w4_mm_kernel)
    for name, cfgs in _MM_CONFIGS.items()
}


def _mm_bucket(m: int) -> str:
    return "small" if m <= 16 else "medium" if m <= 128 else "large"


def _launch(kernel, config: triton.Config | None, grid, *args, **constexprs) -> None:
    """Autotuned launch on a GPU; under the interpreter the first config runs directly (no benchmarking)."""
    if config is None:
        kernel[grid](*args, **constexprs)
    else:
        kernel.fn[grid](*args, **constexprs, **config.all_kwargs())


class _Prepared:
    """Per-weight launch metadata, built once (the weight's tensors are checked then, not on every call)."""

    __slots__ = ("packed", "words", "scales", "aux", "is_bitmod", "n", "k", "group", "device", "words_fresh")

    def __init__(self, weight: BitMoDTensor | Int4Tensor, what: str) -> None:
        require_device(what, weight.packed, weight.scales)
        n, k = weight.shape
        if weight.group_size not in SUPPORTED_GROUPS:
            raise ValueError(f"{what}: group size {weight.group_size} not supported by the kernel; use one of {SUPPORTED_GROUPS}")
        self.is_bitmod = isinstance(weight, BitMoDTensor)
        self.aux = weight.selectors if self.is_bitmod else weight.zeros
        self.packed, self.scales = weight.packed, weight.scales
        if self.packed.stride(-1) != 1 or self.scales.stride(-1) != 1 or self.aux.stride(-1) != 1:
            raise ValueError(f"{what}: weight tensors must be contiguous along K")
        self.n, self.k, self.group, self.device = n, k, weight.group_size, self.packed.device
        # int32 words of 8 codes for the GEMV (k % 32 == 0; rows 4-byte aligned when packed is contiguous)
        aligned = self.packed.is_contiguous() and self.packed.data_ptr() % 4 == 0
        self.words = self.packed.view(torch.int32) if aligned else self.packed.contiguous().view(torch.int32)
        # a copy kernel just wrote the words: the next GEMV must not read them before waiting (no PDL prefetch)
        self.words_fresh = not aligned


def _prepared(weight: BitMoDTensor | Int4Tensor, what: str) -> _Prepared:
    prep = weight.__dict__.get("_p3_prepared")
    if prep is None or prep.packed is not weight.packed or prep.scales is not weight.scales or (
            prep.aux is not (weight.selectors if prep.is_bitmod else weight.zeros)):
        prep = _Prepared(weight, what)
        weight.__dict__["_p3_prepared"] = prep
    return prep


def mma_layout(activation_format: str, dtype: torch.dtype, group: int, device: torch.device) -> str:
    """The small-M kernel's activation layout (an act_quant._QUANTIZERS name) under MMA_VARIANT, for activations of
    `dtype` (W4A16) and `group`-sized weight groups on `device`."""
    if MMA_VARIANT not in MMA_VARIANTS:
        raise ValueError(f"gemm_w4.MMA_VARIANT must be one of {MMA_VARIANTS}, got {MMA_VARIANT!r}")
    variant = MMA_VARIANT if group >= 64 else "halves"  # quarter-planes and FP8 dots need K >= 16 / 32 per plane
    if activation_format == "fp8_e4m3":
        if variant == "fp8":
            return "halves_fp8" if fp8_dot_supported(device) else "halves"
        return variant
    planes = "quarters" if variant == "quarters" else "halves"
    return f"{planes}_fp16" if dtype == torch.float16 else f"{planes}_bf16"


def activation_layout(m: int, activation_format: str, group: int, device: torch.device) -> str | None:
    """The FP8 code layout w4_matmul quantizes M rows into for W4A8 with `group`-sized weight groups on `device`
    (act_quant: "split" for the M = 1 GEMV, mma_layout's for the small-M kernel), or None where it quantizes in
    plain order or not at all."""
    if activation_format != "fp8_e4m3":
        return None
    if MMA_MIN_M <= m <= MMA_MAX_M:
        return mma_layout(activation_format, torch.float16, group, device)
    return "split" if m == 1 else None


def _gemv_input(x: torch.Tensor, x2: torch.Tensor, activation_format: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode GEMV's activations of x (= x2 viewed as [1, K]) in its split layout, and the token scale (W4A8;
    None for W4A16, whose fp32 activations are rounded to bf16 first, as everywhere in w4_matmul)."""
    if activation_format == "fp8_e4m3":
        return quantize_activation_once(x, x2, "split")
    if x2.dtype == torch.float32:
        x = x2 = x2.to(torch.bfloat16)
    return quantize_activation_once(x, x2, "split_16bit")[0], None


def _dequant_matmul(a: torch.Tensor, row_scales: torch.Tensor | None, weight: BitMoDTensor | Int4Tensor,
                    bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y = a @ (W dequantized to a's 16-bit type)^T (* row_scales) + bias, accumulated in fp32 by cuBLAS: the
    prefill of W4A8 (a: the FP8 codes in fp16, exact, with their token scales) and of W4A16 (a: the activations).

    The only rounding beyond fp32 summation is each weight's to a.dtype (fp16: 2**-11 relative; bf16: 2**-9, as in
    Marlin-style W4A16 kernels). W4A16 with a 16-bit output adds the bias in cuBLAS's epilogue; otherwise row
    scales, bias and the output cast are one fused pass over the fp32 product.
    """
    w16 = dequantize_w4(weight, a.dtype)
    if row_scales is None and y.dtype == a.dtype:
        if bias is None:
            torch.mm(a, w16.t(), out=y)
        else:
            torch.addmm(bias.to(y.dtype), a, w16.t(), out=y)
        return
    acc = torch.mm(a, w16.t(), out_dtype=torch.float32) if a.is_cuda and _MM_OUT_DTYPE else a.float() @ w16.float().t()
    rows_epilogue(acc[None], row_scales, bias, y)


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # 16-bit x 16-bit -> fp32 output in one cuBLAS call


# W4A8 prefill with groups of 128 on Hopper: FP8 x FP8 in cuBLAS with 1x128 block scales on both operands (the
# tokens' scales on the activations, the groups' scales on the weights), through torch's scaled_mm where it has
# them (torch >= 2.10). Benchmarks and GPU checks may switch it off to compare with the fp16 dequant path.
FP8_BLOCKWISE = True
_HAS_SCALED_MM = hasattr(torch.nn.functional, "scaled_mm") and hasattr(torch.nn.functional, "ScalingType")
_blockwise_unsupported: dict[int, str] = {}  # device index -> why torch / cuBLAS refused block scaling there


def _blockwise_fp8_ok(x: torch.Tensor, prep: _Prepared, out_dtype: torch.dtype) -> bool:
    """Whether the block-scaled FP8 path applies: shapes cuBLAS's FP8 GEMM takes, on a Hopper GPU (torch's
    1x128 block scaling is SM90-only) where it has not been refused."""
    return (FP8_BLOCKWISE and nvidia_compiled(x.device) and _HAS_SCALED_MM
            and prep.group == 128 and prep.k % 128 == 0 and prep.n % 16 == 0
            and out_dtype in (torch.float16, torch.bfloat16)
            and device_capability(x.device.index)[0] == 9
            and (x.device.index or 0) not in _blockwise_unsupported)


def _blockwise_fp8_matmul(x: torch.Tensor, weight: BitMoDTensor | Int4Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor | None:
    """y = sum over groups g of xs[m] * s[n, g] * (FP8 codes of x) . (integer weight values), in cuBLAS (s: the
    group scale, x 1/2 for BitMoD, whose integer values are the grid x 2).

    The products are exact and the scales multiply each 128-wide block's partial sum, which Hopper's FP8 MMA
    adds with a reduced-precision adder (as the tiled kernel's): no rounding of the weights to fp16. The rows are
    padded to a multiple of 4 (cuBLAS refused M = 1030 and took M = 300 on an H200: the token scales' column
    stride M must be 16-byte aligned). Returns None (after one warning per device) where torch / cuBLAS refuses
    block scaling: the caller then takes the dequant path.
    """
    fn = torch.nn.functional
    m, k = x.shape
    rows, kg = cdiv(m, 4) * 4, k // 128
    codes, scale_a = quantize_activation_fp8(x, rows=rows, scale_blocks=kg)  # scales [rows, K / 128], column-major
    values, scale_b = weight_values_fp8(weight)  # [N, K], [N, K / 128] column-major
    block = fn.ScalingType.BlockWise1x128
    try:
        y = fn.scaled_mm(codes, values.t(), scale_a, block, scale_b, block,
                         output_dtype=out_dtype if bias is None else torch.float32)[:m]
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError, ValueError) as err:
        _blockwise_unsupported[x.device.index or 0] = str(err)
        warnings.warn(f"w4_matmul: torch / cuBLAS refused block-scaled FP8 ({str(err)[:200]}); W4A8 prefill falls "
                      "back to an fp16 copy of the weight", RuntimeWarning, stacklevel=4)
        return None
    if bias is not None:
        y = torch.add(y, bias, out=out if out is not None else torch.empty_like(y, dtype=out_dtype))
    elif out is not None:
        out.copy_(y)
        y = out
    return y


def _checked(what: str, x: torch.Tensor, weight: BitMoDTensor | Int4Tensor, bias: torch.Tensor | None,
             activation_format: str) -> _Prepared:
    """The weight's launch metadata, after checking that x, weight and bias fit together and the kernels."""
    if not isinstance(weight, (BitMoDTensor, Int4Tensor)):
        raise TypeError(f"{what}: weight must be a BitMoDTensor or Int4Tensor, got {type(weight).__name__}")
    prep = _prepared(weight, what)
    if x.device != prep.device or (bias is not None and bias.device != prep.device):
        raise ValueError(f"{what}: tensors on different devices ({x.device}, weight on {prep.device})")
    if not interpreting() and not x.is_cuda:
        raise ValueError(f"{what}: the Triton kernel needs CUDA tensors (got {x.device}); use backend='torch' on CPU")
    if not x.is_floating_point():
        raise TypeError(f"{what}: x must be floating point, got {x.dtype}")
    if x.shape[-1] != prep.k:
        raise ValueError(f"{what}: x has {x.shape[-1]} features but the weight expects {prep.k}")
    if activation_format != "fp8_e4m3" and activation_format != "none":
        raise ValueError(f"{what}: activation_format must be 'fp8_e4m3' or 'none', got {activation_format!r}")
    if bias is not None and bias.shape != (prep.n,):
        raise ValueError(f"{what}: bias must have shape ({prep.n},), got {tuple(bias.shape)}")
    return prep


def _gemv(a: torch.Tensor, xs: torch.Tensor | None, parts: list[tuple[_Prepared, torch.Tensor | None, torch.Tensor]],
          use_asm: bool) -> None:
    """One GEMV launch over 1 to 3 weights of one K, format and layout (`parts`: weight, bias, output [1, N]), with
    a's split activations (_gemv_input) and token scale xs (None: W4A16)."""
    first = parts[0][0]
    block_n, block_k, warps, stages = _gemv_config()
    block_k = max(block_k, first.group)
    segments = []
    for prep, bias, y in parts + parts[:1] * (3 - len(parts)):  # unused segment slots repeat the first
        segments += [prep.words, prep.scales, prep.aux, bias if bias is not None else prep.scales, y, prep.n]
    grid = (sum(cdiv(prep.n, block_n) for prep, _, _ in parts), 1)
    pdl = pdl_launch(a)
    if any(prep.words_fresh for prep, _, _ in parts):  # see _Prepared: this launch waits before its first load
        pdl = {"PDL": False}
        for prep, _, _ in parts:
            prep.words_fresh = False
    _w4_gemv_kernel[grid](
        a, xs if xs is not None else a, *segments[:6], first.k, a.stride(0), first.words.stride(0), first.scales.stride(0), first.aux.stride(0),
        parts[0][2].stride(0), *segments[6:], KW=first.k // 8, SEGMENTS=len(parts), GROUP=first.group, BLOCK_N=block_n,
        BLOCK_K=block_k, IS_BITMOD=first.is_bitmod, HAS_BIAS=parts[0][1] is not None, USE_ASM=use_asm,
        EVEN_K=first.k % block_k == 0, ROW_SCALE=xs is not None, num_warps=warps, num_stages=stages, **pdl)


@on_input_device
def w4_matmul_shared_input(
    x: torch.Tensor, weights: list[BitMoDTensor | Int4Tensor], biases: list[torch.Tensor | None] | None = None,
    activation_format: str = "fp8_e4m3",
) -> list[torch.Tensor]:
    """[w4_matmul(x, W_i, b_i) for each i]: the projections of one input (q/k/v, gate/up), equal to separate calls.

    At M = 1, up to three weights of one K, format, group and layout (all with a bias or none) run as one GEMV
    launch: the activations are read and the grid's tail is paid once instead of per weight.
    """
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"w4_matmul_shared_input: {len(weights)} weights but {len(biases)} biases")
    preps = [_checked("w4_matmul_shared_input", x, w, b, activation_format) for w, b in zip(weights, biases)]
    k = x.shape[-1]
    first = preps[0] if preps else None
    fused = (2 <= len(preps) <= 3 and x.numel() == k
             and all(p.is_bitmod == first.is_bitmod and p.group == first.group and p.words.stride(0) == first.words.stride(0)
                     and p.scales.stride(0) == first.scales.stride(0) and p.aux.stride(0) == first.aux.stride(0)
                     and p.scales.dtype == first.scales.dtype and p.aux.dtype == first.aux.dtype for p in preps)
             and len({None if b is None else b.dtype for b in biases}) == 1)  # one kernel signature for all segments
    if not fused:
        return [w4_matmul(x, w, b, activation_format) for w, b in zip(weights, biases)]
    x2 = x.reshape(1, k)
    outs = [torch.empty((1, p.n), dtype=x.dtype, device=x.device) for p in preps]
    a, xs = _gemv_input(x, x2 if x2.stride(-1) == 1 else x2.contiguous(), activation_format)
    _gemv(a, xs, list(zip(preps, biases, outs)), GEMV_USE_ASM and nvidia_compiled(x.device))
    return [y.reshape(*x.shape[:-1], p.n) for y, p in zip(outs, preps)]


@on_input_device
def w4_matmul(
    x: torch.Tensor, weight: BitMoDTensor | Int4Tensor, bias: torch.Tensor | None = None, activation_format: str = "fp8_e4m3",
    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = Q_act(x) @ dequant(W)^T + bias, for x [..., K] (fp16/bf16/fp32) and a packed 4-bit weight [N, K].

    activation_format: "fp8_e4m3" (per-token FP8 codes, W4A8) or "none" (x as is, W4A16; fp32 x is cast to
    bf16, which rounds it). out_dtype defaults to x.dtype (fp32 x gives fp32 out); `out` ([M, N] contiguous,
    M = x.numel() // K) receives the result when given.
    """
    prep = _checked("w4_matmul", x, weight, bias, activation_format)
    n, k = prep.n, prep.k
    interp = interpreting()
    what = "w4_matmul"
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is not None and (out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous()
                            or out.device != x.device):
        raise ValueError(f"{what}: out must be a contiguous {out_dtype} [{m}, {n}] tensor on {x.device}")
    a_fp8 = activation_format == "fp8_e4m3"
    # the prefill paths take only what the M = 1 and small-M kernels (below) do not
    if a_fp8 and m >= DEQUANT_MIN_M and m > max(1, MMA_MAX_M) and _blockwise_fp8_ok(x2, prep, out_dtype):
        y = _blockwise_fp8_matmul(x2, weight, bias, out_dtype, out)
        if y is not None:
            return y.reshape(*lead, n)
    y = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    is_bitmod, packed, scales, aux = prep.is_bitmod, prep.packed, prep.scales, prep.aux
    bias_arg = bias if bias is not None else scales
    if MMA_MIN_M <= m <= MMA_MAX_M:
        layout = mma_layout(activation_format, x2.dtype, prep.group, x.device)
        a, xs = quantize_activation_once(x, x2, layout)
        w4_mma_matmul(a, xs if a_fp8 else None, prep.words, scales, aux, bias, y, prep.group, is_bitmod,
                      GEMV_USE_ASM and nvidia_compiled(x.device), quarters=layout.startswith("quarters"))
        return y.reshape(*lead, n)
    if m == 1:  # decode GEMV: fixed launch parameters, no autotuner
        a, xs = _gemv_input(x, x2, activation_format)
        _gemv(a, xs, [(prep, bias, y)], GEMV_USE_ASM and nvidia_compiled(x.device))
        return y.reshape(*lead, n)
    if m >= DEQUANT_MIN_M:
        if a_fp8:
            a, xs = quantize_activation_fp8(x2, torch.float16)
        else:
            a, xs = (x2 if x2.dtype != torch.float32 else x2.to(torch.bfloat16)), None
        _dequant_matmul(a, xs, weight, bias, y)
        return y.reshape(*lead, n)
    fp8_dot = fp8_dot_supported(x.device)
    if a_fp8:  # FP8 codes for FP8 tensor cores; elsewhere fp16, which holds every E4M3 value (no FP8 type before sm_89)
        a, xs = quantize_activation_fp8(x2, torch.float8_e4m3fn if fp8_dot else torch.float16)
    else:
        a, xs = (x2 if x2.dtype != torch.float32 else x2.to(torch.bfloat16)), x2.new_empty(0, dtype=torch.float32)
    common = dict(GROUP=prep.group, IS_BITMOD=is_bitmod, A_FP8=a_fp8, HAS_BIAS=bias is not None)
    bucket = _mm_bucket(m)
    kernel = _MM_TUNED[bucket]
    cfg = None
    if interp:
        cfg = _prune_block_k(_MM_CONFIGS[bucket][:1], {"GROUP": prep.group})[0]
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
    _launch(kernel, cfg, grid, a, xs, packed, scales, aux, bias_arg, y,
            m, n, k, a.stride(0), packed.stride(0), scales.stride(0), aux.stride(0), y.stride(0),
            next_power_of_2(m) if m <= 256 else 512 * cdiv(m, 512),
            FP8_DOT=fp8_dot, NATIVE_BF16=not interp, **common)
    return y.reshape(*lead, n)
