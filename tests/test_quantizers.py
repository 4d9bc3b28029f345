"""Operand quantizers (P3LLM.md section 2), the reference attention math and P3Config."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p3quant import PRESETS, P3Config
from p3quant.attention_math import AttentionFormats, QuantizedKV, p3_attention_reference
from p3quant.formats import UE4M4, Int4Tensor
from p3quant.quantizers import (
    FoldedProbs, expand_kv_heads, fake_quantize_activation, key_smoothing_factor, quantize_activation, quantize_keys,
    quantize_keys_per_channel, quantize_probs, quantize_query, quantize_values, quantize_weight,
)

FP8_REL = 2.0**-4  # FP8-E4M3 has 3 mantissa bits: round-to-nearest errs by at most half an ulp = 2^-4 of the value
FP8_SUBNORMAL_HALF_STEP = 2.0**-10  # below 2^-6 the grid step is 2^-9: at most 2^-10 (in units of the scale)
E4M4_REL, E4M4_SUBNORMAL_HALF_STEP = 2.0**-5, 2.0**-19  # 4 mantissa bits; subnormal step 2^-18
INT4_HALF_STEP = 0.51  # 0.5 rounding + < 0.01 for the rounded zero point/FP16 scale at the clip (see format tests)
FP16_SCALE = 1 + 2.0**-10  # an FP16-rounded scale is within a factor 1 +- 2^-11 of the exact one
FP16_TINY = torch.finfo(torch.float16).tiny  # scales are kept in FP16's normal range (formats.grouping.store_scale)


def keys_with_outlier_channels(b: int, h: int, t: int, d: int) -> torch.Tensor:
    """Keys whose channels differ in scale and a few carry a large constant offset (as real post-RoPE keys do)."""
    scale = torch.exp(torch.randn(b, h, 1, d))
    offset = torch.zeros(b, h, 1, d)
    offset[..., torch.randperm(d)[:4]] = 20 * (1 + torch.rand(b, h, 1, 4)) * torch.randn(b, h, 1, 4).sign()
    return torch.randn(b, h, t, d) * scale + offset


def int4_token_scale_bound(x: torch.Tensor) -> torch.Tensor:
    """Upper bound of the INT4-asym scale of each group along the last dim: (max(hi, 0) - min(lo, 0)) / 15."""
    spread = x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)
    return (spread / 15).clamp(min=FP16_TINY) * FP16_SCALE


# ---------------------------------------------------------------------------------------------- activations


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.sampled_from([16, 96, 576]), st.floats(-12, 12))
def test_fp8_activation_per_token_error_bound(batch: int, tokens: int, hidden: int, log2_mag: float) -> None:
    """Per element |x - x_hat| <= 2^-4 * amax(token).

    With scale = amax/448 every x/scale lies in [-448, 448] (plus 2^-11 from the FP16 scale, which saturates to
    448: an error of < 0.23 scale units < 2^-4 * 448). A normal FP8 value errs by <= 2^-4 of itself <= 2^-4 amax/scale;
    a subnormal one by <= 2^-10 scale units. Scaling back multiplies both by the scale.
    """
    x = torch.randn(batch, tokens, hidden) * torch.exp2(torch.randn(batch, tokens, 1) + log2_mag)
    q = quantize_activation(x, "fp8_e4m3")
    assert q.scales.shape == (batch, tokens, 1) and q.codes.shape == x.shape and q.codes.dtype == torch.uint8
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(q.scales.float(), (amax / 448).clamp(min=FP16_TINY), rtol=2**-11)
    err = (q.dequantize() - x).abs()
    slack = 1e-6 * amax
    assert bool((err <= FP8_REL * amax + slack).all())
    finer = FP8_REL * x.abs() + FP8_SUBNORMAL_HALF_STEP * q.scales.float()
    assert bool((err <= finer + slack).all())


def test_int8_activation_per_token() -> None:
    x = torch.randn(3, 17, 256) * torch.exp2(torch.randn(3, 17, 1) * 3)
    q = quantize_activation(x, "int8")
    amax = x.abs().amax(-1, keepdim=True)
    assert q.scales.shape == (3, 17, 1) and int(q.values.abs().max()) <= 127
    assert bool(((q.dequantize() - x).abs() <= 0.5 * (amax / 127).clamp(min=FP16_TINY) * FP16_SCALE + 1e-7 * amax).all())


def test_fake_quantize_activation_keeps_dtype_and_zero_tokens() -> None:
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x[2] = 0.0  # an explicit all-zero token
    for fmt in ("fp8_e4m3", "int8"):
        y = fake_quantize_activation(x, fmt)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and bool((y[2] == 0).all())
        assert not torch.equal(y, x)
    assert fake_quantize_activation(x, "none") is x
    with pytest.raises(ValueError, match="activation format"):
        quantize_activation(x, "fp4")


# ------------------------------------------------------------------------------------------ key smoothing


def test_key_smoothing_factor_uses_only_real_prompt_tokens() -> None:
    b, h, t, d = 3, 2, 12, 16
    k = torch.randn(b, h, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 9:] = False  # right padding / tokens beyond the prompt
    k = torch.where(mask[:, None, :, None], k, 1e3 * torch.randn(b, h, t, d).abs() + 1e3)  # huge junk outside
    k[0, 1, :, 5] = 0.0  # an all-zero channel
    k[1, 0, 4:, 7] = 0.0  # zero on every real token, junk only in the padding
    s = key_smoothing_factor(k, mask)
    assert s.shape == (b, h, 1, d) and torch.isfinite(s).all() and bool((s > 0).all())
    for i in range(b):
        real = k[i][:, mask[i]]  # [h, real tokens, d]
        want = real.abs().amax(1)
        want = torch.where(want > 0, want, torch.ones_like(want))
        assert torch.equal(s[i, :, 0], want)
    assert s[0, 1, 0, 5] == 1 and s[1, 0, 0, 7] == 1
    unmasked = key_smoothing_factor(k)
    assert bool((unmasked >= s).all()) and bool((unmasked[1] > 999).all())  # without a mask the junk counts


def test_smoothed_query_and_keys_preserve_q_dot_k() -> None:
    """q.k = (q * s).(k / s); after quantization the scores stay within the two formats' error bound.

    |q'.k' - q_hat'.k_hat'| <= sum_c |q_hat'_c - q'_c| |k_hat'_c| + |q'_c| |k_hat'_c - k'_c|, with the FP8 error of
    each query element (<= 2^-4 |q'_c| + 2^-10 scale_q) and the INT4 error of each key element (<= 0.51 scale_k).
    """
    b, hq, hkv, t, d = 2, 8, 2, 24, 64
    k = keys_with_outlier_channels(b, hkv, t, d)
    q = torch.randn(b, hq, 5, d)
    s = key_smoothing_factor(k)
    s_q = expand_kv_heads(s, hq)
    exact = q @ expand_kv_heads(k, hq).transpose(-1, -2)
    assert torch.allclose((q * s_q) @ expand_kv_heads(k / s, hq).transpose(-1, -2), exact, rtol=1e-4, atol=1e-3)

    qq, kq = quantize_query(q, s), quantize_keys(k, s)
    assert qq.scales.shape == (b, hq, 5, 1) and kq.scales.shape == (b, hkv, t, 1) and kq.group_size == d
    q_s, k_s = q * s_q, expand_kv_heads(k / s, hq)
    e_q = FP8_REL * q_s.abs() + FP8_SUBNORMAL_HALF_STEP * q_s.abs().amax(-1, keepdim=True) / 448 * FP16_SCALE
    e_k = INT4_HALF_STEP * int4_token_scale_bound(k_s)
    bound = e_q @ (k_s.abs() + e_k).transpose(-1, -2) + q_s.abs() @ e_k.expand_as(k_s).transpose(-1, -2)
    scores = qq.dequantize() @ expand_kv_heads(kq.dequantize(), hq).transpose(-1, -2)
    err = (scores - exact).abs()
    assert bool((err <= bound * 1.0001 + 1e-3).all()), f"worst ratio {(err / bound).max().item():.3f}"

    k_plain = expand_kv_heads(quantize_keys(k, None).dequantize(), hq)
    unsmoothed = quantize_query(q, None).dequantize() @ k_plain.transpose(-1, -2)
    # The point of smoothing: with outlier channels the mean score error drops to ~0.45x (0.39-0.59 in 150 trials).
    assert err.mean() < 0.75 * (unsmoothed - exact).abs().mean()


def test_keys_and_values_int4_per_token_head() -> None:
    b, h, t, d = 2, 3, 10, 32
    k = keys_with_outlier_channels(b, h, t, d)
    v = torch.randn(b, h, t, d) * torch.exp(torch.randn(b, h, t, 1))
    k[0, 1, 4] = 0.0  # explicit all-zero tokens
    v[1, 2, 7] = 0.0
    s = key_smoothing_factor(k)
    kq, kq_plain, vq = quantize_keys(k, s), quantize_keys(k, None), quantize_values(v)
    for qt, ref in ((kq, k / s), (kq_plain, k), (vq, v)):
        assert isinstance(qt, Int4Tensor) and qt.shape == (b, h, t, d) and qt.scales.shape == (b, h, t, 1)
        d_hat = qt.dequantize()
        assert torch.isfinite(d_hat).all()
        assert bool(((d_hat - ref).abs() <= INT4_HALF_STEP * int4_token_scale_bound(ref) + 1e-6 * ref.abs()).all())
    assert bool((kq.dequantize()[0, 1, 4] == 0).all()) and bool((vq.dequantize()[1, 2, 7] == 0).all())


def test_kivi_per_channel_keys() -> None:
    b, h, t, d = 2, 2, 32, 16
    k = keys_with_outlier_channels(b, h, t, d)
    q = quantize_keys_per_channel(k)
    kt = k.transpose(-1, -2)
    assert q.shape == (b, h, d, t) and q.scales.shape == (b, h, d, 1)
    assert torch.allclose(q.scales.float(), int4_token_scale_bound(kt) / FP16_SCALE, rtol=2**-11)
    err = (q.dequantize() - kt).abs()
    assert bool((err <= INT4_HALF_STEP * int4_token_scale_bound(kt) + 1e-6 * kt.abs()).all())
    with pytest.raises(ValueError, match="even number of tokens"):
        quantize_keys_per_channel(k[:, :, :7])


# -------------------------------------------------------------------------------- probabilities (P3LLM 2.5)


def random_probs(b: int, h: int, tq: int, tk: int) -> torch.Tensor:
    scores = torch.randn(b, h, tq, tk) * 3
    scores[-1, :, :, tk - 3:] = -math.inf  # masked keys get p = 0
    return torch.softmax(scores, -1)


@pytest.mark.parametrize("rounding", ["nearest_even", "half_up"])
def test_quantize_probs_folds_value_scales(rounding: str) -> None:
    """(P8 @ (V_code - zp)) * max S_V equals P @ V_hat within the UE4M4 error of each folded probability.

    P'[t] = P[t] S_V[t] / M is coded to E4M4 with error <= 2^-5 P'[t] + 2^-19; multiplied by (V_code - zp)[t] and M.
    """
    b, hq, hkv, tq, tk, d = 2, 4, 2, 3, 40, 16
    p = random_probs(b, hq, tq, tk)
    v = torch.randn(b, hkv, tk, d) * torch.exp(torch.randn(b, hkv, tk, 1) * 1.5)
    vq = quantize_values(v)
    sv = vq.scales.float().squeeze(-1)
    folded = quantize_probs(p, vq.scales.squeeze(-1), "ue4m4", rounding)
    assert isinstance(folded, FoldedProbs) and folded.codes.dtype == torch.uint8
    m = expand_kv_heads(sv, hq).amax(-1)[:, :, None, None]
    assert torch.equal(folded.value_scale_max, m)
    p_prime = p * expand_kv_heads(sv, hq)[:, :, None, :] / m
    assert bool((p_prime <= 1).all()) and bool((folded.values() <= 1).all())
    assert torch.equal(folded.codes, UE4M4.encode(p_prime, rounding))

    centered = expand_kv_heads(vq.centered_codes().float(), hq)
    out = (folded.values() @ centered) * folded.value_scale_max
    unfolded = p @ expand_kv_heads(vq.dequantize(), hq)
    bound = ((E4M4_REL * p_prime + E4M4_SUBNORMAL_HALF_STEP) @ centered.abs()) * m
    assert bool(((out - unfolded).abs() <= bound + 1e-5 * (p @ centered.abs() * m)).all())
    assert (out - unfolded).abs().max() > 1e-3 * bound.max()  # P' really is coded


def test_quantize_probs_round_trips_and_rejects_bad_input() -> None:
    p = random_probs(1, 2, 2, 8)
    sv = torch.rand(1, 2, 8) + 0.1
    folded = quantize_probs(p, sv)
    back = FoldedProbs.from_dict(safetensors.torch.load(safetensors.torch.save(folded.to_dict())))
    assert torch.equal(back.values(), folded.values()) and back.fmt_id == folded.fmt_id
    with pytest.raises(ValueError, match="value scales"):
        quantize_probs(p, sv[..., :7])
    with pytest.raises(ValueError, match=r"\[B,H,Tq,Tk\]"):
        quantize_probs(p[0], sv)
    with pytest.raises(ValueError, match="probability format"):
        quantize_probs(p, sv, "e5m2")


# ------------------------------------------------------------------------------------- non-finite input


def _nan_at(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape)
    x.view(-1)[torch.randint(0, x.numel(), (1,))] = float("nan")
    return x


NON_FINITE_CASES: dict[str, Callable[[], object]] = {
    "weight-bitmod": lambda: quantize_weight(_nan_at((4, 64)), "bitmod", 32),
    "weight-int4": lambda: quantize_weight(_nan_at((4, 64)), "int4", 32),
    "weight-int4-sym": lambda: quantize_weight(_nan_at((4, 64)), "int4_sym", 32),
    "activation-fp8": lambda: quantize_activation(_nan_at((3, 64)), "fp8_e4m3"),
    "activation-int8": lambda: quantize_activation(_nan_at((3, 64)), "int8"),
    "smoothing": lambda: key_smoothing_factor(_nan_at((1, 2, 4, 8))),
    "query": lambda: quantize_query(_nan_at((1, 2, 4, 8)), torch.rand(1, 2, 1, 8) + 0.5),
    "query-unsmoothed": lambda: quantize_query(_nan_at((1, 2, 4, 8)), None),
    "keys": lambda: quantize_keys(_nan_at((1, 2, 4, 8)), torch.rand(1, 2, 1, 8) + 0.5),
    "keys-kivi": lambda: quantize_keys_per_channel(_nan_at((1, 2, 4, 8))),
    "values": lambda: quantize_values(_nan_at((1, 2, 4, 8))),
    "probs": lambda: quantize_probs(_nan_at((1, 2, 4, 8)).abs(), torch.rand(1, 2, 8) + 0.1),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
def test_non_finite_input_raises_a_clear_error(case: str) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        NON_FINITE_CASES[case]()


def test_unknown_weight_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="weight format.*bitmod"):
        quantize_weight(torch.randn(4, 64), "fp4", 32)


# --------------------------------------------------------------------------------------- attention math


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Float64 softmax(q k^T * scaling) v over the visible keys, with GQA heads."""
    hq = q.shape[1]
    scores = (q.double() @ expand_kv_heads(k.double(), hq).transpose(-1, -2)) * scaling
    p = torch.softmax(scores.masked_fill(~mask, -math.inf), -1)
    return p @ expand_kv_heads(v.double(), hq)


def attention_setup(n_quant: int, residual: int) -> tuple:
    b, hq, hkv, tq, d = 2, 4, 2, 3, 32
    t = n_quant + residual
    q = torch.randn(b, hq, tq, d)
    k = keys_with_outlier_channels(b, hkv, t, d) * 0.3
    v = torch.randn(b, hkv, t, d) * torch.exp(torch.randn(b, hkv, t, 1) * 0.5)
    mask = torch.ones(b, 1, tq, t, dtype=torch.bool)
    mask[1, :, :, :3] = False  # left padding of the second sequence
    s = key_smoothing_factor(k[..., :n_quant, :], mask[:, 0, 0, :n_quant])
    kv = QuantizedKV(
        keys=quantize_keys(k[..., :n_quant, :], s), values=quantize_values(v[..., :n_quant, :]), smoothing=s,
        residual_keys=k[..., n_quant:, :], residual_values=v[..., n_quant:, :],
    )
    return q, k, v, s, mask, kv, d**-0.5


def test_attention_reference_without_quantization_is_exact_attention() -> None:
    q, k, v, _, mask, _, scaling = attention_setup(20, 4)
    kv = QuantizedKV(
        None, None, None, k[..., 20:, :], v[..., 20:, :], dense_keys=k[..., :20, :], dense_values=v[..., :20, :]
    )
    fmt = AttentionFormats(query_format="none", prob_format="none", fold_value_scale=False)
    out = p3_attention_reference(q, kv, mask, scaling, fmt)
    assert torch.allclose(out.double(), exact_attention(q, k, v, mask, scaling), rtol=1e-5, atol=1e-5)


def test_attention_reference_composes_the_quantized_operands() -> None:
    """With P unquantized, the reference is exactly softmax(q_hat' k_hat'^T) V_hat on the dequantized operands."""
    q, k, v, s, mask, kv, scaling = attention_setup(20, 4)
    out = p3_attention_reference(q, kv, mask, scaling, AttentionFormats(prob_format="none"))
    q_hat, keys, values = quantized_operands(q, k, v, s, kv)
    assert torch.allclose(out.double(), exact_attention(q_hat, keys, values, mask, scaling), rtol=1e-5, atol=1e-5)


def quantized_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, kv: QuantizedKV) -> tuple:
    """What the P3 attention multiplies: FP8 q * s, INT4 K / s then 16-bit residual K / s, INT4 V then residual V."""
    n = kv.keys.shape[-2]
    keys = torch.cat([kv.keys.dequantize(), k[..., n:, :] / s], -2)
    values = torch.cat([kv.values.dequantize(), v[..., n:, :]], -2)
    return quantize_query(q, s).dequantize(), keys, values


