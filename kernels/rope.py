"""transformers' apply_rotary_pos_emb for queries and keys in one launch, bit-exact.

HF computes q * cos + rotate_half(q) * sin (and the same for k) as about ten small PyTorch kernels (products,
negation, concatenation, sums); in a decode step that is a third of a layer's launches. This kernel does the same
16-bit arithmetic per element, rounding after each product and after the sum as PyTorch's 16-bit ops do (the
products of two 16-bit values are exact in fp32, so each rounding equals PyTorch's): the result is identical.
The products are rounded arithmetically (common.round_like_output), not by casts: from fp16 casts the compiler
narrows the ops to fp16 and contracts product and sum into one fp16 FMA, which skips a rounding (seen on an H200:
the fp16 result differed from transformers' where bf16 matched).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (cdiv, interpreting, next_power_of_2, on_input_device, pdl_begin, pdl_launch, round_like_output,
                     round_to_output)


# heads per program: a decode step's few (b, t) rows still spread over several SMs (one program for all 32 query
# heads of a Llama-3.1-8B token took 4.4 us on an H200)
HEADS_PER_PROGRAM = 4


@triton.jit
def _rotate_rows(x_ptr, y_ptr, c, s, b, t, h0, heads, s_xb, s_xh, s_xt, s_yb, s_yh, s_yt,
                 D: tl.constexpr, HB: tl.constexpr, DP: tl.constexpr):
    """y[b, h, t] = x * cos + rotate_half(x) * sin for heads h0 .. h0 + HB - 1 (of `heads`) of one (b, t), each
    step rounded to y's type."""
    offs_h = h0 + tl.arange(0, HB)
    offs_d = tl.arange(0, DP)
    mask = (offs_h < heads)[:, None] & (offs_d < D)[None, :]
    row = x_ptr + b * s_xb + offs_h[:, None] * s_xh + t * s_xt
    x = tl.load(row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(row + ((offs_d + D // 2) % D)[None, :], mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where((offs_d < D // 2)[None, :], -partner, partner)  # rotate_half: cat(-x2, x1)
    first = round_like_output(x * c[None, :], y_ptr)
    second = round_like_output(rotated * s[None, :], y_ptr)
    tl.store(y_ptr + b * s_yb + offs_h[:, None] * s_yh + t * s_yt + offs_d[None, :], round_to_output(first + second, y_ptr),
             mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, H, HKV,
                 s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_cb, s_ct, s_ob, s_oh, s_ot, s_pb, s_ph, s_pt,
                 D: tl.constexpr, HB: tl.constexpr, DP: tl.constexpr, PDL: tl.constexpr = False):
    """Program (b * T + t, j) rotates query heads j * HB .. (j + 1) * HB - 1 of token t of sequence b, or, for
    j >= cdiv(H, HB), the key heads (j - cdiv(H, HB)) * HB .. likewise."""
    pdl_begin(PDL)
    pid = tl.program_id(0)
    j = tl.program_id(1)
    q_blocks = tl.cdiv(H, HB)
    b = pid // T
    t = pid % T
    offs_d = tl.arange(0, DP)
    d_mask = offs_d < D
    c = tl.load(cos_ptr + b * s_cb + t * s_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * s_cb + t * s_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    if j < q_blocks:
        _rotate_rows(q_ptr, qo_ptr, c, s, b, t, j * HB, H, s_qb, s_qh, s_qt, s_ob, s_oh, s_ot, D, HB, DP)
    else:
        _rotate_rows(k_ptr, ko_ptr, c, s, b, t, (j - q_blocks) * HB, HKV, s_kb, s_kh, s_kt, s_pb, s_ph, s_pt, D, HB, DP)


def rope_kernel_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether apply_rotary can take these apply_rotary_pos_emb inputs (unsqueeze_dim=1): CUDA (or the
    interpreter) 16-bit q [B, H, T, D] and k [B, H_kv, T, D], cos / sin [B or 1, T, D] of the same dtype and
    strides, all contiguous along D with an even D."""
    tensors = (q, k, cos, sin)
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return False
    if not (q.is_cuda or interpreting()) or any(x.device != q.device for x in tensors):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or any(x.dtype != q.dtype for x in tensors):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or sin.stride() != cos.stride():
        return False
    b, _, t, d = q.shape
    return (k.shape[0] == b and k.shape[2:] == (t, d) and cos.shape[0] in (1, b) and cos.shape[1:] == (t, d)
            and d % 2 == 0 and all(x.stride(-1) == 1 for x in tensors))


@on_input_device
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k) with cos / sin [B or 1, T, D] broadcast over the heads:
    transformers' apply_rotary_pos_emb(q, k, cos, sin), bit for bit, in one launch. Outputs keep q's and k's
    strides (as PyTorch's elementwise ops do)."""
    if not rope_kernel_applies(q, k, cos, sin):
        raise ValueError("apply_rotary: needs 16-bit q [B, H, T, D], k [B, H_kv, T, D] and cos / sin [B or 1, T, D] "
                         f"of one dtype on one CUDA device, contiguous along an even D; got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(k.shape)} {k.dtype}, {tuple(cos.shape)} {cos.dtype}")
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return q_out, k_out
    cos_b = cos.stride(0) if cos.shape[0] == b else 0
    hb = min(HEADS_PER_PROGRAM, next_power_of_2(max(h, hkv)))
    _rope_kernel[(b * t, cdiv(h, hb) + cdiv(hkv, hb))](
        q, k, cos, sin, q_out, k_out, t, h, hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), cos_b, cos.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        D=d, HB=hb, DP=next_power_of_2(d), num_warps=4 if hb * d >= 2048 else 1, **pdl_launch(q),
    )
    return q_out, k_out


__all__ = ["apply_rotary", "rope_kernel_applies"]
