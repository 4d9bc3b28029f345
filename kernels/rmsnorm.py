"""Llama-style RMSNorm in one launch, optionally also quantizing its output for the W4A8 layers it feeds.

HF's LlamaRMSNorm runs as about six small PyTorch kernels (cast, square, mean, rsqrt, two products); in a decode
step that costs more than the arithmetic. This kernel does the same fp32 steps for one row per program:
y = w * (x * rsqrt(mean(x^2) + eps)).to(dtype), the product rounded once to x's dtype as PyTorch's 16-bit
multiply does. Only the summation order of the mean differs from PyTorch's, so an element can land one 16-bit
ulp away. With a layout ("split" / "halves", see act_quant) it also writes the FP8-E4M3 codes and per-token
scale of y (computed from the rounded y, bit-exact with act_quant), which the next W4A8 linear layer picks up
instead of quantizing again (act_quant.remember_quantized).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import code_buffers, remember_quantized, store_row_with_codes
from .common import (native_e4m3, next_power_of_2, on_input_device, pdl_launch, pdl_launch_dependents, pdl_wait,
                     require_device, round_to_output)

MAX_FEATURES = 16384  # one row per program, held in registers
# A decode step's row is one program on one SM, whose time is its warps' instruction latency (Nsight Compute,
# H200, K = 4096 at 8 warps: 2 warps per scheduler, an issue every 2.4 cycles): 16 warps halve each warp's
# elements. WARPS_OVERRIDE (benchmarks only) replaces the choice.
WARPS_OVERRIDE: int | None = None


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, K, eps, stride_xm, stride_ym, stride_qm,
                    BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr, NATIVE_E4M3: tl.constexpr = False,
                    PDL: tl.constexpr = False):
    pdl_launch_dependents(PDL)
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    w = tl.load(w_ptr + k, mask=mask, other=0.0)  # the norm's weight: no earlier kernel writes it
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / K
    normed = round_to_output(x * tl.math.rsqrt(variance + eps), y_ptr)
    y = round_to_output(w.to(tl.float32) * normed.to(tl.float32), y_ptr)
    store_row_with_codes(y, y_ptr + row * stride_ym, q_ptr + row * stride_qm, s_ptr, row, k, mask, K, LAYOUT, NATIVE_E4M3)


@on_input_device
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, layout: str | None = None) -> torch.Tensor:
    """LlamaRMSNorm(x) for x [..., K] (bf16 / fp16) and weight [K] of x's dtype; with `layout`, the output's
    FP8 codes are also computed and remembered for the next W4A8 linear layer fed with the returned tensor."""
    what = "rms_norm"
    require_device(what, x, weight)
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise TypeError(f"{what}: x and weight must share a 16-bit dtype, got {x.dtype} and {weight.dtype}")
    k = x.shape[-1]
    if weight.shape != (k,) or k > MAX_FEATURES or k % 8:
        raise ValueError(f"{what}: weight must be [{k}] with {k} <= {MAX_FEATURES} features, a multiple of 8; got {tuple(weight.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(m, k)
    code, codes, scales = code_buffers(layout, y2)
    if m:
        block = next_power_of_2(k)
        _rmsnorm_kernel[(m,)](x2, weight, y2, codes, scales, k, float(eps), x2.stride(0), y2.stride(0), codes.stride(0),
                              BLOCK_K=block, LAYOUT=code, NATIVE_E4M3=native_e4m3(x.device),
                              num_warps=WARPS_OVERRIDE or (4 if block <= 2048 else 16), **pdl_launch(x2))
    if code:
        remember_quantized(y, layout, codes, scales)
    return y


__all__ = ["rms_norm", "MAX_FEATURES"]
