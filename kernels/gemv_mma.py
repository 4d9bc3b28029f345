"""Decode GEMV (M <= 16 tokens) on tensor cores, with the packed weights decoded straight into MMA registers.

y = Q_act(x) @ W^T + bias for a few tokens. Each warp runs `mma.sync.m16n8k16` from inline PTX with 16 weight
rows as the left operand and up to 8 tokens as the right one (a second MMA per fragment for tokens 8..15), so a
weight costs its decode and 1/8 of an MMA instruction instead of a decode, a widening and an FMA per token on
CUDA cores (the CUDA-core GEMV's loop ran 43 instructions per 8 weights; this one needs about 20).

No shared memory and no weight reordering: the MMA fragment is chosen to match what each lane loads anyway.
In the [VEC, B, S, 8, 4] register tiles below, lane = 4 g + c (g = lane // 4 is the MMA's "group" row, c =
lane % 4 its thread-in-group), S is the warp and VEC, B stay in the lane's registers. Lane (g, c) holds, for
each of its groups, the VEC = GROUP / 32 consecutive int32 words c*VEC .. c*VEC + VEC - 1 of weight rows g
(top) and g + 8 (bottom) and of the activation planes of token g. For one word j (8 codes, decoded to the fp16
pairs p0 = (c0, c1) .. p3 = (c6, c7)), two chained MMAs take

    A = (top p0, bottom p0, top p1, bottom p1), B = (x p0, x p1)   then   (p2, p3) likewise,

which is the m16n8k16 fragment of A[16 rows, 16 k] and B[16 k, 8 tokens] whose k index runs over the four
lanes of a quad and the pairs of their word: one MMA pair sums, for each row and token, 8 codes x 4 lanes = the
32 weights of words {c*VEC + j : c < 4} of that row, all inside one quantization group. The result fragment
(d0, d1 = rows g, tokens 2c, 2c + 1; d2, d3 = row g + 8) is scaled by the group scale and accumulated in fp32;
at the end each lane sums its VEC x B partials, the warps (which split K) are summed, and lane (g, c) writes
tokens 2c, 2c + 1 of rows g and g + 8.

Activations come in "pairs" order (act_quant: plane q of a row holds the fp16 pairs (x[8w + 2q], x[8w + 2q + 1])
of every word w), so a lane's pairs for VEC words are one vector load per plane, laid out like its weights.
W4A8: the FP8 codes as fp16 (exact), token scales applied at the end; W4A16: the 16-bit activations, with the
weights decoded to the same 16-bit type. Products are exact (|code| <= 448 times an integer <= 16 in fp16, or
a bf16 activation times such an integer), accumulation fp32.

Under the Triton interpreter (no inline PTX) `_mma_pair_emulated` computes the same fragments with tensor ops;
the lane mapping itself is checked where it matters, on the GPU (benchmarks/gpu_check.py), and by the sm_90
compile test, which asserts the register layout the mapping relies on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import bitmod_special2, decode_tables, decode_w4, decode_word_ptx

SUPPORTED_GROUPS = (64, 128)  # VEC = GROUP / 32 words per lane and group; at 32 a lane's single word would
# make the quad's words contiguous, and Triton would vectorise the loads across lanes that must stay apart.
MAX_M = 16
K_PER_STEP = 128  # k per warp and loop step (B = 128 / GROUP groups)
_K_STEP = tl.constexpr(K_PER_STEP)


def _mma_pair_ptx(tiles: int, bf16: bool) -> str:
    """PTX for one lane's share of two chained m16n8k16 MMAs per token tile (see the module docstring).

    Operands: outputs $0 .. $(4 tiles - 1) (d0..d3 per tile, fp32); then the top and bottom words, their four
    decode tables each, four activation pairs per tile, m64 and bias (and `one` for bf16): decode_word_ptx's."""
    n_out = 4 * tiles
    i = n_out
    wt, wb = f"${i}", f"${i + 1}"
    tt = tuple(f"${i + 2 + t}" for t in range(4))
    tb = tuple(f"${i + 6 + t}" for t in range(4))
    xs = [tuple(f"${i + 10 + 4 * tile + q}" for q in range(4)) for tile in range(tiles)]
    base = i + 10 + 4 * tiles
    m64, bias = f"${base}", f"${base + 1}"
    one = f"${base + 2}" if bf16 else None
    kind = "bf16" if bf16 else "f16"
    body = "{\n.reg .b32 t0, t1, t2, t3, u0, u1, u2, u3;\n.reg .f32 z;\nmov.f32 z, 0f00000000;\n"
    body += decode_word_ptx(("t0", "t1", "t2", "t3"), wt, tt, m64, bias, one=one) + "\n"
    body += decode_word_ptx(("u0", "u1", "u2", "u3"), wb, tb, m64, bias, one=one) + "\n"
    for tile in range(tiles):
        d = ", ".join(f"${4 * tile + r}" for r in range(4))
        x = xs[tile]
        body += f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{{d}}}, {{t0, u0, t1, u1}}, {{{x[0]}, {x[1]}}}, {{z, z, z, z}};\n"
        body += f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{{d}}}, {{t2, u2, t3, u3}}, {{{x[2]}, {x[3]}}}, {{{d}}};\n"
    return body + "}"