def probability_coding_bound(p_hat: torch.Tensor, kv: QuantizedKV, mask: torch.Tensor, v_abs: torch.Tensor) -> torch.Tensor:
    """Worst-case output error of coding P to E4M4 (P3LLM.md 2.5), in the units of P @ V.

    Quantized keys: P'[t] = P[t] S_V[t] / M errs by <= 2^-5 P'[t] + 2^-19, i.e. by 2^-5 P[t] + 2^-19 M / S_V[t] in
    units of P (M: max S_V over the visible keys). Residual keys: P[t] itself is coded, 2^-5 P[t] + 2^-19.
    """
    n, hq = kv.keys.shape[-2], p_hat.shape[1]
    s_v = expand_kv_heads(kv.values.scales.double(), hq).squeeze(-1)[:, :, None, :]  # [B, H, 1, n]
    m = torch.where(mask[..., :n], s_v, 0).amax(-1, keepdim=True)
    inverse_fold = torch.cat([m / s_v, torch.ones_like(p_hat[..., n:])], -1)
    return (E4M4_REL * p_hat + E4M4_SUBNORMAL_HALF_STEP * inverse_fold) @ v_abs


@pytest.mark.parametrize("residual", [0, 1, 16])
def test_attention_probability_coding_stays_within_e4m4_error(residual: int) -> None:
    """The UE4M4 P (with the value-scale fold) moves the output by no more than the coding bound, and does move it."""
    q, k, v, s, mask, kv, scaling = attention_setup(24, residual)
    coded = p3_attention_reference(q, kv, mask, scaling, AttentionFormats()).double()
    plain = p3_attention_reference(q, kv, mask, scaling, AttentionFormats(prob_format="none")).double()
    q_hat, keys, values = quantized_operands(q, k, v, s, kv)
    p_hat = exact_attention(q_hat, keys, torch.eye(keys.shape[-2]).expand(*keys.shape[:2], -1, -1), mask, scaling)
    bound = probability_coding_bound(p_hat, kv, mask, expand_kv_heads(values.abs(), q.shape[1]).double())
    err = (coded - plain).abs()
    assert bool((err <= bound * 1.001 + 1e-5).all()), f"worst ratio {(err / bound).max().item():.3f}"
    assert err.max() > 1e-3 * bound.max()  # P really is coded (an uncoded P differs only by float rounding)


