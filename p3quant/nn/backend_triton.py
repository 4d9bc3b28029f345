"""The "triton" backend: fused GPU kernels from p3quant.kernels behind the Backend interface.

- linear: the fused dequant-GEMM (kernels.gemm_w4) for BitMoD / INT4 weights with FP8-E4M3 per-token
  activations (W4A8) or 16-bit activations (W4A16). INT8 activations (a baseline format) are fake-quantized
  by the torch quantizer and then run through the W4A16 kernel, which is exact for them.
- linear_shared_input: projections of one input (q/k/v, gate/up; nn.shared_input) in one GEMV launch at M = 1
  with FP8 activations (kernels.gemm_w4.w4_matmul_shared_input).
- attention, decode (one query token): the two-pass flash-decoding kernel (kernels.decode_attention) over the
  packed INT4 cache, with the reference's exact semantics; for a static cache (P3StaticCache) in the
  device-length form that a CUDA graph can capture.
- attention, prefill (Tq > 1) and configurations the kernel does not cover (dense 16-bit non-residual keys,
  KIVI per-channel keys, probability formats other than UE4M4 with the value-scale fold, unquantized queries
  over quantized keys, head_dim not a multiple of 8): p3_attention_reference. Prefill is one compute-bound
  pass per prompt whose cost is dominated by the linear layers; a fused prefill kernel with the exact UE4M4
  semantics would need the same two-pass structure over a [Tq, T] score tile and is left for later.
"""

from __future__ import annotations

import torch

from p3quant.kernels.decode_attention import decode_mask, p3_decode_attention
from p3quant.kernels.gemm_w4 import w4_matmul, w4_matmul_shared_input

from ..attention_math import AttentionFormats, QuantizedKV, p3_attention_reference
from ..formats import Int4Tensor
from ..quantizers import fake_quantize_activation
from .backends import Backend, register_backend


def _decode_kernel_applies(query: torch.Tensor, kv: QuantizedKV, fmt: AttentionFormats) -> bool:
    if query.shape[2] != 1 or kv.dense_keys is not None or kv.dense_values is not None:
        return False
    if fmt.prob_format != "ue4m4" or not fmt.fold_value_scale or query.shape[-1] % 8:
        return False  # (the kernels read the packed cache as 32-bit words of 8 codes)
    if kv.keys is None:
        return kv.values is None
    d = query.shape[-1]
    per_token = all(isinstance(t, Int4Tensor) and t.group_size == d and t.shape[-1] == d for t in (kv.keys, kv.values))
    return per_token and fmt.query_format == "fp8_e4m3"


class TritonBackend(Backend):
    """Fused Triton kernels on CUDA tensors (see the module docstring for what falls back to the reference)."""

    name = "triton"
    device_length_decode = True

    def check_static_decode(self, head_dim):
        if head_dim % 8:
            raise ValueError(f"the triton backend's static-cache decode needs a head_dim that is a multiple of 8 (the "
                             f"kernels read 8 packed codes per 32-bit word), got {head_dim}; use model.generate with "
                             "the dynamic P3Cache, or the torch backend")

    def linear(self, x, weight, bias, activation_format):
        if activation_format == "int8":
            return w4_matmul(fake_quantize_activation(x, "int8"), weight, bias, "none", out_dtype=x.dtype)
        return w4_matmul(x, weight, bias, activation_format)

    def fuses_shared_input(self, x, activation_format):
        return activation_format == "fp8_e4m3" and x.numel() == x.shape[-1]  # one token: the one-launch GEMV

    def linear_shared_input(self, x, weights, biases, activation_format):
        if activation_format == "int8":
            return super().linear_shared_input(x, weights, biases, activation_format)
        return w4_matmul_shared_input(x, weights, biases, activation_format)

    def attention(self, query, kv, attention_mask, scaling, fmt, softcap=None):
        if not _decode_kernel_applies(query, kv, fmt):
            if kv.length is not None:
                raise ValueError("the static P3 cache's decode step needs the decode kernel's formats (FP8 query, "
                                 "UE4M4 P with the value-scale fold) and a head_dim that is a multiple of 8; use the "
                                 "dynamic P3Cache otherwise")
            return p3_attention_reference(query, kv, attention_mask, scaling, fmt, softcap)
        total = kv.keys.packed.shape[2] if kv.length is not None else (
            (kv.keys.packed.shape[2] if kv.keys is not None else 0) + kv.residual_keys.shape[2])
        mask = decode_mask(attention_mask, query.shape[0], total)
        out_dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.float32
        return p3_decode_attention(query, kv, mask, scaling, softcap, fmt.prob_rounding, out_dtype=out_dtype)


register_backend("triton", TritonBackend)
