"""SiLU(gate) * up, optionally also quantizing the product for the W4A8 down projection.

HF's gated MLPs compute `act_fn(gate_proj(x)) * up_proj(x)`: two PyTorch kernels (SiLU, multiply), then the
down projection quantizes their product to FP8 in a third. This kernel does the same arithmetic in one launch
over BLOCK_K-wide chunks of each row: silu = gate / (1 + exp(-gate)) in fp32 rounded to the 16-bit type, times up
rounded again (PyTorch's 16-bit ops round after each). With a layout ("split" / "halves", see act_quant) it also
writes each chunk's max |product|, and act_quant.codes_from_chunk_amax turns those into the FP8-E4M3 codes and
per-token scale of the product (bit-exact with act_quant) in a second launch; the down projection picks them up
(act_quant.remember_quantized). Chunks, not rows, per program: an MLP row (14336 wide for Llama-3.1-8B) is a
whole decode step's work, and one program per row ran it on a single SM (12 us per layer on an H200).
The exponential may differ from PyTorch's by an ulp, so an element can land one 16-bit ulp away from the
unfused result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import code_buffers, codes_from_chunk_amax, remember_quantized
from .common import cdiv, on_input_device, pdl_begin, pdl_launch, require_device, round_to_output

BLOCK_K = 1024  # features per program


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, amax_ptr, K, CHUNKS, stride_gm, stride_um, stride_ym,
                     BLOCK_K: tl.constexpr, WANT_AMAX: tl.constexpr, PDL: tl.constexpr = False):
    pdl_begin(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = k < K
    g = tl.load(g_ptr + row * stride_gm + k, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_um + k, mask=mask, other=0.0).to(tl.float32)
    silu = round_to_output(tl.math.div_rn(g, 1.0 + tl.exp(-g)), y_ptr)
    y = round_to_output(silu.to(tl.float32) * u, y_ptr)
    tl.store(y_ptr + row * stride_ym + k, y, mask=mask)
    if WANT_AMAX:  # masked lanes hold 0 and leave the max alone
        tl.store(amax_ptr + row * CHUNKS + chunk, tl.max(tl.abs(y.to(tl.float32)), axis=0))


@on_input_device
def silu_mul(gate: torch.Tensor, up: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """F.silu(gate) * up for gate, up [..., K] of one 16-bit dtype; with `layout`, the product's FP8 codes are
    also computed and remembered for the next W4A8 linear layer fed with the returned tensor."""
    what = "silu_mul"
    require_device(what, gate, up)
    if gate.dtype not in (torch.bfloat16, torch.float16) or up.dtype != gate.dtype:
        raise TypeError(f"{what}: gate and up must share a 16-bit dtype, got {gate.dtype} and {up.dtype}")
    k = gate.shape[-1]
    if up.shape != gate.shape or k % 8:
        raise ValueError(f"{what}: gate and up must have one shape [..., K] with K a multiple of 8; "
                         f"got {tuple(gate.shape)} and {tuple(up.shape)}")
    g2, u2 = gate.reshape(-1, k), up.reshape(-1, k)
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    m = g2.shape[0]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y2 = y.view(m, k)
    code, codes, scales = code_buffers(layout, y2)
    if m and k:
        chunks = cdiv(k, BLOCK_K)
        amax = torch.empty((m, chunks), dtype=torch.float32, device=gate.device) if code else y2
        _silu_mul_kernel[(m, chunks)](g2, u2, y2, amax, k, chunks, g2.stride(0), u2.stride(0), y2.stride(0),
                                      BLOCK_K=BLOCK_K, WANT_AMAX=bool(code), num_warps=4, **pdl_launch(g2))
        if code:
            codes_from_chunk_amax(y2, amax, BLOCK_K, code, codes, scales)
    if code:
        remember_quantized(y, layout, codes, scales)
    return y


__all__ = ["silu_mul"]