@pytest.mark.parametrize("residual", [0, 1, 16])
def test_attention_reference_is_within_the_formats_error_of_exact_attention(residual: int) -> None:
    """|O_p3 - O_exact| stays within the error the formats introduce, propagated through softmax and P @ V.

    Scores: with delta = max over the visible keys of |s_hat - s| (the logit error of the FP8 query and INT4 keys,
    whose own bound is tested above), every p_t moves by a factor within e^(+-2 delta): |p_hat - p|_t <=
    (e^(2 delta) - 1) p_t. Values: INT4 errs by <= 0.51 S_V[t]. P: the E4M4 coding bound (2.5).
    """
    n_quant = 24
    q, k, v, s, mask, kv, scaling = attention_setup(n_quant, residual)
    out = p3_attention_reference(q, kv, mask, scaling, AttentionFormats()).double()
    exact = exact_attention(q, k, v, mask, scaling)
    hq, t = q.shape[1], k.shape[-2]
    q_hat, keys, _ = quantized_operands(q, k, v, s, kv)
    identity = torch.eye(t).expand(*k.shape[:2], -1, -1)
    p = exact_attention(q, k, identity, mask, scaling)
    p_hat = exact_attention(q_hat, keys, identity, mask, scaling)
    logits = (q.double() @ expand_kv_heads(k.double(), hq).transpose(-1, -2)) * scaling
    logits_hat = (q_hat.double() @ expand_kv_heads(keys.double(), hq).transpose(-1, -2)) * scaling
    delta = (logits_hat - logits).abs().masked_fill(~mask, 0).amax(-1, keepdim=True)
    e_v = INT4_HALF_STEP * int4_token_scale_bound(expand_kv_heads(v, hq)).double()
    e_v[..., n_quant:, :] = 0  # residual values stay 16-bit
    v_abs = expand_kv_heads(v.abs(), hq).double()
    bound = (
        probability_coding_bound(p_hat, kv, mask, v_abs + e_v)
        + ((torch.exp(2 * delta) - 1) * p) @ (v_abs + e_v)
        + p @ e_v
    )
    err = (out - exact).abs()
    assert bool((err <= bound * 1.001 + 1e-5).all()), f"worst ratio {(err / bound).max().item():.3f}"
    assert err.max() > 0


