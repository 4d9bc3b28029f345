"""Reference math of P3 attention over a quantized KV cache (pure torch; the oracle for every backend).

Semantics (P3LLM.md 2.3-2.6), per (batch, kv-head) with GQA query heads sharing their kv-head:
- Scores live in the smoothed key domain: q' = q * s (FP8-E4M3 per (token, head) if the query is
  quantized), keys are (code - zp) * scale for quantized tokens and K / s for residual (16-bit) tokens.
- Softmax in float32 after the additive mask.
- Quantized tokens: P'[t] = P[t] * S_V[t] / M with M = max S_V over the keys this query row can see,
  coded in the probability format, and O_q = (P8 @ (V_code - zp)) * M. Residual tokens: P coded without
  a fold, times the 16-bit values. O = O_q + O_res.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Int4Tensor, quantize_scaled_fp8
from .quantizers import expand_kv_heads, fake_quantize_probs


@dataclass
class QuantizedKV:
    """The quantized part of one layer's cache plus its 16-bit residual window, [B, H_kv, T, D] layout."""

    keys: Int4Tensor | None
    values: Int4Tensor | None
    smoothing: torch.Tensor | None
    residual_keys: torch.Tensor
    residual_values: torch.Tensor
    dense_keys: torch.Tensor | None = None
    dense_values: torch.Tensor | None = None
    # Static caches (CUDA-graph decode): keys/values span the whole storage, the residual window is a ring
    # (position q in slot q % R) and `length` ([1] int64, on the device) counts the stored tokens.
    length: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionFormats:
    query_format: str = "fp8_e4m3"
    prob_format: str = "ue4m4"
    prob_rounding: str = "nearest_even"
    fold_value_scale: bool = True


def _smoothed_query(q: torch.Tensor, smoothing: torch.Tensor | None, query_format: str) -> torch.Tensor:
    q = q.float()
    if smoothing is not None:
        q = q * expand_kv_heads(smoothing.float(), q.shape[1])
    if query_format == "fp8_e4m3":
        q = quantize_scaled_fp8(q, None).dequantize()
    return q


def _key_matrix(kv: QuantizedKV, num_heads: int) -> torch.Tensor:
    parts = []
    if kv.keys is not None:
        parts.append(kv.keys.dequantize())
    elif kv.dense_keys is not None:
        parts.append(kv.dense_keys.float())
    residual = kv.residual_keys.float()
    if kv.smoothing is not None:
        residual = residual / kv.smoothing.float()
    parts.append(residual)
    return expand_kv_heads(torch.cat(parts, dim=-2), num_heads)


def fold_value_scales(p: torch.Tensor, values: Int4Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P * S_V / M clamped to [0, 1], M) with M = max S_V over each row's visible keys (P3LLM.md 2.5).

    p, visible: [B, H, Tq, T] over the quantized tokens; values: their Int4Tensor [B, H_kv, T, D].
    """
    sv = expand_kv_heads(values.scales.float().squeeze(-1), p.shape[1]).unsqueeze(2)  # [B, H, 1, T]
    sv_max = torch.where(visible, sv, torch.zeros_like(sv)).amax(dim=-1, keepdim=True)
    sv_max = sv_max.clamp(min=torch.finfo(torch.float16).tiny)
    return (p * (sv / sv_max)).clamp(0, 1), sv_max  # one ratio per token, shared by the heads (and kernels)


def masked_softmax(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities in float32, visible-key mask) after a bool or additive mask.

    Rows with no visible key (fully padded queries) get zero probabilities, not NaN.
    """
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    visible = scores > float("-inf")
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0), visible


def _quantized_value_output(
    p: torch.Tensor, values: Int4Tensor, visible: torch.Tensor, fmt: AttentionFormats
) -> torch.Tensor:
    heads = p.shape[1]
    if fmt.prob_format == "none" or not fmt.fold_value_scale:
        p8 = fake_quantize_probs(p, fmt.prob_format, fmt.prob_rounding)
        return p8 @ expand_kv_heads(values.dequantize(), heads)
    folded, sv_max = fold_value_scales(p, values, visible)
    p8 = fake_quantize_probs(folded, fmt.prob_format, fmt.prob_rounding)
    centered = expand_kv_heads(values.centered_codes().float(), heads)
    return (p8 @ centered) * sv_max


MAX_SCORES_PER_CHUNK = 2**26
"""Query rows are processed in chunks so that one chunk's score matrix stays below this many elements
(each row is independent, so chunking changes nothing but the peak memory of long prefills)."""


def stored_tokens(kv: QuantizedKV) -> int:
    """Tokens of the cache outside the residual window (quantized, or dense for unquantized keys)."""
    stored = kv.keys if kv.keys is not None else kv.dense_keys
    return stored.shape[-2] if stored is not None else 0


def p3_attention_reference(
    query: torch.Tensor,
    kv: QuantizedKV,
    attention_mask: torch.Tensor | None,
    scaling: float,
    fmt: AttentionFormats,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention output [B, H, Tq, D] (float32) of `query` [B, H, Tq, D] over the quantized cache.

    attention_mask: additive float mask or boolean (True = attend) broadcastable to [B, H, Tq, T_total].
    """
    if kv.length is not None:
        raise ValueError("p3_attention_reference takes the sliced cache form: call the static cache layer's "
                         "quantized_kv() without device_length")
    rows = query.shape[-2]
    chunk = max(1, MAX_SCORES_PER_CHUNK // max(1, query.shape[0] * query.shape[1] * (stored_tokens(kv) + kv.residual_keys.shape[-2])))
    if rows <= chunk:
        return _attention_rows(query, kv, attention_mask, scaling, fmt, softcap)
    outputs = []
    for start in range(0, rows, chunk):
        mask = attention_mask
        if mask is not None and mask.shape[-2] > 1:
            mask = mask[..., start : start + chunk, :]
        outputs.append(_attention_rows(query[..., start : start + chunk, :], kv, mask, scaling, fmt, softcap))
    return torch.cat(outputs, dim=-2)


def _attention_rows(
    query: torch.Tensor,
    kv: QuantizedKV,
    attention_mask: torch.Tensor | None,
    scaling: float,
    fmt: AttentionFormats,
    softcap: float | None,
) -> torch.Tensor:
    heads = query.shape[1]
    q = _smoothed_query(query, kv.smoothing, fmt.query_format if kv.keys is not None else "none")
    keys = _key_matrix(kv, heads)
    scores = (q @ keys.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    p, visible = masked_softmax(scores, attention_mask)
    n_quant = stored_tokens(kv)
    p_q, p_r = p[..., :n_quant], p[..., n_quant:]
    out = torch.zeros(*p.shape[:-1], query.shape[-1], dtype=torch.float32, device=query.device)
    if n_quant:
        if kv.values is not None:
            out = out + _quantized_value_output(p_q, kv.values, visible[..., :n_quant], fmt)
        else:
            p8 = fake_quantize_probs(p_q, fmt.prob_format, fmt.prob_rounding)
            out = out + p8 @ expand_kv_heads(kv.dense_values.float(), heads)
    if p_r.shape[-1]:
        p8 = fake_quantize_probs(p_r, fmt.prob_format, fmt.prob_rounding)
        out = out + p8 @ expand_kv_heads(kv.residual_values.float(), heads)
    return out
