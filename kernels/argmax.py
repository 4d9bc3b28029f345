"""Greedy token choice: argmax over the last dimension of [B, V] logits in two launches spread over the GPU.

torch.argmax over one vocabulary-wide row (128K for Llama-3) runs in a single block: 36 us per decode step on an
H200 (benchmarks/RESULTS.md, sixth session's profile). Here BLOCK-wide chunks reduce in parallel to their
(max, first index of the max, first NaN), then one program per row combines its chunks. Ties go to the lowest
index and NaN counts as the maximum, as in torch.argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, interpreting, next_power_of_2, on_input_device, pdl_begin, pdl_launch

BLOCK = 4096  # values per program


@triton.jit
def _chunk_argmax_kernel(x_ptr, vmax_ptr, imax_ptr, inan_ptr, V, CHUNKS, stride_xm, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_begin(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs,  # 64-bit: rows of a [B, T, V] slice lie > 2**31 apart
                mask=mask, other=float("-inf")).to(tl.float32)
    nan = x != x
    first_nan = tl.min(tl.where(nan & mask, offs, V), axis=0)
    x = tl.where(nan, float("-inf"), x)
    top = tl.max(x, axis=0)
    first = tl.min(tl.where((x == top) & mask, offs, V), axis=0)
    slot = row * CHUNKS + chunk
    tl.store(vmax_ptr + slot, top)
    tl.store(imax_ptr + slot, first)
    tl.store(inan_ptr + slot, first_nan)


@triton.jit
def _pick_kernel(vmax_ptr, imax_ptr, inan_ptr, out_ptr, V, CHUNKS, CP: tl.constexpr, PDL: tl.constexpr = False):
    pdl_begin(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, CP)
    live = c < CHUNKS
    tops = tl.load(vmax_ptr + row * CHUNKS + c, mask=live, other=float("-inf"))
    firsts = tl.load(imax_ptr + row * CHUNKS + c, mask=live, other=V)
    first_nan = tl.min(tl.load(inan_ptr + row * CHUNKS + c, mask=live, other=V), axis=0)
    best = tl.min(tl.where((tops == tl.max(tops, axis=0)) & live, firsts, V), axis=0)
    tl.store(out_ptr + row, tl.where(first_nan < V, first_nan, best).to(tl.int64))


@on_input_device
def argmax_tokens(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1, keepdim=True) for floating logits [B, V] (rows may be strided, V < 2**31) on a
    CUDA device or under the interpreter: int64 [B, 1]."""
    what = "argmax_tokens"
    if logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] == 0:
        raise ValueError(f"{what}: expects floating logits [batch, vocabulary > 0], got {tuple(logits.shape)} {logits.dtype}")
    if not (logits.is_cuda or interpreting()):
        raise ValueError(f"{what}: needs a CUDA tensor (got {logits.device}); use torch.argmax on the CPU")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    out = torch.empty((b, 1), dtype=torch.int64, device=logits.device)
    if b:
        chunks = cdiv(v, BLOCK)
        vmax = torch.empty((b, chunks), dtype=torch.float32, device=logits.device)
        imax = torch.empty((b, chunks), dtype=torch.int32, device=logits.device)
        inan = torch.empty_like(imax)
        _chunk_argmax_kernel[(b, chunks)](logits, vmax, imax, inan, v, chunks, logits.stride(0), BLOCK=BLOCK, num_warps=8,
                                          **pdl_launch(logits))
        _pick_kernel[(b,)](vmax, imax, inan, out, v, chunks, CP=max(2, next_power_of_2(chunks)), num_warps=1,
                           **pdl_launch(logits))
    return out


__all__ = ["argmax_tokens"]