# ------------------------------------------------------------------------------------------------ config


def test_every_preset_constructs_and_round_trips() -> None:
    required = {"w4a8kv4p8", "kv4", "w4a16", "fp16", "int4-w4a8kv4"}
    assert required <= set(PRESETS) and sum(name.startswith("ablation-") for name in PRESETS) >= 9
    for name in PRESETS:
        cfg = P3Config.preset(name)
        assert P3Config.from_dict(cfg.to_dict()) == cfg
        text = cfg.to_json()
        assert P3Config.from_json(text) == cfg and json.loads(text)["weight_format"] == cfg.weight_format
        assert P3Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_presets_mean_what_they_say() -> None:
    paper = P3Config.preset("w4a8kv4p8")
    assert paper == P3Config()
    assert (paper.weight_format, paper.weight_group_size, paper.activation_format) == ("bitmod", 128, "fp8_e4m3")
    assert (paper.query_format, paper.key_format, paper.key_smoothing) == ("fp8_e4m3", "int4", True)
    assert (paper.key_position, paper.value_format) == ("post_rope", "int4")
    assert (paper.prob_format, paper.fold_value_scale, paper.quantize_embeddings) == ("ue4m4", True, False)
    assert "lm_head" in paper.skip_modules
    fp16 = P3Config.preset("fp16")
    assert not fp16.quantizes_weights and not fp16.quantizes_kv and fp16.activation_format == fp16.prob_format == "none"
    kv4 = P3Config.preset("kv4")
    assert not kv4.quantizes_weights and kv4.quantizes_kv and kv4.key_smoothing and kv4.activation_format == "none"
    w4a16 = P3Config.preset("w4a16")
    assert w4a16.weight_format == "bitmod" and w4a16.activation_format == "none" and not w4a16.quantizes_kv
    base = P3Config.preset("int4-w4a8kv4")
    assert (base.weight_format, base.activation_format, base.key_smoothing) == ("int4", "int8", False)
    assert base.query_format == base.prob_format == "none" and base.quantizes_kv


