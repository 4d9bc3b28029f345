"""Decode GEMV (W4A8, M <= 8 tokens) on FP8 tensor cores, the packed weights decoded straight into MMA registers.

y = Q_act(x) @ W^T + bias for a few tokens. The CUDA-core GEMV spends ~43 instructions per 8 weights (a table
decode to fp16, a widening to fp32 and an FMA per weight). Here every weight is looked up as its exact FP8-E4M3
byte (BitMoD's grid x 2 and its special value, or an INT4 code, are all E4M3 numbers) and multiplied by the FP8
activation codes in `mma.sync.m16n8k32.e4m3` from inline PTX: ~15 instructions per 8 weights (BitMoD; INT4 9) plus
1/2 MMA, with 16 output rows as the MMA's left operand and the tokens as its right one.

Lanes and fragments. In the [VEC, R, S, 8, 4] register tiles below, lane = 4 g + c (g = lane // 4 is the MMA's
group row, c = lane % 4 its thread in the group), S is the warp, VEC and R stay in the lane's registers. Lane
(g, c) holds, for each group, the VEC = GROUP / 32 consecutive int32 words c*VEC .. c*VEC + VEC - 1 of weight rows
g (top) and g + 8 (bottom) of each of the program's R tiles of 16 rows, and the FP8 codes of token g for the same
words. Word j of a lane (8 codes, k = 8w .. 8w + 7) feeds one MMA: its codes 0..3 as fragment register a0 (top)
/ a1 (bottom), codes 4..7 as a2 / a3, and the token's codes of that word as b0 (k 8w .. 8w + 3) and b1. The MMA
sums over k-slots 4c .. 4c + 3 and 16 + 4c .. 16 + 4c + 3 of the four lanes of a quad, which this assignment maps
to the 32 weights of words {c*VEC + j : c < 4}: every row and token sees the same k in A and B, all in one group.
Summing over j and scaling by the group scale in fp32 gives the group's share; result fragment d0, d1 = row g,
tokens 2c, 2c + 1; d2, d3 = row g + 8.

Activations come in act_quant's "halves" order as FP8 bytes (plane 0 holds codes 0..3 of every word, plane 1
codes 4..7), so a lane's b0 (b1) values for its VEC words are one vector load from plane 0 (1).

The E4M3 lookup (per 4 codes, one prmt each): P = positive codes' bytes (code & 8 makes prmt replicate the sign
of a byte < 0x80: 0), N = magnitudes of codes 8..15 (selected by code ^ 8), S = a sign table whose selected or
replicated byte has bit 0 set exactly for non-negative values; the result is P | N with bit 0 of ~S moved to the
sign bit. BitMoD's special value (code 8) may have either sign: its group's S byte 0 is 0xFF for a positive one.
INT4 codes 0..15 are non-negative: P | N, and the zero point is subtracted as zp x (sum of the group's
activations), that sum taken by one more MMA with an all-ones left operand (shared by the program's row tiles).

Precision: products of E4M3 values (4 significant bits each) are exact; the tensor core sums a group's 32-k
slices in fp32 but, on Hopper, keeps fewer mantissa bits than IEEE fp32 inside one MMA (as for any FP8 GEMM);
each group's sum is then scaled and accumulated in IEEE fp32. Measured against the float64 product of the same
quantized operands in benchmarks/gpu_check.py.

Under the Triton interpreter (no inline PTX) `_mma_emulated` computes the same fragments with tensor ops; the lane
mapping is checked on the GPU (benchmarks/gpu_check.py: kernel vs float64 and vs its emulation compiled there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import bitmod_special2, decode_w4

SUPPORTED_GROUPS = (64, 128)  # VEC = GROUP / 32 words per lane and group (8- and 16-byte loads)
MAX_M = 8  # tokens are the MMA's 8 columns

# e4m3 bytes of BitMoD's grid x 2: codes 0..3 -> 0, 1, 2, 3; 4..7 -> 4, 6, 8, 12 (also the magnitudes of 12..15)
_BM_P0, _BM_P1 = tl.constexpr(0x44403800), tl.constexpr(0x54504C48)
# INT4 codes as e4m3: 0..3, 4..7, 8..11, 12..15
_I4_T0, _I4_T1 = tl.constexpr(0x44403800), tl.constexpr(0x4E4C4A48)
_I4_T2, _I4_T3 = tl.constexpr(0x53525150), tl.constexpr(0x57565554)
_ONES = tl.constexpr(0x38383838)  # four e4m3 1.0


def _decode_half_ptx(out: str, sel: str, seln: str, bitmod: bool, tables: tuple[str, ...]) -> str:
    """PTX: the e4m3 bytes of the four codes in the low 16 bits of `sel` (seln = sel ^ 0x8888) into `out`."""
    if not bitmod:
        t0, t1, t2, t3 = tables
        return f"""prmt.b32 P, {t0}, {t1}, {sel};