def _constraints(tiles: int, bf16: bool) -> str:
    return ",".join(["=f"] * (4 * tiles) + ["r"] * (10 + 4 * tiles + (3 if bf16 else 2)))


_PTX_1_F16 = tl.constexpr(_mma_pair_ptx(1, False))
_PTX_1_BF16 = tl.constexpr(_mma_pair_ptx(1, True))
_PTX_2_F16 = tl.constexpr(_mma_pair_ptx(2, False))
_PTX_2_BF16 = tl.constexpr(_mma_pair_ptx(2, True))
_CONS_1_F16 = tl.constexpr(_constraints(1, False))
_CONS_1_BF16 = tl.constexpr(_constraints(1, True))
_CONS_2_F16 = tl.constexpr(_constraints(2, False))
_CONS_2_BF16 = tl.constexpr(_constraints(2, True))


@triton.jit
def _mma_pair_asm(wt, wb, at, ab, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3,
                  IS_BITMOD: tl.constexpr, TILES: tl.constexpr, BF16: tl.constexpr):
    """Fragments (d0..d3 per token tile) of one lane's MMA pairs, by inline PTX (GPU only)."""
    tt0, tt1, tt2, tt3 = decode_tables(at, IS_BITMOD)
    tb0, tb1, tb2, tb3 = decode_tables(ab, IS_BITMOD)
    ops = [wt, wb, tl.broadcast_to(tt0, wt.shape), tl.broadcast_to(tt1, wt.shape), tl.broadcast_to(tt2, wt.shape),
           tl.broadcast_to(tt3, wt.shape), tl.broadcast_to(tb0, wt.shape), tl.broadcast_to(tb1, wt.shape),
           tl.broadcast_to(tb2, wt.shape), tl.broadcast_to(tb3, wt.shape), xa0, xa1, xa2, xa3]
    if TILES == 2:
        ops = ops + [xb0, xb1, xb2, xb3]
    if BF16:  # m64 = bf16 128 + byte, bias = bf16x2 (-144, -144), one = bf16x2 (1, 1): see decode_word_ptx
        ops = ops + [tl.full(wt.shape, 0x43434343, tl.int32), tl.full(wt.shape, -1022311664, tl.int32),
                     tl.full(wt.shape, 0x3F803F80, tl.int32)]
    else:  # m64 = fp16 1024 + byte, bias = fp16x2 (1040, 1040)
        ops = ops + [tl.full(wt.shape, 0x64646464, tl.int32), tl.full(wt.shape, 0x64106410, tl.int32)]
    if TILES == 1:
        if BF16:
            d = tl.inline_asm_elementwise(_PTX_1_BF16, _CONS_1_BF16, ops, dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            d = tl.inline_asm_elementwise(_PTX_1_F16, _CONS_1_F16, ops, dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return d[0], d[1], d[2], d[3], d[0], d[1], d[2], d[3]
    else:
        if BF16:
            e = tl.inline_asm_elementwise(_PTX_2_BF16, _CONS_2_BF16, ops, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            e = tl.inline_asm_elementwise(_PTX_2_F16, _CONS_2_F16, ops, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        return e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]


@triton.jit
def _pair_values(plane, BF16: tl.constexpr):
    """The two 16-bit values (low half first) of each int32 of an activation plane, as fp32."""
    lo = plane & 0xFFFF
    hi = (plane >> 16) & 0xFFFF
    if BF16:
        return (lo << 16).to(tl.float32, bitcast=True), (hi << 16).to(tl.float32, bitcast=True)
    else:
        return (lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _quad_products(w, aux, x0, x1, x2, x3, IS_BITMOD: tl.constexpr, BF16: tl.constexpr):
    """[..., 8 rows g, 8 tokens n]: sum over the quad (c) and the word's 8 codes of weight x activation."""
    total = tl.zeros([w.shape[0], w.shape[1], w.shape[2], 8, 8], tl.float32)
    for q in tl.static_range(4):
        if q == 0:
            plane = x0
        elif q == 1:
            plane = x1
        elif q == 2:
            plane = x2
        else:
            plane = x3
        xe, xo = _pair_values(plane, BF16)
        we = decode_w4((w >> (8 * q)) & 15, aux, IS_BITMOD).to(tl.float32)
        wo = decode_w4((w >> (8 * q + 4)) & 15, aux, IS_BITMOD).to(tl.float32)
        total += tl.sum(we[:, :, :, :, None, :] * xe[:, :, :, None, :, :], axis=5)
        total += tl.sum(wo[:, :, :, :, None, :] * xo[:, :, :, None, :, :], axis=5)
    return total


@triton.jit
def _fragments(total):
    """Result fragment of lane (g, c) from the [..., g, n] product: (row g, token 2c) and (row g, token 2c + 1)."""
    pairs = tl.reshape(total, [total.shape[0], total.shape[1], total.shape[2], 8, 4, 2])
    return tl.split(pairs)


@triton.jit
def _mma_pair_emulated(wt, wb, at, ab, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3,
                       IS_BITMOD: tl.constexpr, TILES: tl.constexpr, BF16: tl.constexpr):
    """_mma_pair_asm's fragments with tensor ops (interpreter): the same sums in another order."""
    a_t = at.to(tl.int32)
    a_b = ab.to(tl.int32)
    if IS_BITMOD:
        a_t = bitmod_special2(a_t)
        a_b = bitmod_special2(a_b)
    a_t = tl.broadcast_to(a_t, wt.shape)
    a_b = tl.broadcast_to(a_b, wb.shape)
    d0, d1 = _fragments(_quad_products(wt, a_t, xa0, xa1, xa2, xa3, IS_BITMOD, BF16))
    d2, d3 = _fragments(_quad_products(wb, a_b, xa0, xa1, xa2, xa3, IS_BITMOD, BF16))
    if TILES == 2:
        e0, e1 = _fragments(_quad_products(wt, a_t, xb0, xb1, xb2, xb3, IS_BITMOD, BF16))
        e2, e3 = _fragments(_quad_products(wb, a_b, xb0, xb1, xb2, xb3, IS_BITMOD, BF16))
        return d0, d1, d2, d3, e0, e1, e2, e3
    return d0, d1, d2, d3, d0, d1, d2, d3


@triton.jit
def _load_step(words_ptr, x_ptr, s_ptr, aux_ptr, top, bottom, grp, wig, tok, zc, M, KW, n_groups, limit,
               stride_ww, stride_xm, stride_sn, stride_an, GROUP: tl.constexpr, TILES: tl.constexpr):
    """One loop step's weights, activation planes, scales and selectors / zero points. Groups at or past
    `limit` (the warp's end) read a valid group with scale 0, so they add exactly 0; tokens past M read token
    M - 1, whose duplicate columns are never stored: no masks, so the big loads need no zero fill."""
    WPG: tl.constexpr = GROUP // 8
    word = tl.minimum(grp, n_groups - 1) * WPG + wig
    wt = tl.load(words_ptr + top * stride_ww + word)
    wb = tl.load(words_ptr + bottom * stride_ww + word)
    xa = x_ptr + tl.minimum(tok, M - 1) * stride_xm + word
    xa0 = tl.load(xa)
    xa1 = tl.load(xa + KW)
    xa2 = tl.load(xa + 2 * KW)
    xa3 = tl.load(xa + 3 * KW)
    if TILES == 2:
        xb = x_ptr + tl.minimum(tok + 8, M - 1) * stride_xm + word
        xb0 = tl.load(xb)
        xb1 = tl.load(xb + KW)
        xb2 = tl.load(xb + 2 * KW)
        xb3 = tl.load(xb + 3 * KW)
    else:
        xb0, xb1, xb2, xb3 = xa0, xa1, xa2, xa3
    # per (row, group): [1, B, S, 8, 4], one copy per lane of the quad (zc, zeros along c) so that it
    # broadcasts over the lane's words in registers
    live = grp < limit
    gq = tl.minimum(grp, n_groups - 1) + zc
    st = tl.load(s_ptr + top * stride_sn + gq, mask=live, other=0.0)
    sb = tl.load(s_ptr + bottom * stride_sn + gq, mask=live, other=0.0)
    at = tl.load(aux_ptr + top * stride_an + gq)
    ab = tl.load(aux_ptr + bottom * stride_an + gq)
    return wt, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, st, sb, at, ab


@triton.jit
def _gemv_mma_kernel(
    x_ptr, xs_ptr, words_ptr, s_ptr, aux_ptr, b_ptr, y_ptr,
    M, N, K, KW, stride_xm, stride_ww, stride_sn, stride_an, stride_ym,
    GROUP: tl.constexpr, WARPS: tl.constexpr, TILES: tl.constexpr, IS_BITMOD: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, BF16: tl.constexpr, USE_ASM: tl.constexpr,
    ODD_TOKENS: tl.constexpr,
):
    """16 output rows per program; its WARPS warps split K group by group (see the module docstring).

    x: int32 view of the activation pairs [M, K / 2] in act_quant's "pairs" order (planes of KW = K / 8) (W4A8: fp16 FP8 codes with
    token scales xs (ROW_SCALE); W4A16: bf16 (BF16) or fp16 activations). words: int32 [N, K / 8]."""
    VEC: tl.constexpr = GROUP // 32
    B: tl.constexpr = _K_STEP // GROUP
    pid = tl.program_id(0)
    j = tl.reshape(tl.arange(0, VEC), [VEC, 1, 1, 1, 1])
    b = tl.reshape(tl.arange(0, B), [1, B, 1, 1, 1])
    s = tl.reshape(tl.arange(0, WARPS), [1, 1, WARPS, 1, 1])
    g = tl.reshape(tl.arange(0, 8), [1, 1, 1, 8, 1])
    c = tl.reshape(tl.arange(0, 4), [1, 1, 1, 1, 4])
    zc = c * 0
    top = tl.minimum(pid * 16 + g, N - 1)  # rows past N load row N - 1; their results are never stored
    bottom = tl.minimum(pid * 16 + 8 + g, N - 1)
    wig = c * VEC + j  # the lane's words within its group
    n_groups = K // GROUP
    acc0 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc1 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc2 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc3 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc4 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc5 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc6 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    acc7 = tl.zeros([VEC, B, WARPS, 8, 4], tl.float32)
    # warp s takes the contiguous run of steps [s * per_warp, (s + 1) * per_warp); software prefetch: the next
    # step's loads are in flight while this one computes
    per_warp = tl.cdiv(n_groups, WARPS * B)
    grp = s * (per_warp * B) + b
    limit = tl.minimum(n_groups, (s + 1) * (per_warp * B))
    wt, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, st, sb, at, ab = _load_step(
        words_ptr, x_ptr, s_ptr, aux_ptr, top, bottom, grp, wig, g, zc, M, KW, n_groups, limit,
        stride_ww, stride_xm, stride_sn, stride_an, GROUP, TILES)
    for step in range(1, per_warp + 1):
        nwt, nwb, nxa0, nxa1, nxa2, nxa3, nxb0, nxb1, nxb2, nxb3, nst, nsb, nat, nab = _load_step(
            words_ptr, x_ptr, s_ptr, aux_ptr, top, bottom, grp + step * B, wig, g, zc, M, KW, n_groups, limit,
            stride_ww, stride_xm, stride_sn, stride_an, GROUP, TILES)
        if USE_ASM:
            d0, d1, d2, d3, e0, e1, e2, e3 = _mma_pair_asm(wt, wb, at, ab, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3,
                                                           IS_BITMOD, TILES, BF16)
        else:
            d0, d1, d2, d3, e0, e1, e2, e3 = _mma_pair_emulated(wt, wb, at, ab, xa0, xa1, xa2, xa3, xb0, xb1, xb2,
                                                                xb3, IS_BITMOD, TILES, BF16)
        st = st.to(tl.float32)
        sb = sb.to(tl.float32)
        acc0 += d0 * st
        acc2 += d2 * sb
        if ODD_TOKENS:  # tokens 2c + 1: absent when M == 1
            acc1 += d1 * st
            acc3 += d3 * sb
        if TILES == 2:
            acc4 += e0 * st
            acc5 += e1 * st
            acc6 += e2 * sb
            acc7 += e3 * sb
        wt, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3 = nwt, nwb, nxa0, nxa1, nxa2, nxa3, nxb0, nxb1, nxb2, nxb3
        st, sb, at, ab = nst, nsb, nat, nab
    gg = tl.reshape(tl.arange(0, 8), [8, 1])
    cc = tl.reshape(tl.arange(0, 4), [1, 4])
    _store_fragment(acc0, xs_ptr, b_ptr, y_ptr, pid * 16 + gg, 2 * cc, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
    _store_fragment(acc2, xs_ptr, b_ptr, y_ptr, pid * 16 + 8 + gg, 2 * cc, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
    if ODD_TOKENS:
        _store_fragment(acc1, xs_ptr, b_ptr, y_ptr, pid * 16 + gg, 2 * cc + 1, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
        _store_fragment(acc3, xs_ptr, b_ptr, y_ptr, pid * 16 + 8 + gg, 2 * cc + 1, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
    if TILES == 2:
        _store_fragment(acc4, xs_ptr, b_ptr, y_ptr, pid * 16 + gg, 8 + 2 * cc, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
        _store_fragment(acc5, xs_ptr, b_ptr, y_ptr, pid * 16 + gg, 9 + 2 * cc, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
        _store_fragment(acc6, xs_ptr, b_ptr, y_ptr, pid * 16 + 8 + gg, 8 + 2 * cc, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)
        _store_fragment(acc7, xs_ptr, b_ptr, y_ptr, pid * 16 + 8 + gg, 9 + 2 * cc, M, N, stride_ym, IS_BITMOD, HAS_BIAS, ROW_SCALE)


@triton.jit
def _store_fragment(acc, xs_ptr, b_ptr, y_ptr, rows, tokens, M, N, stride_ym,
                    IS_BITMOD: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr):
    """Sum a fragment accumulator over the lane's words and the warps, finish and store y[tokens, rows]."""
    out = tl.sum(tl.sum(tl.sum(acc, axis=0), axis=0), axis=0)  # [8 rows g, 4 lanes c]
    mask = (rows < N) & (tokens < M)
    if ROW_SCALE:
        out = out * tl.load(xs_ptr + tokens, mask=tokens < M, other=0.0)
    if IS_BITMOD:
        out = out * 0.5
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + tokens * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=mask)


WARPS_PER_SM = 16  # split K over a program's warps until the grid holds about this many warps per SM
WARPS_OVERRIDE: int | None = None  # benchmarks only: a fixed warp count per program
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a small "GPU", so that tests split K over several warps
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def warps_for(n: int, k: int, group: int, device: torch.device) -> int:
    """Warps per program (each takes every WARPS-th loop step of K): enough for WARPS_PER_SM warps per SM over
    the N / 16 programs, at most 8 and at most the number of steps."""
    if WARPS_OVERRIDE is not None:
        return WARPS_OVERRIDE
    programs = triton.cdiv(n, 16)
    steps = triton.cdiv(k, K_PER_STEP)
    want = triton.cdiv(WARPS_PER_SM * _sm_count(device), programs)
    return max(1, min(8, triton.next_power_of_2(want), triton.next_power_of_2(steps)))


def gemv_mma(x_pairs: torch.Tensor, x_scales: torch.Tensor | None, words: torch.Tensor, scales: torch.Tensor,
             aux: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, group: int, is_bitmod: bool,
             use_asm: bool) -> None:
    """y [M, N] = x @ W^T (+ bias) for M <= 16 (callers validate: gemm_w4.w4_matmul).

    x_pairs [M, K] in act_quant's "pairs" order: W4A8 fp16 FP8 codes with x_scales fp32 [M]; W4A16 bf16 or
    fp16 activations with x_scales None. words: the packed weight as int32 [N, K / 8]; group 64 or 128."""
    m, k = x_pairs.shape
    n = words.shape[0]
    warps = warps_for(n, k, group, y.device)
    row_scale = x_scales is not None
    xs_arg = x_scales if row_scale else scales
    _gemv_mma_kernel[(triton.cdiv(n, 16),)](
        x_pairs.view(torch.int32), xs_arg, words, scales, aux, bias if bias is not None else xs_arg, y,
        m, n, k, k // 8, x_pairs.stride(0) // 2, words.stride(0), scales.stride(0), aux.stride(0), y.stride(0),
        GROUP=group, WARPS=warps, TILES=1 if m <= 8 else 2, IS_BITMOD=is_bitmod, HAS_BIAS=bias is not None,
        ROW_SCALE=row_scale, BF16=x_pairs.dtype == torch.bfloat16, USE_ASM=use_asm, ODD_TOKENS=m > 1,
        num_warps=warps, num_stages=1)
