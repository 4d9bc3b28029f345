"""Fused decode attention (one query token) over the P3 KV cache: INT4 K/V, FP8 query, UE4M4 P.

Semantics are those of p3quant.attention_math.p3_attention_reference, exactly (up to fp32 summation order):
the UE4M4 code of P'[t] = P[t] * S_V[t] / M needs the *final* softmax normaliser and M = max S_V over the
visible keys, which an online (single-pass) softmax does not know while it streams V. So the kernel runs
flash-decoding style in two passes over context splits, storing the fp32 scores in between (4 bytes per
query head and token, about a quarter of what re-reading the packed keys would cost):

1. _scores_kernel, one program per (batch, kv-head, split): quantizes the GQA group's query heads to FP8
   (after the smoothing factor), streams the split's packed keys once for all heads of the group (K codes
   decoded in registers, (k - zp) . q8 on tensor cores in fp16, exact products; the keys are the dots' rows, in
   quarter-planes, so that they feed the MMA from registers without a shared-memory relayout), applies scale,
   softcap and the [B, T] mask, writes the scores and per-split (max, sum exp) and max S_V. The last split handles the
   16-bit residual window (keys divided by the smoothing factor, fp32 dot).
2. _pv_kernel, same grid: combines the per-split statistics into the global max, sum and M, codes
   P' = P * (S_V / M) in UE4M4 (nearest-even or half-up, as fmt.prob_rounding; one division per token, and
   P = exp(s - max) * (1 / sum)), multiplies it with the centered value codes on tensor cores (fp16, exact)
   and scales by M; the residual split multiplies E4M4(P) with the 16-bit values.
A GQA group's G query heads fill the tensor-core dots' 16 rows (columns in the scores pass) by repetition (each
head R times) rather than zero padding, so the per-head work around the dots (the query's quantization, softmax
statistics, P's UE4M4 codes) runs on next_pow2(G) rows only; the repeated dot rows are bit-identical and one copy
is kept.
The split outputs share one normaliser: _combine_kernel sums them and writes the output in the caller's dtype
(one launch instead of a reduction and a cast). A decode split is often a single block of tokens, so each
kernel loads its next block before the work that block does not depend on (the device-side token count, the
query's quantization, the split statistics): their latencies overlap instead of adding up. With a static cache
the splits cover its capacity and each loads its first block before it knows the live count, so a cache
allocated far beyond the tokens it holds reads up to one block per idle split (p3quant.generate sizes it to the
prompt plus the new tokens).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from p3quant.attention_math import QuantizedKV
from p3quant.formats import Int4Tensor

from .common import (cdiv, decode_halves, decode_quarters, FP16_TINY, fp8_token_scale, interpreting, native_e4m3, next_power_of_2,
                     nvidia_compiled, on_input_device, pdl_begin, pdl_launch, require_device, round_e4m3, round_minifloat,
                     round_to_output, sm_count)

UE4M4_MAX = tl.constexpr(1.9375)
_BLOCK_R = 16
# Launch parameters of the scores and P.V passes on a GPU; benchmarks may replace them. From the H200 sweeps of
# benchmarks/bench_decode_attention.py (RESULTS.md, eleventh session; batch 1 / 4 / 16, 4K and 32K): about 2
# programs per SM (context splits per (batch, kv-head)), 4 warps, blocks of BLOCK_T tokens, or LONG_BLOCK_T where
# the splits hold more than LONG_SPLIT_TOKENS tokens
BLOCK_T = 128
LONG_BLOCK_T = 256
LONG_SPLIT_TOKENS = 512
NUM_WARPS = 4
PROGRAMS_PER_SM = 2
# K/V decoded by inline PTX (common.decode_word16) on NVIDIA GPUs; checks switch it off to compare with the
# pure-Triton decode
ATTENTION_USE_ASM = True


@triton.jit
def _tanh_softcap(s, softcap):
    x = s / softcap
    return (2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0) * softcap


@triton.jit
def _repeat_rows(x, R: tl.constexpr):
    """[G, C] -> [G * R, C], each row repeated R times in a row (the heads of a GQA group fill a 16-row dot)."""
    if R == 1:
        return x
    G: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, None, :], [G, R, C]), [G * R, C])


@triton.jit
def _first_of_repeats(x, R: tl.constexpr):
    """[G * R, C] of R equal copies of each row -> [G, C] (their max: the copies are bit-identical)."""
    if R == 1:
        return x
    GR: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.max(tl.reshape(x, [GR // R, R, C]), axis=1)


@triton.jit
def _plane_dims(DW: tl.constexpr):
    """Head-dim element of each half-plane column (kernels.common.decode_halves' order): lo column c holds element
    8 (c // 4) + c % 4, hi column c the element 4 after it."""
    c = tl.arange(0, 4 * DW)
    d_lo = 8 * (c // 4) + c % 4
    return d_lo, d_lo + 4


@triton.jit
def _quarter_dims(DW: tl.constexpr):
    """Head-dim element of each quarter-plane column (kernels.common.decode_quarters' order): column c of plane p
    holds element 8 (c // 2) + 2 p + c % 2."""
    c = tl.arange(0, 2 * DW)
    d0 = 8 * (c // 2) + c % 2
    return d0, d0 + 2, d0 + 4, d0 + 6


@triton.jit
def _query_plane(q_ptr, sm_ptr, b, kvh, heads, g_mask, d, d_mask, s_qb, s_qh, s_smb, s_smh, HAS_SMOOTH: tl.constexpr):
    """The GQA group's query heads at head-dim elements d [G4, C], times the smoothing factors, and those factors."""
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    sm = tl.full(d.shape, 1.0, tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(sm_ptr + b * s_smb + kvh * s_smh + d, mask=d_mask, other=1.0)
        q = q * sm[None, :]
    return q, sm


@triton.jit
def _residual_keys_t(rk_base, d, mask, smoothing):
    """The residual window's 16-bit keys at head-dim elements d, divided by the smoothing factors (the keys the
    quantized ones are smoothed like), transposed to [C, BLOCK_R] for the scores' dot."""
    keys = tl.load(rk_base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.trans(tl.math.div_rn(keys, smoothing[None, :]))


@triton.jit
def _key_block(kp_ptr, ks_ptr, kz_ptr, vs_ptr, mask_ptr, b, kvh, t0, t_lim,
               s_kpb, s_kph, s_kpt, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt, s_vsb, s_vsh, s_vst, s_mb,
               D8: tl.constexpr, DW: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr):
    """Packed keys (int32 words of 8 codes), their zero points and scales, the value scales and the mask bytes of
    tokens t0 .. t0 + BLOCK_T - 1 below t_lim (zeros past it)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_w = tl.arange(0, DW)
    t_mask = offs_t < t_lim
    kp = tl.load(kp_ptr + b * s_kpb + kvh * s_kph + offs_t[:, None] * s_kpt + offs_w[None, :],
                 mask=t_mask[:, None] & (offs_w < D8)[None, :], other=0)
    kz = tl.load(kz_ptr + b * s_kzb + kvh * s_kzh + offs_t * s_kzt, mask=t_mask, other=0)
    ks = tl.load(ks_ptr + b * s_ksb + kvh * s_ksh + offs_t * s_kst, mask=t_mask, other=0.0)
    vs = tl.load(vs_ptr + b * s_vsb + kvh * s_vsh + offs_t * s_vst, mask=t_mask, other=0.0)
    mk = kz
    if HAS_MASK:
        mk = tl.load(mask_ptr + b * s_mb + offs_t, mask=t_mask, other=0)
    return kp, kz, ks, vs, mk


@triton.jit
def _value_block(vp_ptr, vs_ptr, vz_ptr, sc_ptr, b, kvh, heads, g_mask, t0, t_lim,
                 s_vpb, s_vph, s_vpt, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt, s_scb, s_sch,
                 D8: tl.constexpr, DW: tl.constexpr, BLOCK_T: tl.constexpr):
    """The scores, value scales, packed values (int32 words of 8 codes) and their zero points of tokens t0 .. t0 +
    BLOCK_T - 1 below t_lim (scores -inf, the rest zeros past it)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_w = tl.arange(0, DW)
    t_mask = offs_t < t_lim
    sc = tl.load(sc_ptr + b * s_scb + heads[:, None] * s_sch + offs_t[None, :], mask=g_mask[:, None] & t_mask[None, :],
                 other=float("-inf"))
    vs = tl.load(vs_ptr + b * s_vsb + kvh * s_vsh + offs_t * s_vst, mask=t_mask, other=0.0)
    vp = tl.load(vp_ptr + b * s_vpb + kvh * s_vph + offs_t[:, None] * s_vpt + offs_w[None, :],
                 mask=t_mask[:, None] & (offs_w < D8)[None, :], other=0)
    vz = tl.load(vz_ptr + b * s_vzb + kvh * s_vzh + offs_t * s_vzt, mask=t_mask, other=0)
    return sc, vs, vp, vz


@triton.jit
def _scores_kernel(
    q_ptr, sm_ptr, kp_ptr, ks_ptr, kz_ptr, vs_ptr, rk_ptr, mask_ptr, sc_ptr, mst_ptr, lst_ptr, vmax_ptr, len_ptr,
    n_quant, n_res, chunk, scaling, softcap, HKV, NUM_SPLITS,
    s_qb, s_qh, s_smb, s_smh, s_kpb, s_kph, s_kpt, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt,
    s_vsb, s_vsh, s_vst, s_rkb, s_rkh, s_rkt, s_mb, s_scb, s_sch,
    G: tl.constexpr, GP: tl.constexpr, D8: tl.constexpr, DW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_ASM: tl.constexpr, G4: tl.constexpr, HAS_SMOOTH: tl.constexpr, QUANT_Q: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DEVICE_LEN: tl.constexpr, NATIVE_E4M3: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_begin(PDL)  # the cache's newest token and the query come from the kernels just before
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    # the split's first key block is loaded before anything it does not depend on (the device-side token count,
    # the query's quantization): a decode split is often one block, so this overlaps their latencies
    t_start = split * chunk
    t_lim = tl.minimum(t_start + chunk, n_quant)  # n_quant: the storage capacity with DEVICE_LEN
    kp, kz, ks, vs, mk = _key_block(kp_ptr, ks_ptr, kz_ptr, vs_ptr, mask_ptr, b, kvh, t_start, t_lim,
                                    s_kpb, s_kph, s_kpt, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt, s_vsb, s_vsh, s_vst,
                                    s_mb, D8, DW, BLOCK_T, HAS_MASK)
    if DEVICE_LEN:  # static cache: the token count lives on the device; the window is a ring of n_res slots
        n_quant = tl.load(len_ptr).to(tl.int32) - n_res
    s1 = NUM_SPLITS + 1
    R: tl.constexpr = GP // G4  # each head's row repeated R times in the dots' 16-row tiles
    offs_g = tl.arange(0, G4)
    g_mask = offs_g < G
    heads = kvh * G + offs_g
    # the query, smoothing factors and residual keys in the quarter-plane order the packed keys decode to
    d0, d1, d2, d3 = _quarter_dims(DW)
    d_mask = d0 < 8 * D8
    q0, sm0 = _query_plane(q_ptr, sm_ptr, b, kvh, heads, g_mask, d0, d_mask, s_qb, s_qh, s_smb, s_smh, HAS_SMOOTH)
    q1, sm1 = _query_plane(q_ptr, sm_ptr, b, kvh, heads, g_mask, d1, d_mask, s_qb, s_qh, s_smb, s_smh, HAS_SMOOTH)
    q2, sm2 = _query_plane(q_ptr, sm_ptr, b, kvh, heads, g_mask, d2, d_mask, s_qb, s_qh, s_smb, s_smh, HAS_SMOOTH)
    q3, sm3 = _query_plane(q_ptr, sm_ptr, b, kvh, heads, g_mask, d3, d_mask, s_qb, s_qh, s_smb, s_smh, HAS_SMOOTH)
    q_scale = tl.full([G4], 1.0, tl.float32)
    if QUANT_Q:  # FP8-E4M3 per (token, head), scale = fp16(amax / 448)
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(q0), axis=1), tl.max(tl.abs(q1), axis=1)),
                          tl.maximum(tl.max(tl.abs(q2), axis=1), tl.max(tl.abs(q3), axis=1)))
        q_scale = fp8_token_scale(amax)
        q0 = round_e4m3(tl.math.div_rn(q0, q_scale[:, None]), NATIVE_E4M3)
        q1 = round_e4m3(tl.math.div_rn(q1, q_scale[:, None]), NATIVE_E4M3)
        q2 = round_e4m3(tl.math.div_rn(q2, q_scale[:, None]), NATIVE_E4M3)
        q3 = round_e4m3(tl.math.div_rn(q3, q_scale[:, None]), NATIVE_E4M3)
    m_i = tl.full([G4], float("-inf"), tl.float32)
    l_i = tl.zeros([G4], tl.float32)
    vmax = tl.zeros([BLOCK_T], tl.float32)
    if split < NUM_SPLITS:
        # keys are the dots' rows (tokens), so the decoded codes feed the MMA from registers; the GQA group's
        # heads are its columns, each repeated R times
        q8t0 = tl.trans(_repeat_rows(q0.to(tl.float16), R))  # FP8 values: exact in fp16
        q8t1 = tl.trans(_repeat_rows(q1.to(tl.float16), R))
        q8t2 = tl.trans(_repeat_rows(q2.to(tl.float16), R))
        q8t3 = tl.trans(_repeat_rows(q3.to(tl.float16), R))
        row_scale = q_scale * scaling
        t_end = tl.minimum(t_start + chunk, n_quant)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < t_end
            nkp, nkz, nks, nvs, nmk = _key_block(kp_ptr, ks_ptr, kz_ptr, vs_ptr, mask_ptr, b, kvh, t0 + BLOCK_T, t_lim,
                                                 s_kpb, s_kph, s_kpt, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt, s_vsb,
                                                 s_vsh, s_vst, s_mb, D8, DW, BLOCK_T, HAS_MASK)
            k0, k1, k2, k3 = decode_quarters(kp, kz, False, USE_ASM, False)  # fp16 code - zero point, exact
            st = tl.dot(k0, q8t0)
            st = tl.dot(k1, q8t1, st)
            st = tl.dot(k2, q8t2, st)
            st = tl.dot(k3, q8t3, st)
            s = _first_of_repeats(tl.trans(st), R)  # [G4, BLOCK_T]
            s = s * row_scale[:, None] * ks.to(tl.float32)[None, :]
            if HAS_SOFTCAP:
                s = _tanh_softcap(s, softcap)
            vis = t_mask  # a static cache's slots past the live count hold stale data: masked here
            if HAS_MASK:
                vis = vis & (mk != 0)
            s = tl.where(vis[None, :], s, float("-inf"))
            tl.store(sc_ptr + b * s_scb + heads[:, None] * s_sch + offs_t[None, :], s, mask=g_mask[:, None] & t_mask[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
            vmax = tl.maximum(vmax, tl.where(vis, vs.to(tl.float32), 0.0))
            kp, kz, ks, vs, mk = nkp, nkz, nks, nvs, nmk
    else:
        qd0 = _repeat_rows(q0 * q_scale[:, None], R)  # the dequantized query the reference multiplies with
        qd1 = _repeat_rows(q1 * q_scale[:, None], R)
        qd2 = _repeat_rows(q2 * q_scale[:, None], R)
        qd3 = _repeat_rows(q3 * q_scale[:, None], R)
        for r0 in range(0, n_res, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < n_res
            rk_base = rk_ptr + b * s_rkb + kvh * s_rkh + offs_r[:, None] * s_rkt
            rmask2 = r_mask[:, None] & d_mask[None, :]
            s = tl.dot(qd0, _residual_keys_t(rk_base, d0, rmask2, sm0), input_precision="ieee")
            s = tl.dot(qd1, _residual_keys_t(rk_base, d1, rmask2, sm1), s, input_precision="ieee")
            s = tl.dot(qd2, _residual_keys_t(rk_base, d2, rmask2, sm2), s, input_precision="ieee")
            s = tl.dot(qd3, _residual_keys_t(rk_base, d3, rmask2, sm3), s, input_precision="ieee")
            s = _first_of_repeats(s, R) * scaling
            if HAS_SOFTCAP:
                s = _tanh_softcap(s, softcap)
            vis = r_mask
            if HAS_MASK:
                pos_r = n_quant + offs_r
                if DEVICE_LEN:  # ring slot r holds the window's position q with q % n_res == r
                    pos_r = n_quant + ((offs_r - n_quant) % n_res + n_res) % n_res
                vis = vis & (tl.load(mask_ptr + b * s_mb + pos_r, mask=r_mask, other=0) != 0)
            s = tl.where(vis[None, :], s, float("-inf"))
            tl.store(sc_ptr + b * s_scb + heads[:, None] * s_sch + n_quant + offs_r[None, :], s, mask=g_mask[:, None] & r_mask[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
    row = (b * HKV * G + heads) * s1 + split
    tl.store(mst_ptr + row, m_i, mask=g_mask)
    tl.store(lst_ptr + row, l_i, mask=g_mask)
    tl.store(vmax_ptr + pid * s1 + split, tl.max(vmax, axis=0))


@triton.jit
def _pv_kernel(
    vp_ptr, vs_ptr, vz_ptr, rv_ptr, sc_ptr, mst_ptr, lst_ptr, vmax_ptr, out_ptr, len_ptr,
    n_quant, n_res, chunk, HKV, NUM_SPLITS,
    s_vpb, s_vph, s_vpt, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt, s_rvb, s_rvh, s_rvt, s_scb, s_sch,
    G: tl.constexpr, GP: tl.constexpr, D8: tl.constexpr, DW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_ASM: tl.constexpr, G4: tl.constexpr, SP: tl.constexpr, HALF_UP: tl.constexpr,
    DEVICE_LEN: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_begin(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    R: tl.constexpr = GP // G4  # each head's row repeated R times in the dots' 16-row tiles
    offs_g = tl.arange(0, G4)
    g_mask = offs_g < G
    heads = kvh * G + offs_g
    # the split's first block is loaded before the statistics and the token count (as in _scores_kernel)
    t_start = split * chunk
    t_lim = tl.minimum(t_start + chunk, n_quant)
    sc, vs, vp, vz = _value_block(vp_ptr, vs_ptr, vz_ptr, sc_ptr, b, kvh, heads, g_mask, t_start, t_lim,
                                  s_vpb, s_vph, s_vpt, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt, s_scb, s_sch,
                                  D8, DW, BLOCK_T)
    if DEVICE_LEN:
        n_quant = tl.load(len_ptr).to(tl.int32) - n_res
    s1 = NUM_SPLITS + 1
    d_lo, d_hi = _plane_dims(DW)  # the output columns in the half-plane order the packed values decode to
    d_mask = d_lo < 8 * D8
    offs_s = tl.arange(0, SP)
    gs_mask = g_mask[:, None] & (offs_s < s1)[None, :]
    rows = (b * HKV * G + heads)[:, None] * s1 + offs_s[None, :]
    m_all = tl.load(mst_ptr + rows, mask=gs_mask, other=float("-inf"))
    l_all = tl.load(lst_ptr + rows, mask=gs_mask, other=0.0)
    m = tl.max(m_all, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(l_all * tl.exp(m_all - m_safe[:, None]), axis=1)
    inv_l = tl.math.div_rn(1.0, tl.where(l > 0, l, 1.0))  # fully masked rows: every p is 0
    v_max = tl.max(tl.load(vmax_ptr + pid * s1 + offs_s, mask=offs_s < s1, other=0.0), axis=0)
    v_max = tl.maximum(v_max, FP16_TINY)
    acc_lo = tl.zeros([GP, 4 * DW], tl.float32)
    acc_hi = tl.zeros([GP, 4 * DW], tl.float32)
    if split < NUM_SPLITS:
        t_end = tl.minimum(t_start + chunk, n_quant)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < t_end  # a static cache's slots past the live count hold stale data
            nsc, nvs, nvp, nvz = _value_block(vp_ptr, vs_ptr, vz_ptr, sc_ptr, b, kvh, heads, g_mask, t0 + BLOCK_T, t_lim,
                                              s_vpb, s_vph, s_vpt, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt, s_scb,
                                              s_sch, D8, DW, BLOCK_T)
            s = tl.where(t_mask[None, :], sc, float("-inf"))
            p = tl.exp(s - m_safe[:, None]) * inv_l[:, None]
            ratio = tl.math.div_rn(tl.where(t_mask, vs.to(tl.float32), 0.0), v_max)  # per token, as fold_value_scales
            folded = tl.minimum(tl.maximum(p * ratio[None, :], 0.0), 1.0)
            p8 = round_minifloat(folded, 4, -14, UE4M4_MAX, HALF_UP).to(tl.float16)  # exact in fp16
            v_lo, v_hi = decode_halves(vp, vz, False, USE_ASM, False)  # fp16 code - zero point, exact
            p16 = _repeat_rows(p8, R)
            acc_lo += tl.dot(p16, v_lo)
            acc_hi += tl.dot(p16, v_hi)
            sc, vs, vp, vz = nsc, nvs, nvp, nvz
        acc_lo = acc_lo * v_max
        acc_hi = acc_hi * v_max
    else:
        for r0 in range(0, n_res, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < n_res
            s = tl.load(sc_ptr + b * s_scb + heads[:, None] * s_sch + n_quant + offs_r[None, :], mask=g_mask[:, None] & r_mask[None, :], other=float("-inf"))
            p = tl.exp(s - m_safe[:, None]) * inv_l[:, None]
            p8 = _repeat_rows(round_minifloat(p, 4, -14, UE4M4_MAX, HALF_UP), R)
            rv_base = rv_ptr + b * s_rvb + kvh * s_rvh + offs_r[:, None] * s_rvt
            rmask2 = r_mask[:, None] & d_mask[None, :]
            acc_lo += tl.dot(p8, tl.load(rv_base + d_lo[None, :], mask=rmask2, other=0.0).to(tl.float32), input_precision="ieee")
            acc_hi += tl.dot(p8, tl.load(rv_base + d_hi[None, :], mask=rmask2, other=0.0).to(tl.float32), input_precision="ieee")
    acc_lo = _first_of_repeats(acc_lo, R)
    acc_hi = _first_of_repeats(acc_hi, R)
    out_base = out_ptr + ((b * HKV * G + heads)[:, None] * s1 + split) * (8 * D8)
    tl.store(out_base + d_lo[None, :], acc_lo, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(out_base + d_hi[None, :], acc_hi, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(part_ptr, out_ptr, S1, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """out[row] = sum of part[row, s] over the splits s (BLOCK_S splits per load, so that a long context's many
    splits cost a few dependent loads, not one each), rounded once to out's dtype."""
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    total = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S1, BLOCK_S):
        splits = s0 + offs_s
        tile = tl.load(part_ptr + (row * S1 + splits[:, None]) * D + offs[None, :],
                       mask=(splits < S1)[:, None] & mask[None, :], other=0.0)
        total += tl.sum(tile, axis=0)
    tl.store(out_ptr + row * D + offs, round_to_output(total, out_ptr), mask=mask)


def _num_sms(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 4


def _words(what: str, name: str, packed: torch.Tensor) -> torch.Tensor:
    """The packed codes [B, H_kv, T, D/2] as int32 words of 8 codes (a view: no copy)."""
    try:
        return packed.view(torch.int32)
    except RuntimeError as err:
        raise ValueError(f"{what}: {name}.packed must be viewable as int32 words (4-byte aligned rows of D/2 bytes, "
                         f"strides in multiples of 4 bytes); got strides {packed.stride()}: {err}") from None


def _check_int4(what: str, name: str, t: Int4Tensor, batch: int, kv_heads: int, d: int) -> None:
    if not isinstance(t, Int4Tensor):
        raise TypeError(f"{what}: {name} must be an Int4Tensor, got {type(t).__name__}")
    if t.group_size != d or t.packed.dim() != 4 or t.packed.shape[:2] != (batch, kv_heads) or t.packed.shape[-1] != d // 2:
        raise ValueError(f"{what}: {name} must be packed per (token, kv-head) as [B={batch}, H_kv={kv_heads}, T, {d // 2}], "
                         f"got {tuple(t.packed.shape)} with group size {t.group_size}")
    if t.packed.stride(-1) != 1:
        raise ValueError(f"{what}: {name}.packed must be contiguous along head_dim")


def launch_splits(tokens: int, rows: int, sms: int, block_t: int | None = None,
                  num_splits: int | None = None) -> tuple[int, int, int]:
    """(block_t, tokens per split, splits) for `tokens` quantized tokens of `rows` (batch, kv-head) pairs on a GPU
    of `sms` SMs: about PROGRAMS_PER_SM programs per SM, splits of whole blocks; block_t None picks BLOCK_T, or
    LONG_BLOCK_T where the splits would hold more than LONG_SPLIT_TOKENS tokens."""
    wanted = max(1, PROGRAMS_PER_SM * sms // rows) if num_splits is None else num_splits
    if block_t is None:
        block_t = LONG_BLOCK_T if tokens > LONG_SPLIT_TOKENS * min(wanted, cdiv(tokens, BLOCK_T)) else BLOCK_T
    blocks = cdiv(tokens, block_t)
    splits = max(0, min(wanted, blocks))
    chunk = block_t * cdiv(blocks, splits) if splits else block_t
    return block_t, chunk, cdiv(tokens, chunk) if tokens else 0


@on_input_device
def p3_decode_attention(
    query: torch.Tensor,
    kv: QuantizedKV,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    prob_rounding: str = "nearest_even",
    block_t: int | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention output [B, H, 1, D] (out_dtype: float32, or bf16 / fp16 rounded once from the fp32 sum) for one
    query token per sequence over a P3 cache.

    query [B, H, 1, D]; kv: INT4 keys/values per (token, kv-head) (strided views allowed), smoothing
    [B, H_kv, 1, D] float32 or None, residual_keys/values [B, H_kv, R, D]; mask [B, n + R] bool (True =
    attend) or None. Queries are FP8-quantized when the cache holds quantized keys (as the reference does).
    With kv.length (a static cache, see p3quant.nn.static_cache) keys/values span the storage, the kernels
    read the token count from the device, the window is a ring, and the mask is [B, capacity] by position:
    no launch argument depends on the count, so the call can be captured in a CUDA graph.
    """
    what = "p3_decode_attention"
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"{what}: query must be [B, H, 1, D], got {tuple(query.shape)}")
    if kv.dense_keys is not None or kv.dense_values is not None:
        raise ValueError(f"{what}: caches with 16-bit (dense) non-residual tokens are not supported; use the torch backend")
    if prob_rounding not in ("nearest_even", "half_up"):
        raise ValueError(f"{what}: prob_rounding must be 'nearest_even' or 'half_up', got {prob_rounding!r}")
    bsz, heads, _, d = query.shape
    rk, rv = kv.residual_keys, kv.residual_values
    if rk.dim() != 4 or rk.shape[0] != bsz or rk.shape[-1] != d or rv.shape != rk.shape:
        raise ValueError(f"{what}: residual keys/values must be [B, H_kv, R, {d}], got {tuple(rk.shape)} / {tuple(rv.shape)}")
    kv_heads = rk.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{what}: {heads} query heads must be a multiple of {kv_heads} kv heads")
    if d % 8:
        raise ValueError(f"{what}: head_dim {d} must be a multiple of 8 (the kernels read 8 packed codes per 32-bit "
                         "word); use the torch backend otherwise")
    if rk.stride(-1) != 1 or rv.stride(-1) != 1:
        raise ValueError(f"{what}: residual keys/values must be contiguous along head_dim")
    quantized = kv.keys is not None
    if quantized != (kv.values is not None):
        raise ValueError(f"{what}: keys and values must both be quantized or both absent")
    n_quant = 0
    if quantized:
        _check_int4(what, "keys", kv.keys, bsz, kv_heads, d)
        _check_int4(what, "values", kv.values, bsz, kv_heads, d)
        n_quant = kv.keys.packed.shape[2]
        if kv.values.packed.shape[2] != n_quant:
            raise ValueError(f"{what}: {n_quant} quantized keys but {kv.values.packed.shape[2]} values")
    device_len = kv.length is not None
    if device_len:  # static cache: n_quant is the storage capacity here; the kernels read the live count
        if not quantized or kv.length.shape != (1,) or kv.length.dtype != torch.int64:
            raise ValueError(f"{what}: a device-side length needs quantized keys/values and a [1] int64 tensor")
        if rk.shape[2] < 1:
            raise ValueError(f"{what}: a static cache needs a residual ring of at least one slot")
    sm = kv.smoothing
    if sm is not None:
        if sm.shape != (bsz, kv_heads, 1, d) or sm.dtype != torch.float32 or sm.stride(-1) != 1:
            raise ValueError(f"{what}: smoothing must be float32 [B, H_kv, 1, D] contiguous along D, got {tuple(sm.shape)} {sm.dtype}")
    n_res = rk.shape[2]
    total = n_quant if device_len else n_quant + n_res  # a static cache's mask spans its storage positions
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (bsz, total):
            raise ValueError(f"{what}: mask must be bool [B, {total}], got {tuple(mask.shape)} {mask.dtype}")
        mask = mask.contiguous().view(torch.uint8)
    require_device(what, query, rk, rv, sm, mask, kv.keys.packed if quantized else None, kv.length)
    q = query[:, :, 0, :]
    if q.stride(-1) != 1:
        q = q.contiguous()

    group = heads // kv_heads
    gp = max(16, next_power_of_2(group))
    if block_t is None and interpreting():
        block_t = 64  # fewer, smaller programs in the interpreter
    block_t, chunk, num_splits = launch_splits(n_quant, bsz * kv_heads, _num_sms(query.device), block_t, num_splits)
    s1 = num_splits + 1
    dev = query.device
    scores = torch.empty((bsz, heads, max(total, 1)), dtype=torch.float32, device=dev)
    m_stat = torch.empty((bsz * heads, s1), dtype=torch.float32, device=dev)
    l_stat = torch.empty_like(m_stat)
    v_max = torch.empty((bsz * kv_heads, s1), dtype=torch.float32, device=dev)
    partial = torch.empty((bsz * heads, s1, d), dtype=torch.float32, device=dev)

    if quantized:
        kp, ks, kz = _words(what, "keys", kv.keys.packed), kv.keys.scales, kv.keys.zeros
        vp, vs, vz = _words(what, "values", kv.values.packed), kv.values.scales, kv.values.zeros
    else:  # typed stand-ins that no load reaches (there are no quantized tokens)
        kp = vp = torch.empty((1, 1, 1, 1), dtype=torch.int32, device=dev)
        ks = vs = torch.empty((1, 1, 1, 1), dtype=torch.float16, device=dev)
        kz = vz = torch.empty((1, 1, 1, 1), dtype=torch.uint8, device=dev)
    sm_arg = sm if sm is not None else rk
    mask_arg = mask if mask is not None else rk
    grid = (bsz * kv_heads, s1)
    # DW >= 8: quarter-planes (the scores pass) of at least 16 columns, the smallest tensor-core dot
    shape = dict(G=group, GP=gp, G4=next_power_of_2(group), D8=d // 8, DW=max(8, next_power_of_2(d // 8)), BLOCK_T=block_t, BLOCK_R=_BLOCK_R,
                 USE_ASM=ATTENTION_USE_ASM and nvidia_compiled(query.device))
    len_arg = kv.length if device_len else m_stat
    _scores_kernel[grid](
        q, sm_arg, kp, ks, kz, vs, rk, mask_arg, scores, m_stat, l_stat, v_max, len_arg,
        n_quant, n_res, chunk, float(scaling), float(softcap or 1.0), kv_heads, num_splits,
        q.stride(0), q.stride(1), sm_arg.stride(0), sm_arg.stride(1),
        kp.stride(0), kp.stride(1), kp.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        kz.stride(0), kz.stride(1), kz.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        rk.stride(0), rk.stride(1), rk.stride(2), mask_arg.stride(0), scores.stride(0), scores.stride(1),
        HAS_SMOOTH=sm is not None, QUANT_Q=quantized, HAS_MASK=mask is not None, HAS_SOFTCAP=softcap is not None,
        DEVICE_LEN=device_len, NATIVE_E4M3=native_e4m3(q.device), num_warps=NUM_WARPS, **shape, **pdl_launch(q),
    )
    _pv_kernel[grid](
        vp, vs, vz, rv, scores, m_stat, l_stat, v_max, partial, len_arg,
        n_quant, n_res, chunk, kv_heads, num_splits,
        vp.stride(0), vp.stride(1), vp.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        vz.stride(0), vz.stride(1), vz.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
        scores.stride(0), scores.stride(1),
        SP=next_power_of_2(s1), HALF_UP=prob_rounding == "half_up", DEVICE_LEN=device_len, num_warps=NUM_WARPS, **shape,
        **pdl_launch(q),
    )
    out = torch.empty((bsz, heads, 1, d), dtype=out_dtype, device=dev)
    _combine_kernel[(bsz * heads,)](partial, out, s1, d, BLOCK_S=16, BLOCK_D=next_power_of_2(d), num_warps=4,
                                      **pdl_launch(q))
    return out


def decode_mask(attention_mask: torch.Tensor | None, batch: int, total: int) -> torch.Tensor | None:
    """Reduce an HF decode mask ([B, 1, 1, T] or [B, T]; bool, or additive 0 / very negative) to bool [B, T].

    Additive entries count as masked when <= finfo(dtype).min / 2 (HF writes finfo.min or -inf there);
    any other value counts as visible, so additive biases other than masking are not supported (callers
    must route those to the reference).
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
    elif m.dim() != 2:
        raise ValueError(f"decode_mask: expected a [B, 1, Tq, T] or [B, T] mask, got {tuple(attention_mask.shape)}")
    m = m[..., :total]
    if m.shape[-1] != total:
        raise ValueError(f"decode_mask: mask covers {m.shape[-1]} keys, the cache holds {total}")
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(batch, total)


__all__ = ["p3_decode_attention", "decode_mask", "launch_splits"]
