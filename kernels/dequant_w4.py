"""Packed 4-bit weights (BitMoD or INT4 asymmetric) -> an fp16 [N, K] matrix, or their FP8 values and block
scales, for the large-M (prefill) paths.

At M in the hundreds and above, a GEMM is compute-bound: decoding every weight tile again for every block of
rows (as the fused kernel does) costs more than decoding the weight once into a temporary fp16 matrix and
handing it to cuBLAS. The temporary lives for one call only; the model keeps only the packed weight.
Each value is fp16(grid x scale): one rounding of the exact dequantized weight (relative error <= 2**-11).

On the GPU (fp16 output) each int32 word of 8 codes is decoded by inline PTX (common.decode_word_ptx) into four
fp16 pairs in code order, scaled in fp32 and rounded once; the four pairs of a word are stored as one 16-byte
vector. The interpreter and fp32 output decode with decode_w4. weight_values_fp8 (the block-scaled FP8
prefill's operand) writes each word's 8 unscaled values as E4M3 bytes, packed in code order into one int64 (no
exchange of codes between threads); with VALUES_FP8_USE_ASM the same PTX decode gives the fp16 pairs and one
conversion per pair the E4M3 pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from p3quant.formats import BitMoDTensor, Int4Tensor

from .common import (bitmod_special2, cdiv, decode_tables, decode_w4, decode_word_ptx, fp8_dot_supported,
                     interpreting, next_power_of_2, nvidia_compiled, on_input_device, require_device)

# Operands (pack=1): $0..$3 the pairs, $4 the word, $5..$8 tables, $9 m64, $10 bias, $11 the fp32 scale.
_ASM_DEQUANT = tl.constexpr(decode_word_ptx(("$0", "$1", "$2", "$3"), "$4", ("$5", "$6", "$7", "$8"), "$9", "$10", "$11"))
_ASM_DEQUANT_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 8))
# Operands (pack=1): $0, $1 the E4M3 bytes of codes 0..3 and 4..7, $2 the word, $3..$6 tables, $7 m64, $8 bias.
# The word's four exact fp16 pairs (unscaled) become E4M3 pairs by one conversion each (exact: |value| <= 16).
_ASM_VALUES_FP8 = tl.constexpr(
    "{\n.reg .b32 p0, p1, p2, p3;\n.reg .b16 e0, e1, e2, e3;\n"
    + decode_word_ptx(("p0", "p1", "p2", "p3"), "$2", ("$3", "$4", "$5", "$6"), "$7", "$8")
    + "\ncvt.rn.satfinite.e4m3x2.f16x2 e0, p0;\ncvt.rn.satfinite.e4m3x2.f16x2 e1, p1;"
    + "\ncvt.rn.satfinite.e4m3x2.f16x2 e2, p2;\ncvt.rn.satfinite.e4m3x2.f16x2 e3, p3;"
    + "\nmov.b32 $0, {e0, e1};\nmov.b32 $1, {e2, e3};\n}")
_ASM_VALUES_FP8_CONSTRAINTS = tl.constexpr("=r,=r," + ",".join(["r"] * 7))


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, GW: tl.constexpr):
    """[..., GW] x 8 -> [..., GW * 8] with c_i at column 8w + i."""
    lo = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    hi = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    joined = tl.join(lo, hi)
    return tl.reshape(joined, [BLOCK_N, BLOCK_G, GW * 8])


@triton.jit
def _group_tile(words_ptr, aux_ptr, N, KW, s_w, s_a, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """A program's [BLOCK_N rows, BLOCK_G groups, GROUP / 8 words] tile of int32 words, its group parameters
    [rows, groups, 1] (broadcast along the words, not loaded per word: per-word loads had Triton convert every
    decoded code's layout through shared memory), rows, groups, word indices and mask."""
    GW: tl.constexpr = GROUP // 8
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # rows * K may exceed int32
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    wi = groups[None, :, None] * GW + tl.arange(0, GW)[None, None, :]
    mask = (rows < N)[:, None, None] & (wi < KW)
    words = tl.load(words_ptr + rows[:, None, None] * s_w + wi, mask=mask, other=0)
    group_mask = (rows < N)[:, None] & (groups < KW // GW)[None, :]
    aux = tl.load(aux_ptr + rows[:, None] * s_a + groups[None, :], mask=group_mask, other=0).to(tl.int32)[:, :, None]
    return words, aux, rows, groups, wi, mask, group_mask


@triton.jit
def _dequant_kernel(words_ptr, scales_ptr, aux_ptr, out_ptr, N, KW, s_w, s_s, s_a, s_o,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, IS_BITMOD: tl.constexpr,
                    USE_ASM: tl.constexpr):
    """Program: BLOCK_N rows x BLOCK_G groups (8 codes per word, code i of word w = column 8w + i)."""
    GW: tl.constexpr = GROUP // 8
    words, aux, rows, groups, wi, mask, group_mask = _group_tile(words_ptr, aux_ptr, N, KW, s_w, s_a, GROUP, BLOCK_N, BLOCK_G)
    scale = tl.load(scales_ptr + rows[:, None] * s_s + groups[None, :], mask=group_mask, other=0.0).to(tl.float32)[:, :, None]
    if IS_BITMOD:
        scale = scale * 0.5  # the decode gives the grid x 2
    if USE_ASM:  # fp16 output: 4 fp16 pairs per word, stored through an int32 view of the output
        tp0, tp1, tn0, tn1 = decode_tables(aux, IS_BITMOD)
        p0, p1, p2, p3 = tl.inline_asm_elementwise(  # the operands broadcast to the words' shape
            _ASM_DEQUANT, _ASM_DEQUANT_CONSTRAINTS,
            [words, tp0, tp1, tn0, tn1, tl.full(words.shape, 0x64646464, tl.int32), tl.full(words.shape, 0x64106410, tl.int32),
             scale],
            dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        pairs = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), [BLOCK_N, BLOCK_G, GW * 4])
        pcols = groups[None, :, None] * (GW * 4) + tl.arange(0, GW * 4)[None, None, :]
        out32 = out_ptr.to(tl.pointer_type(tl.int32))
        tl.store(out32 + rows[:, None, None] * (s_o // 2) + pcols, pairs,
                 mask=(rows < N)[:, None, None] & (pcols < KW * 4))
    else:
        if IS_BITMOD:
            aux = bitmod_special2(aux)
        ty = out_ptr.dtype.element_ty
        c0 = (decode_w4(words & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c1 = (decode_w4((words >> 4) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c2 = (decode_w4((words >> 8) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c3 = (decode_w4((words >> 12) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c4 = (decode_w4((words >> 16) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c5 = (decode_w4((words >> 20) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c6 = (decode_w4((words >> 24) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        c7 = (decode_w4((words >> 28) & 15, aux, IS_BITMOD).to(tl.float32) * scale).to(ty)
        values = _join8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_N, BLOCK_G, GW)
        cols = groups[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
        tl.store(out_ptr + rows[:, None, None] * s_o + cols, values, mask=(rows < N)[:, None, None] & (cols < KW * 8))


@triton.jit
def _fp8_byte(words, i: tl.constexpr, aux, IS_BITMOD: tl.constexpr):
    """Code i of each word as its value's E4M3 byte, at byte position i % 4 of an int32."""
    value = decode_w4((words >> (4 * i)) & 15, aux, IS_BITMOD).to(tl.float32).to(tl.float8e4nv)
    return value.to(tl.uint8, bitcast=True).to(tl.int32) << (8 * (i % 4))


@triton.jit
def _values_fp8_kernel(words_ptr, scales_ptr, aux_ptr, out_ptr, sb_ptr, N, KW, s_w, s_s, s_a, s_o,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, IS_BITMOD: tl.constexpr,
                       USE_ASM: tl.constexpr):
    """Program: BLOCK_N rows x BLOCK_G groups; each word's 8 values (BitMoD grid x 2, INT4 code - zp) as E4M3
    bytes in code order, stored as one int64 (no exchange of codes between threads), and the groups' fp32 scales
    (x 1/2 for BitMoD) in column-major sb[group, row]."""
    words, aux, rows, groups, wi, mask, group_mask = _group_tile(words_ptr, aux_ptr, N, KW, s_w, s_a, GROUP, BLOCK_N, BLOCK_G)
    scale = tl.load(scales_ptr + rows[:, None] * s_s + groups[None, :], mask=group_mask, other=0.0).to(tl.float32)
    tl.store(sb_ptr + groups[None, :] * N + rows[:, None], scale * 0.5 if IS_BITMOD else scale, mask=group_mask)
    if USE_ASM:
        tp0, tp1, tn0, tn1 = decode_tables(aux, IS_BITMOD)
        lo, hi = tl.inline_asm_elementwise(  # the operands broadcast to the words' shape
            _ASM_VALUES_FP8, _ASM_VALUES_FP8_CONSTRAINTS,
            [words, tp0, tp1, tn0, tn1, tl.full(words.shape, 0x64646464, tl.int32), tl.full(words.shape, 0x64106410, tl.int32)],
            dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        if IS_BITMOD:
            aux = bitmod_special2(aux)
        lo = (_fp8_byte(words, 0, aux, IS_BITMOD) | _fp8_byte(words, 1, aux, IS_BITMOD)
              | _fp8_byte(words, 2, aux, IS_BITMOD) | _fp8_byte(words, 3, aux, IS_BITMOD))
        hi = (_fp8_byte(words, 4, aux, IS_BITMOD) | _fp8_byte(words, 5, aux, IS_BITMOD)
              | _fp8_byte(words, 6, aux, IS_BITMOD) | _fp8_byte(words, 7, aux, IS_BITMOD))
    eight = lo.to(tl.uint32, bitcast=True).to(tl.int64) | (hi.to(tl.int64) << 32)
    tl.store(out_ptr.to(tl.pointer_type(tl.int64)) + rows[:, None, None] * (s_o // 8) + wi, eight, mask=mask)


DEQUANT_USE_ASM = True  # benchmarks / gpu checks may switch it off to compare against the pure-Triton decode
# weight_values_fp8 by inline PTX (on sm_89+): 360 instructions per program against the pure-Triton kernel's 1088
# (sm_90, Triton 3.6), the same bytes on an H200 (gpu_check.check_blockwise_prefill) and in the PTX emulator
# (tests/test_kernels_w4_mma.py); 3.2-3.6 TB/s there against 1.5-1.7. Benchmarks may switch it off to compare.
VALUES_FP8_USE_ASM = True


def _operands(what: str, weight: BitMoDTensor | Int4Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Checked (int32 words [N, K / 8], selectors or zero points, N, K) of a packed weight."""
    is_bitmod = isinstance(weight, BitMoDTensor)
    aux = weight.selectors if is_bitmod else weight.zeros
    packed, scales = weight.packed, weight.scales
    require_device(what, packed, scales, aux)
    if len(weight.shape) != 2:
        raise ValueError(f"{what}: expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    if packed.stride(-1) != 1 or scales.stride(-1) != 1 or aux.stride(-1) != 1:
        raise ValueError(f"{what}: weight tensors must be contiguous along K")
    n, k = weight.shape
    if k % 8:
        raise ValueError(f"{what}: K = {k} must be a multiple of 8 (whole int32 words of codes)")
    words = packed.view(torch.int32) if packed.is_contiguous() and packed.data_ptr() % 4 == 0 else packed.contiguous().view(torch.int32)
    return words, aux, n, k


def _blocks(n: int, k: int, group: int) -> tuple[int, int, tuple[int, int]]:
    """(BLOCK_N, BLOCK_G, grid) of the [N, K] conversions: 16 rows x up to 64 words per program."""
    groups = k // group
    block_n, block_g = 16, min(next_power_of_2(groups), max(1, (16 if interpreting() else 64) * 8 // group))
    return block_n, block_g, (cdiv(n, block_n), cdiv(groups, block_g))


@on_input_device
def dequantize_w4(weight: BitMoDTensor | Int4Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dequantized weight [N, K] in `dtype` (float16, bfloat16 or float32: one rounding per weight, to
    nearest even on the GPU), computed on the GPU. W4A8's prefill takes fp16, which rounds the weights least;
    W4A16's takes the activations' 16-bit type."""
    what = "dequantize_w4"
    if not isinstance(weight, (BitMoDTensor, Int4Tensor)):
        raise TypeError(f"{what}: weight must be a BitMoDTensor or Int4Tensor, got {type(weight).__name__}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what}: dtype must be float16, bfloat16 or float32, got {dtype}")
    words, aux, n, k = _operands(what, weight)
    out = torch.empty((n, k), dtype=dtype, device=words.device)
    block_n, block_g, grid = _blocks(n, k, weight.group_size)
    _dequant_kernel[grid](words, weight.scales, aux, out, n, k // 8, words.stride(0), weight.scales.stride(0), aux.stride(0),
                          out.stride(0), GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_G=block_g,
                          IS_BITMOD=isinstance(weight, BitMoDTensor),
                          USE_ASM=DEQUANT_USE_ASM and nvidia_compiled(words.device) and dtype == torch.float16,
                          num_warps=4)
    return out


@on_input_device
def weight_values_fp8(weight: BitMoDTensor | Int4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as the operands of a block-scaled FP8 GEMM: its integer values [N, K] as float8_e4m3fn (BitMoD
    grid x 2 in [-16, 16], or INT4 code - zp in [-15, 15]: every one an exact E4M3 number) and their scales [N,
    K / group] in fp32 (the group scale, x 1/2 for BitMoD), column-major as cuBLAS takes block scales:
    values x scales (repeated over each group) is exactly the dequantized weight."""
    what = "weight_values_fp8"
    if not isinstance(weight, (BitMoDTensor, Int4Tensor)):
        raise TypeError(f"{what}: weight must be a BitMoDTensor or Int4Tensor, got {type(weight).__name__}")
    words, aux, n, k = _operands(what, weight)
    if not fp8_dot_supported(words.device):
        raise RuntimeError(f"{what}: FP8 weight values need a GPU with FP8-E4M3 (compute capability 8.9+, got "
                           f"{words.device}); dequantize_w4 gives the fp16 weight instead")
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=words.device)
    scales = torch.empty((k // weight.group_size, n), dtype=torch.float32, device=words.device)
    block_n, block_g, grid = _blocks(n, k, weight.group_size)
    _values_fp8_kernel[grid](words, weight.scales, aux, out, scales, n, k // 8, words.stride(0), weight.scales.stride(0),
                             aux.stride(0), out.stride(0), GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_G=block_g,
                             IS_BITMOD=isinstance(weight, BitMoDTensor), num_warps=4,
                             USE_ASM=VALUES_FP8_USE_ASM and nvidia_compiled(words.device))
    return out, scales.t()


__all__ = ["dequantize_w4", "weight_values_fp8"]
