"""Quantizers for each operand of a decoder layer, as P3-LLM applies them (P3LLM.md section 2).

Attention tensors use Hugging Face's layout: [batch, heads, tokens, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .formats import (
    BITMOD4, FP8_E4M3, INT4, INT8, UE4M4, BitMoDTensor, Int4Tensor, Int8Tensor, QuantizedTensor, ScaledFp8Tensor,
    quantize_scaled_fp8,
)
from .formats.minifloat import ue4m4_codes
from .formats.scaled import fake_quantize_scaled_fp8, fp8_e4m3_codes
from .formats.validation import require_finite

WEIGHT_FORMATS = ("bitmod", "int4", "int4_sym", "none")
ACTIVATION_FORMATS = ("fp8_e4m3", "int8", "none")
QUERY_FORMATS = ("fp8_e4m3", "none")
KV_FORMATS = ("int4", "none")
PROB_FORMATS = ("ue4m4", "fp8_e4m3", "int8", "none")
INT8_PROB_LEVELS = 255


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int, check: bool = True) -> BitMoDTensor | Int4Tensor:
    """Weight [out, in] to 4 bits per group along in_features (BitMoD, INT4 asymmetric or symmetric RTN)."""
    if fmt == "bitmod":
        return BITMOD4.quantize(w, group_size, check=check)
    if fmt == "int4":
        return INT4.quantize(w, group_size, check=check)
    if fmt == "int4_sym":
        return INT4.quantize(w, group_size, symmetric=True, check=check)
    raise ValueError(f"unknown weight format {fmt!r}; use one of {WEIGHT_FORMATS[:-1]}")


def quantize_activation(x: torch.Tensor, fmt: str, check: bool = True) -> ScaledFp8Tensor | Int8Tensor:
    """Per-token dynamic quantization of linear-layer inputs: FP8-E4M3 (P3) or symmetric INT8 (baseline)."""
    if fmt == "fp8_e4m3":
        return quantize_scaled_fp8(x, None, check=check)
    if fmt == "int8":
        return INT8.quantize(x, None, check=check)
    raise ValueError(f"unknown activation format {fmt!r}; use one of {ACTIVATION_FORMATS[:-1]}")


def fake_quantize_activation(x: torch.Tensor, fmt: str, check: bool = True) -> torch.Tensor:
    """Quantize-dequantize per token, returning x's dtype ("none" returns x unchanged)."""
    if fmt == "none":
        return x
    if fmt == "fp8_e4m3":
        return fake_quantize_scaled_fp8(x, check).to(x.dtype)
    return quantize_activation(x, fmt, check).dequantize(x.dtype)


