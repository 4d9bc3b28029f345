"""SiLU(gate) * up in one launch, optionally also quantizing the product for the W4A8 down projection.

HF's gated MLPs compute `act_fn(gate_proj(x)) * up_proj(x)`: two PyTorch kernels (SiLU, multiply), then the
down projection quantizes their product to FP8 in a third. This kernel does the same arithmetic for one row per
program: silu = gate / (1 + exp(-gate)) in fp32 rounded to the 16-bit type, times up rounded again (PyTorch's
16-bit ops round after each), and with a layout ("split" / "halves", see act_quant) it writes the FP8-E4M3 codes
and per-token scale of the product (bit-exact with act_quant), which the down projection picks up
(act_quant.remember_quantized). The exponential may differ from PyTorch's by an ulp, so an element can land one
16-bit ulp away from the unfused result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import code_buffers, remember_quantized, store_row_with_codes
from .common import on_input_device, require_device, round_to_output

MAX_FEATURES = 16384  # one row per program, held in registers (wider MLPs take the unfused path)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, q_ptr, s_ptr, K, stride_gm, stride_um, stride_ym, stride_qm,
                     BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr):
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    g = tl.load(g_ptr + row * stride_gm + k, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + k, mask=mask, other=0.0).to(tl.float32)
    silu = round_to_output(tl.math.div_rn(g, 1.0 + tl.exp(-g)), y_ptr)
    y = round_to_output(silu.to(tl.float32) * u, y_ptr)
    store_row_with_codes(y, y_ptr + row * stride_ym, q_ptr + row * stride_qm, s_ptr, row, k, mask, K, LAYOUT)


@on_input_device
def silu_mul(gate: torch.Tensor, up: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """F.silu(gate) * up for gate, up [..., K] of one 16-bit dtype; with `layout`, the product's FP8 codes are
    also computed and remembered for the next W4A8 linear layer fed with the returned tensor."""
    what = "silu_mul"
    require_device(what, gate, up)
    if gate.dtype not in (torch.bfloat16, torch.float16) or up.dtype != gate.dtype:
        raise TypeError(f"{what}: gate and up must share a 16-bit dtype, got {gate.dtype} and {up.dtype}")
    k = gate.shape[-1]
    if up.shape != gate.shape or k > MAX_FEATURES or k % 8:
        raise ValueError(f"{what}: gate and up must have one shape [..., K] with K <= {MAX_FEATURES}, a multiple of 8; "
                         f"got {tuple(gate.shape)} and {tuple(up.shape)}")
    g2, u2 = gate.reshape(-1, k), up.reshape(-1, k)
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    m = g2.shape[0]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y2 = y.view(m, k)
    code, codes, scales = code_buffers(layout, y2)
    if m:
        block = triton.next_power_of_2(k)
        _silu_mul_kernel[(m,)](g2, u2, y2, codes, scales, k, g2.stride(0), u2.stride(0), y2.stride(0), codes.stride(0),
                               BLOCK_K=block, LAYOUT=code, num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    if code:
        remember_quantized(y, layout, codes, scales)
    return y


__all__ = ["silu_mul", "MAX_FEATURES"]
