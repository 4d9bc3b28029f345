"""Packed 4-bit weights (BitMoD or INT4 asymmetric) -> a 16-bit [N, K] matrix, for the large-M (prefill) path.

At M in the hundreds and above, a GEMM is compute-bound: decoding every weight tile again for every block of
rows (as the fused kernel does) costs more than decoding the weight once into a temporary fp16 matrix and
handing it to cuBLAS. The temporary lives for one call only; the model keeps only the packed weight.
Each value is fp16(grid x scale): one rounding of the exact dequantized weight (relative error <= 2**-11).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from p3quant.formats import BitMoDTensor, Int4Tensor

from .common import bitmod_special2, decode_w4, interpreting, on_input_device, require_device


@triton.jit
def _dequant_kernel(packed_ptr, scales_ptr, aux_ptr, out_ptr, N, K, s_p, s_s, s_a, s_o,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_BITMOD: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # byte index: codes 2j (low) and 2j+1 (high)
    mask = (rows < N)[:, None] & (pairs < K // 2)[None, :]
    codes = tl.load(packed_ptr + rows[:, None] * s_p + pairs[None, :], mask=mask, other=0).to(tl.int32)
    group = (2 * pairs) // GROUP
    scale = tl.load(scales_ptr + rows[:, None] * s_s + group[None, :], mask=mask, other=0.0).to(tl.float32)
    aux = tl.load(aux_ptr + rows[:, None] * s_a + group[None, :], mask=mask, other=0).to(tl.int32)
    if IS_BITMOD:
        aux = bitmod_special2(aux)
        scale = scale * 0.5  # decode_w4 gives the grid x 2
    lo = decode_w4(codes & 15, aux, IS_BITMOD).to(tl.float32) * scale
    hi = decode_w4(codes >> 4, aux, IS_BITMOD).to(tl.float32) * scale
    values = tl.interleave(lo, hi).to(out_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_K]: k = 2j, 2j+1
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * s_o + cols[None, :], values, mask=(rows < N)[:, None] & (cols < K)[None, :])


@on_input_device
def dequantize_w4(weight: BitMoDTensor | Int4Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dequantized weight [N, K] in `dtype` (float16 or float32), computed on the GPU.

    (No bfloat16: its 8-bit significand would round the weights far more than the fp16 the GEMM needs.)"""
    what = "dequantize_w4"
    if not isinstance(weight, (BitMoDTensor, Int4Tensor)):
        raise TypeError(f"{what}: weight must be a BitMoDTensor or Int4Tensor, got {type(weight).__name__}")
    if dtype not in (torch.float16, torch.float32):
        raise TypeError(f"{what}: dtype must be float16 or float32, got {dtype}")
    if len(weight.shape) != 2:
        raise ValueError(f"{what}: expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    is_bitmod = isinstance(weight, BitMoDTensor)
    aux = weight.selectors if is_bitmod else weight.zeros
    packed, scales = weight.packed, weight.scales
    require_device(what, packed, scales, aux)
    if packed.stride(-1) != 1 or scales.stride(-1) != 1 or aux.stride(-1) != 1:
        raise ValueError(f"{what}: weight tensors must be contiguous along K")
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    block_n, block_k = (16, 128) if interpreting() else (32, 256)
    block_k = min(block_k, max(2, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](packed, scales, aux, out, n, k, packed.stride(0), scales.stride(0), aux.stride(0), out.stride(0),
                          GROUP=weight.group_size, BLOCK_N=block_n, BLOCK_K=block_k, IS_BITMOD=is_bitmod, num_warps=4)
    return out


__all__ = ["dequantize_w4"]