def key_smoothing_factor(prompt_keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per (batch, kv-head, channel) s_c = max over the prompt's tokens of |K[t, c]|, shaped [B, H, 1, D].

    `mask` ([B, T] bool, True = real token) keeps padding out of the maximum. All-zero channels get
    s = 1 so that K / s and q * s stay finite.
    """
    require_finite(prompt_keys, "key_smoothing_factor")
    mag = prompt_keys.float().abs()
    if mask is not None:
        mag = mag * mask[:, None, :, None].to(mag.dtype)
    factor = mag.amax(dim=-2, keepdim=True)
    return torch.where(factor > 0, factor, torch.ones_like(factor))


def quantize_query(q: torch.Tensor, smoothing: torch.Tensor | None, check: bool = True) -> ScaledFp8Tensor:
    """FP8-E4M3 per (token, head) after multiplying by the key smoothing factor (so q.k is unchanged).

    `smoothing` is [B, H_kv, 1, D]; query heads of one GQA group share their kv-head's factor.
    """
    if smoothing is not None:
        q = q.float() * expand_kv_heads(smoothing, q.shape[1])
    return quantize_scaled_fp8(q, None, check=check)


def quantize_keys(k: torch.Tensor, smoothing: torch.Tensor | None, check: bool = True) -> Int4Tensor:
    """INT4 asymmetric per (token, kv-head) of K / s (s from key_smoothing_factor; None: no smoothing)."""
    if smoothing is not None:
        k = k.float() / smoothing
    return INT4.quantize(k, k.shape[-1], check=check)


def quantize_keys_per_channel(k: torch.Tensor, check: bool = True) -> Int4Tensor:
    """KIVI-style baseline: INT4 asymmetric per (kv-head, channel) over the given tokens.

    The result's groups run along tokens: it quantizes k.transpose(-1, -2) with one group per channel.
    """
    kt = k.transpose(-1, -2)
    if kt.shape[-1] % 2:
        raise ValueError(f"per-channel key quantization needs an even number of tokens per block, got {kt.shape[-1]}")
    return INT4.quantize(kt, kt.shape[-1], check=check)


def quantize_values(v: torch.Tensor, check: bool = True) -> Int4Tensor:
    """INT4 asymmetric per (token, kv-head); the scale is later folded into P (fold_value_scale)."""
    return INT4.quantize(v, v.shape[-1], check=check)


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat a per-kv-head tensor [B, H_kv, ...] along dim 1 to num_heads query heads (GQA)."""
    kv_heads = x.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} kv heads evenly")
    return x.repeat_interleave(num_heads // kv_heads, dim=1)


@dataclass
class FoldedProbs(QuantizedTensor):
    """Attention probabilities with the value scales folded in (P3LLM.md 2.5).

    codes: uint8 [B, H, Tq, Tk] in `fmt`; value_scale_max: float32 [B, H, 1, 1] = max_t S_V[t].
    The attention output is (decode(codes) @ (V_code - zp)) * value_scale_max.
    """

    kind: ClassVar[str] = "folded_probs"
    codes: torch.Tensor
    value_scale_max: torch.Tensor
    fmt_id: int

    def values(self) -> torch.Tensor:
        return decode_probs(self.codes, PROB_FORMATS[self.fmt_id])


def encode_probs(p: torch.Tensor, fmt: str, rounding: str = "nearest_even") -> torch.Tensor:
    """Values in [0, 1] (probabilities, possibly rescaled) to 8-bit codes of `fmt`."""
    require_finite(p, "probability quantization")
    if fmt == "ue4m4":
        return ue4m4_codes(p.clamp(min=0), rounding)
    if fmt == "fp8_e4m3":
        return fp8_e4m3_codes(p)
    if fmt == "int8":
        return torch.round(p.float().clamp(0, 1) * INT8_PROB_LEVELS).to(torch.uint8)
    raise ValueError(f"unknown probability format {fmt!r}; use one of {PROB_FORMATS[:-1]}")


def decode_probs(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "ue4m4":
        return UE4M4.decode(codes)
    if fmt == "fp8_e4m3":
        return FP8_E4M3.decode(codes)
    if fmt == "int8":
        return codes.float() / INT8_PROB_LEVELS
    raise ValueError(f"unknown probability format {fmt!r}; use one of {PROB_FORMATS[:-1]}")


def fake_quantize_probs(p: torch.Tensor, fmt: str, rounding: str = "nearest_even") -> torch.Tensor:
    """Quantize-dequantize probabilities without a value-scale fold ("none" returns p)."""
    if fmt == "none":
        return p
    return decode_probs(encode_probs(p, fmt, rounding), fmt).to(p.dtype)


def quantize_probs(
    p: torch.Tensor, value_scales: torch.Tensor, fmt: str = "ue4m4", rounding: str = "nearest_even"
) -> FoldedProbs:
    """P'[t] = P[t] * S_V[t] / max_t S_V[t] (so P' <= 1), then 8-bit codes (P3LLM.md 2.5).

    p: [B, H, Tq, Tk] probabilities; value_scales: [B, H_kv, Tk] per-token value scales. Keys masked out
    of attention must have p = 0 there; their scales still count in the max only if present in the cache.
    """
    if p.dim() != 4 or value_scales.dim() != 3:
        raise ValueError(f"quantize_probs expects p [B,H,Tq,Tk] and value_scales [B,Hkv,Tk], got {tuple(p.shape)}, {tuple(value_scales.shape)}")
    if value_scales.shape[-1] != p.shape[-1]:
        raise ValueError(f"{p.shape[-1]} keys in p but {value_scales.shape[-1]} value scales")
    sv = expand_kv_heads(value_scales.float(), p.shape[1]).unsqueeze(2)
    sv_max = sv.amax(dim=-1, keepdim=True)
    folded = p.float().clamp(min=0) * (sv / sv_max)
    return FoldedProbs(encode_probs(folded.clamp(max=1.0), fmt, rounding), sv_max, PROB_FORMATS.index(fmt))