prmt.b32 N, {t2}, {t3}, {seln};
or.b32 {out}, P, N;
"""
    p0, p1, n0, n1, s0, s1 = tables
    return f"""prmt.b32 P, {p0}, {p1}, {sel};
prmt.b32 N, {n0}, {n1}, {seln};
prmt.b32 S, {s0}, {s1}, {sel};
or.b32 P, P, N;
shl.b32 S, S, 7;
lop3.b32 {out}, P, S, 0x80808080, 0xF2;
"""


def _decode_word_ptx(outs: tuple[str, str], word: str, bitmod: bool, tables: tuple[str, ...]) -> str:
    """PTX: one int32 word of 8 codes into its two e4m3 fragment registers (codes 0..3, codes 4..7)."""
    return f"""xor.b32 wn, {word}, 0x88888888;
shr.u32 wh, {word}, 16;
shr.u32 wnh, wn, 16;
""" + _decode_half_ptx(outs[0], word, "wn", bitmod, tables) + _decode_half_ptx(outs[1], "wh", "wnh", bitmod, tables)


def _mma_ptx(bitmod: bool) -> str:
    """One lane's share of one MMA (see the module docstring). Operands: $0..$3 d0..d3 (fp32); $4 top word,
    $5 bottom word, $6 / $7 the token's codes 0..3 / 4..7 of that word; then the tables: BitMoD $8, $9 the
    positive bytes, $10 the top row's magnitudes of codes 8..11, $11 those of 12..15, $12 / $13 the top and
    bottom sign tables' low word, $14 the bottom row's magnitudes of codes 8..11, $15 the sign tables' high
    word; INT4 $8..$11 the four constant tables."""
    if bitmod:
        top = ("$8", "$9", "$10", "$11", "$12", "$15")
        bottom = ("$8", "$9", "$14", "$11", "$13", "$15")
    else:
        top = bottom = ("$8", "$9", "$10", "$11")
    body = "{\n.reg .b32 wn, wh, wnh, P, N, S, a0, a1, a2, a3;\n.reg .f32 z;\nmov.f32 z, 0f00000000;\n"
    body += _decode_word_ptx(("a0", "a2"), "$4", bitmod, top)
    body += _decode_word_ptx(("a1", "a3"), "$5", bitmod, bottom)
    body += "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$6, $7}, {z, z, z, z};\n"
    return body + "}"


_PTX_BITMOD = tl.constexpr(_mma_ptx(True))
_PTX_INT4 = tl.constexpr(_mma_ptx(False))
_CONS_BITMOD = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 12))
_CONS_INT4 = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 8))
# the activation sums of INT4's zero-point term: an MMA with every weight 1.0
_PTX_ONES = tl.constexpr("""{
.reg .f32 z;
mov.f32 z, 0f00000000;
mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {$0, $1, $2, $3}, {$6, $6, $6, $6}, {$4, $5}, {z, z, z, z};
}""")


@triton.jit
def _bitmod_tables(sel):
    """Per (row, group) lookup words from the 2-bit selector (special x2: 0 -> -10, 1 -> +10, 2 -> -16, 3 -> +16):
    magnitudes of codes 8..11 (|special|, 1, 2, 3) and the sign table's low word (byte 0 = 0xFF for a positive
    special value)."""
    sel = sel.to(tl.int32)
    n0 = 0x44403800 | tl.where(sel >= 2, 0x58, 0x52)
    s0 = tl.where((sel & 1) == 1, 0x7F7F7FFF, 0x7F7F7F7F)
    return n0, s0


@triton.jit
def _mma_asm(wt, wb, xlo, xhi, at, ab, IS_BITMOD: tl.constexpr):
    """d0..d3 of one lane's MMA per word (GPU only)."""
    if IS_BITMOD:
        nt, st = _bitmod_tables(at)
        nb, sb = _bitmod_tables(ab)
        ops = [wt, wb, xlo, xhi, tl.full(wt.shape, _BM_P0, tl.int32), tl.full(wt.shape, _BM_P1, tl.int32),
               tl.broadcast_to(nt, wt.shape), tl.full(wt.shape, _BM_P1, tl.int32), tl.broadcast_to(st, wt.shape),
               tl.broadcast_to(sb, wt.shape), tl.broadcast_to(nb, wt.shape), tl.full(wt.shape, 0x7F7F7F7F, tl.int32)]
        return tl.inline_asm_elementwise(_PTX_BITMOD, _CONS_BITMOD, ops, dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        ops = [wt, wb, xlo, xhi, tl.full(wt.shape, _I4_T0, tl.int32), tl.full(wt.shape, _I4_T1, tl.int32),
               tl.full(wt.shape, _I4_T2, tl.int32), tl.full(wt.shape, _I4_T3, tl.int32)]
        return tl.inline_asm_elementwise(_PTX_INT4, _CONS_INT4, ops, dtype=(tl.float32,) * 4, is_pure=True, pack=1)


@triton.jit
def _e4m3_values(codes):
    """The four e4m3 bytes of each int32 (byte i = element i) as fp32 values, [..., 4] along a new last axis."""
    b = (codes[:, :, :, :, :, None] >> (tl.arange(0, 4) * 8)) & 0xFF
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    normal = ((e + 120) << 23).to(tl.float32, bitcast=True) * (1.0 + m * 0.125)  # 2**(e - 7) (1 + m / 8)
    mag = tl.where(e == 0, m * 0.001953125, normal)  # subnormal: m * 2**-9
    return tl.where(b >= 128, -mag, mag)


@triton.jit
def _weight_values(words, aux, IS_BITMOD: tl.constexpr):
    """Codes 0..3 and 4..7 of each word as the values the PTX table lookup gives (BitMoD grid x 2, INT4 code)."""
    i = tl.arange(0, 4)
    lo = (words[:, :, :, :, :, None] >> (i * 4)) & 15
    hi = (words[:, :, :, :, :, None] >> (16 + i * 4)) & 15
    if IS_BITMOD:
        a = bitmod_special2(aux)[:, :, :, :, :, None]
        return decode_w4(lo, a, True).to(tl.float32), decode_w4(hi, a, True).to(tl.float32)
    else:
        return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _quad_sum(wlo, whi, xlo, xhi):
    """[..., g rows, n tokens]: for each row g and token n, sum over the quad's lanes c and the word's 8 codes of
    weight (lane (g, c)) x activation (lane (n, c)); inputs [VEC, R, S, 8, 4, 4] (.., rows/tokens, c, code)."""
    lo = tl.sum(tl.sum(wlo[:, :, :, :, None, :, :] * xlo[:, :, :, None, :, :, :], axis=6), axis=5)
    hi = tl.sum(tl.sum(whi[:, :, :, :, None, :, :] * xhi[:, :, :, None, :, :, :], axis=6), axis=5)
    return lo + hi


@triton.jit
def _mma_emulated(wt, wb, xlo, xhi, at, ab, IS_BITMOD: tl.constexpr):
    """_mma_asm's fragments with tensor ops (interpreter): the same sums in another order."""
    at = tl.broadcast_to(at.to(tl.int32), wt.shape)
    ab = tl.broadcast_to(ab.to(tl.int32), wb.shape)
    xl = _e4m3_values(xlo)
    xh = _e4m3_values(xhi)
    tlo, thi = _weight_values(wt, at, IS_BITMOD)
    blo, bhi = _weight_values(wb, ab, IS_BITMOD)
    top = tl.reshape(_quad_sum(tlo, thi, xl, xh), [wt.shape[0], wt.shape[1], wt.shape[2], 8, 4, 2])
    bottom = tl.reshape(_quad_sum(blo, bhi, xl, xh), [wt.shape[0], wt.shape[1], wt.shape[2], 8, 4, 2])
    d0, d1 = tl.split(top)
    d2, d3 = tl.split(bottom)
    return d0, d1, d2, d3


@triton.jit
def _activation_sums(xlo, xhi, USE_ASM: tl.constexpr):
    """Per lane (g, c): the sums over the quad's words of token 2c's and 2c + 1's activations (INT4's zero-point
    term), as the ones-MMA's fragments d0, d1."""
    if USE_ASM:
        ones = tl.full(xlo.shape, _ONES, tl.int32)
        d = tl.inline_asm_elementwise(_PTX_ONES, "=f,=f,=f,=f,r,r,r", [xlo, xhi, ones], dtype=(tl.float32,) * 4,
                                      is_pure=True, pack=1)
        return d[0], d[1]
    else:
        per_token = tl.sum(tl.sum(_e4m3_values(xlo) + _e4m3_values(xhi), axis=5), axis=4)  # [VEC, 1, S, 8 tokens]
        bc = tl.broadcast_to(per_token[:, :, :, None, :], [xlo.shape[0], xlo.shape[1], xlo.shape[2], 8, 8])
        return tl.split(tl.reshape(bc, [xlo.shape[0], xlo.shape[1], xlo.shape[2], 8, 4, 2]))


@triton.jit
def _load_step(words_ptr, x_ptr, s_ptr, aux_ptr, top, bottom, grp, wig, tok, zc, M, half_plane, n_groups, limit,
               stride_ww, stride_xm, stride_sn, stride_an, GROUP: tl.constexpr):
    """One group's weights (top, bottom rows of every tile), activation codes, scales and selectors / zero points.
    Groups at or past `limit` (the warp's end) read a valid group with scale 0, so they add exactly 0; tokens
    past M read token M - 1, whose columns are never stored: no masks on the big loads."""
    WPG: tl.constexpr = GROUP // 8
    g_safe = tl.minimum(grp, n_groups - 1)
    word = g_safe * WPG + wig
    wt = tl.load(words_ptr + top * stride_ww + word)
    wb = tl.load(words_ptr + bottom * stride_ww + word)
    xa = x_ptr + tl.minimum(tok, M - 1) * stride_xm + word
    xlo = tl.load(xa)
    xhi = tl.load(xa + half_plane)
    gq = g_safe + zc
    live = grp < limit
    st = tl.load(s_ptr + top * stride_sn + gq, mask=live, other=0.0)
    sb = tl.load(s_ptr + bottom * stride_sn + gq, mask=live, other=0.0)
    at = tl.load(aux_ptr + top * stride_an + gq)
    ab = tl.load(aux_ptr + bottom * stride_an + gq)
    return wt, wb, xlo, xhi, st, sb, at, ab


@triton.jit
def _gemv_fp8_kernel(
    x_ptr, xs_ptr, words_ptr, s_ptr, aux_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ww, stride_sn, stride_an, stride_ym,
    GROUP: tl.constexpr, TILES: tl.constexpr, WARPS: tl.constexpr, IS_BITMOD: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, ODD_TOKENS: tl.constexpr,
):
    """16 * TILES output rows per program; its WARPS warps split K into contiguous runs of groups.

    x: int32 view [M, K / 4] of the FP8 codes in "halves" order; xs: token scales fp32 [M]; words: int32 [N, K / 8]."""
    VEC: tl.constexpr = GROUP // 32
    pid = tl.program_id(0)
    j = tl.reshape(tl.arange(0, VEC), [VEC, 1, 1, 1, 1])
    r = tl.reshape(tl.arange(0, TILES), [1, TILES, 1, 1, 1])
    s = tl.reshape(tl.arange(0, WARPS), [1, 1, WARPS, 1, 1])
    g = tl.reshape(tl.arange(0, 8), [1, 1, 1, 8, 1])
    c = tl.reshape(tl.arange(0, 4), [1, 1, 1, 1, 4])
    zc = c * 0
    row0 = pid * (16 * TILES) + r * 16 + g
    top = tl.minimum(row0, N - 1)  # rows past N load row N - 1; their results are never stored
    bottom = tl.minimum(row0 + 8, N - 1)
    wig = c * VEC + j  # the lane's words within its group
    n_groups = K // GROUP
    half_plane = K // 8  # int32 offset of the codes 4..7 plane
    acc0 = tl.zeros([VEC, TILES, WARPS, 8, 4], tl.float32)
    acc1 = tl.zeros([VEC, TILES, WARPS, 8, 4], tl.float32)
    acc2 = tl.zeros([VEC, TILES, WARPS, 8, 4], tl.float32)
    acc3 = tl.zeros([VEC, TILES, WARPS, 8, 4], tl.float32)
    per_warp = tl.cdiv(n_groups, WARPS)
    grp = s * per_warp
    limit = tl.minimum(n_groups, (s + 1) * per_warp)
    # software prefetch: the next group's loads are in flight while this one computes
    wt, wb, xlo, xhi, st, sb, at, ab = _load_step(
        words_ptr, x_ptr, s_ptr, aux_ptr, top, bottom, grp, wig, g, zc, M, half_plane, n_groups, limit,
        stride_ww, stride_xm, stride_sn, stride_an, GROUP)
    for step in range(1, per_warp + 1):
        nwt, nwb, nxlo, nxhi, nst, nsb, nat, nab = _load_step(
            words_ptr, x_ptr, s_ptr, aux_ptr, top, bottom, grp + step, wig, g, zc, M, half_plane, n_groups, limit,
            stride_ww, stride_xm, stride_sn, stride_an, GROUP)
        xlo_t = tl.broadcast_to(xlo, wt.shape)
        xhi_t = tl.broadcast_to(xhi, wt.shape)
        if USE_ASM:
            d0, d1, d2, d3 = _mma_asm(wt, wb, xlo_t, xhi_t, at, ab, IS_BITMOD)
        else:
            d0, d1, d2, d3 = _mma_emulated(wt, wb, xlo_t, xhi_t, at, ab, IS_BITMOD)
        if not IS_BITMOD:  # INT4: minus zero point x the group's activation sum
            e0, e1 = _activation_sums(xlo, xhi, USE_ASM)
            zt = at.to(tl.float32)
            zb = ab.to(tl.float32)
            d0 -= zt * e0
            d1 -= zt * e1
            d2 -= zb * e0
            d3 -= zb * e1
        st = st.to(tl.float32)
        sb = sb.to(tl.float32)
        acc0 += d0 * st
        acc2 += d2 * sb
        if ODD_TOKENS:  # tokens 2c + 1: absent when M == 1
            acc1 += d1 * st
            acc3 += d3 * sb
        wt, wb, xlo, xhi, st, sb, at, ab = nwt, nwb, nxlo, nxhi, nst, nsb, nat, nab
    rows = pid * (16 * TILES) + tl.reshape(tl.arange(0, TILES), [TILES, 1, 1]) * 16 + tl.reshape(tl.arange(0, 8), [1, 8, 1])
    tokens = 2 * tl.reshape(tl.arange(0, 4), [1, 1, 4])
    _store_fragment(acc0, xs_ptr, b_ptr, y_ptr, rows, tokens, M, N, stride_ym, IS_BITMOD, HAS_BIAS)
    _store_fragment(acc2, xs_ptr, b_ptr, y_ptr, rows + 8, tokens, M, N, stride_ym, IS_BITMOD, HAS_BIAS)
    if ODD_TOKENS:
        _store_fragment(acc1, xs_ptr, b_ptr, y_ptr, rows, tokens + 1, M, N, stride_ym, IS_BITMOD, HAS_BIAS)
        _store_fragment(acc3, xs_ptr, b_ptr, y_ptr, rows + 8, tokens + 1, M, N, stride_ym, IS_BITMOD, HAS_BIAS)


@triton.jit
def _store_fragment(acc, xs_ptr, b_ptr, y_ptr, rows, tokens, M, N, stride_ym, IS_BITMOD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Sum a fragment accumulator over the lane's words and the warps, finish and store y[tokens, rows]."""
    out = tl.sum(tl.sum(acc, axis=2), axis=0)  # [TILES, 8 rows g, 4 lanes c]
    mask = (rows < N) & (tokens < M)
    out = out * tl.load(xs_ptr + tokens, mask=tokens < M, other=0.0)
    if IS_BITMOD:
        out = out * 0.5
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + tokens * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=mask)


WARPS_PER_SM = 16  # split K over a program's warps until the grid holds about this many warps per SM
TILES = 2  # 16-row tiles per program (sharing the activation loads)
CONFIG_OVERRIDE: tuple[int, int] | None = None  # benchmarks only: fixed (tiles, warps)
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a small "GPU", so that tests split K over several warps
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def launch_config(n: int, k: int, group: int, device: torch.device) -> tuple[int, int]:
    """(row tiles, warps) per program: TILES tiles, and enough warps (each a contiguous run of groups) for about
    WARPS_PER_SM warps per SM over the programs, at most 8 and at most the number of groups."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    programs = triton.cdiv(n, 16 * TILES)
    want = triton.cdiv(WARPS_PER_SM * _sm_count(device), programs)
    return TILES, max(1, min(8, triton.next_power_of_2(want), triton.next_power_of_2(k // group)))


def gemv_fp8(codes: torch.Tensor, x_scales: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, aux: torch.Tensor,
             bias: torch.Tensor | None, y: torch.Tensor, group: int, is_bitmod: bool, use_asm: bool) -> None:
    """y [M, N] = codes * x_scales @ W^T (+ bias) for M <= MAX_M (callers validate: gemm_w4.w4_matmul).

    codes: FP8-E4M3 [M, K] in act_quant's "halves" order, x_scales fp32 [M]; words: the packed weight as int32
    [N, K / 8]; scales, aux (selectors or zero points) [N, K / group]; group 64 or 128."""
    m, k = codes.shape
    n = words.shape[0]
    tiles, warps = launch_config(n, k, group, y.device)
    _gemv_fp8_kernel[(triton.cdiv(n, 16 * tiles),)](
        codes.view(torch.int32), x_scales, words, scales, aux, bias if bias is not None else x_scales, y,
        m, n, k, codes.stride(0) // 4, words.stride(0), scales.stride(0), aux.stride(0), y.stride(0),
        GROUP=group, TILES=tiles, WARPS=warps, IS_BITMOD=is_bitmod, HAS_BIAS=bias is not None, USE_ASM=use_asm,
        ODD_TOKENS=m > 1, num_warps=warps, num_stages=1)


__all__ = ["gemv_fp8", "launch_config", "MAX_M", "SUPPORTED_GROUPS"]