def test_overrides() -> None:
    cfg = P3Config.preset("w4a8kv4p8", weight_group_size=64, residual_window=16)
    assert cfg.weight_group_size == 64 and cfg.residual_window == 16 and cfg.weight_format == "bitmod"
    assert P3Config.preset("kv4", prob_rounding="half_up").prob_rounding == "half_up"
    assert cfg.replace(skip_modules=["lm_head", "embed_tokens"]).skip_modules == ("lm_head", "embed_tokens")
    with pytest.raises(ValueError, match="weight_groupsize"):
        P3Config.preset("w4a8kv4p8", weight_groupsize=64)
    with pytest.raises(ValueError, match="unknown preset 'w4a4'.*w4a8kv4p8"):
        P3Config.preset("w4a4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_format = "int4"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (dict(weight_format="fp4"), ["weight_format"]),
        (dict(activation_format="fp16"), ["activation_format"]),
        (dict(prob_rounding="stochastic"), ["prob_rounding"]),
        (dict(key_position="mid_rope", key_smoothing=False), ["key_position"]),
        (dict(weight_group_size=0), ["weight_group_size"]),
        (dict(weight_group_size=33), ["weight_group_size"]),
        (dict(residual_window=-1), ["residual_window"]),
        (dict(key_format="none"), ["key_smoothing", "key_format"]),
        (dict(key_granularity="per_channel"), ["key_smoothing"]),
        (dict(key_granularity="per_channel", key_smoothing=False, kivi_group_size=3), ["kivi_group_size"]),
        (dict(key_position="pre_rope"), ["query_format", "key_position"]),
        (dict(key_position="pre_rope", query_format="none"), ["key_smoothing", "key_position"]),
        (dict(value_format="none"), ["value_format", "fold_value_scale"]),
    ],
)
def test_invalid_combinations_name_the_field_to_change(overrides: dict, names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        P3Config.preset("w4a8kv4p8", **overrides)
    assert all(name in str(info.value) for name in names), str(info.value)
    with pytest.raises(ValueError):
        P3Config.from_json(json.dumps({**P3Config().to_dict(), **overrides}))
