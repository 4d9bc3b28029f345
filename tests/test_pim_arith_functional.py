"""Functional PIM GEMVs on packed tensors: exact equality with the numpy golden model, and agreement with
the float32 torch reference within the documented bound (docs/pim_arithmetic.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p3quant.formats import BITMOD4, INT4, UE4M4, BitMoDTensor, quantize_scaled_fp8
from p3quant.pim_emulator import golden
from p3quant.pim_emulator.arith_p3 import AccumulatorOverflow, PeConfig
from p3quant.pim_emulator.functional import (
    linear_accumulators, pim_linear, pim_pv, pim_qk, pv_accumulators, qk_accumulators,
)
from p3quant.quantizers import expand_kv_heads, quantize_keys, quantize_query, quantize_values

EPS32 = 2.0**-24


def _heavy(*shape: int) -> torch.Tensor:
    """Fresh random data spanning many binades (FP8 subnormals included), never all zeros."""
    return torch.randn(*shape) * torch.exp(1.5 * torch.randn(*shape))


def _weight(fmt: str, n: int, k: int, group: int):
    w = _heavy(n, k)
    return BITMOD4.quantize(w, group) if fmt == "bitmod" else INT4.quantize(w, group)


def _golden_ints(w) -> np.ndarray:
    if isinstance(w, BitMoDTensor):
        return golden.bitmod_integers(w.packed.numpy(), w.selectors.numpy(), w.group_size)
    return golden.int4_integers(w.packed.numpy(), w.zeros.numpy(), w.group_size)


CONFIGS = [
    PeConfig(),  # exact products, fast integer-matmul path
    PeConfig(frac_bits=5),  # truncating toward -inf
    PeConfig(frac_bits=6, truncation="zero"),
    PeConfig(acc_bits=22, on_overflow="saturate"),  # narrow register: saturations happen
]


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["exact", "floor5", "zero6", "acc22sat"])
def test_linear_equals_golden_model(fmt: str, cfg: PeConfig) -> None:
    m, n, k, group = 3, 40, 256, 64
    w = _weight(fmt, n, k, group)
    x = quantize_scaled_fp8(_heavy(m, k) * 50)
    if cfg.acc_bits == 22:  # add a row of same-signed large products: the narrow register must saturate
        x = quantize_scaled_fp8(torch.cat([_heavy(m - 1, k) * 50, w.dequantize().sign()[:1] * 448]))
    acc, unit, stats = linear_accumulators(x, w, cfg)
    codes = x.codes.numpy().reshape(m, 1, k // group, group)
    ints = _golden_ints(w).reshape(1, n, k // group, group)
    want, saturated = golden.dot(codes, ints, "fp8_e4m3", acc_bits=cfg.acc_bits, frac_bits=cfg.frac_bits,
                                 truncation=cfg.truncation, on_overflow=cfg.on_overflow)
    assert np.array_equal(acc.numpy(), want)
    assert stats.overflow.saturated == saturated
    if cfg.acc_bits == 22:
        assert saturated > 0  # the case really exercises the narrow register
    y, _ = pim_linear(x, w, cfg)
    frac = 9 if cfg.frac_bits is None else cfg.frac_bits
    y_gold = (want * 2.0**-frac * w.scales.double().numpy()[None] * unit).sum(-1) * x.scales.double().numpy()
    assert np.allclose(y.numpy(), y_gold, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
@pytest.mark.parametrize("frac_bits", [None, 4])
def test_linear_agrees_with_torch_reference_within_bound(fmt: str, frac_bits: int | None) -> None:
    m, n, k, group = 2, 64, 512, 128
    w = _weight(fmt, n, k, group)
    x = quantize_scaled_fp8(_heavy(m, k))
    y, _ = pim_linear(x, w, PeConfig(frac_bits=frac_bits))
    xd, wd = x.dequantize(), w.dequantize()
    ref = xd @ wd.t()
    # float32 dot products of K terms: |error| <= K * 2^-24 * sum |x||w| (+ one final rounding of y).
    bound = k * EPS32 * (xd.abs() @ wd.abs().t()) + EPS32 * ref.abs()
    if frac_bits is not None:  # each truncated product is off by < one accumulator LSB (2^-frac_bits)
        unit = 0.5 if fmt == "bitmod" else 1.0
        per_group = group * 2.0**-frac_bits * unit * w.scales.float()  # [N, G]
        bound = bound + x.scales.float() * per_group.sum(-1)[None, :]
    assert bool(((y - ref).abs() <= bound).all())
    assert float((y - ref).abs().max()) > 0 or frac_bits is None


def _attention_operands(b: int, h: int, hkv: int, t: int, d: int):
    keys = _heavy(b, hkv, t, d)
    smoothing = keys.abs().amax(dim=-2, keepdim=True)
    kq = quantize_keys(keys, smoothing)
    q8 = quantize_query(_heavy(b, h, 1, d), smoothing)
    vq = quantize_values(_heavy(b, hkv, t, d))
    p = torch.softmax(3 * torch.randn(b, h, 1, t), dim=-1)
    p_codes = UE4M4.encode(p)
    return q8, kq, vq, p_codes


def test_attention_gemvs_equal_golden_model() -> None:
    b, h, hkv, t, d = 2, 4, 2, 37, 32  # t not a multiple of 4: P.V pads with zero products
    q8, kq, vq, p_codes = _attention_operands(b, h, hkv, t, d)
    r = h // hkv
    acc, _ = qk_accumulators(q8, kq)
    kints = golden.int4_integers(kq.packed.numpy(), kq.zeros.numpy(), d)  # [B, Hkv, T, D]
    qc = q8.codes.numpy().reshape(b, hkv, r, 1, d)
    want, _ = golden.dot(qc, kints[:, :, None], "fp8_e4m3")
    assert np.array_equal(acc.numpy(), want)
    acc, _ = pv_accumulators(p_codes, vq)
    vints = golden.int4_integers(vq.packed.numpy(), vq.zeros.numpy(), d).transpose(0, 1, 3, 2)  # [B, Hkv, D, T]
    pad = -t % 4
    pc = np.pad(p_codes.numpy().reshape(b, hkv, r, 1, t), [(0, 0)] * 4 + [(0, pad)])
    want, _ = golden.dot(pc, np.pad(vints, [(0, 0)] * 3 + [(0, pad)])[:, :, None], "ue4m4")
    assert np.array_equal(acc.numpy(), want)


def test_attention_gemvs_agree_with_torch_reference_within_bound() -> None:
    b, h, hkv, t, d = 1, 8, 2, 64, 64
    q8, kq, vq, p_codes = _attention_operands(b, h, hkv, t, d)
    scores, _ = pim_qk(q8, kq)
    qd, kd = q8.dequantize(), expand_kv_heads(kq.dequantize(), h)
    ref = qd @ kd.transpose(-1, -2)
    bound = d * EPS32 * (qd.abs() @ kd.abs().transpose(-1, -2)) + EPS32 * ref.abs()
    assert bool(((scores - ref).abs() <= bound).all())
    out, _ = pim_pv(p_codes, vq)
    pd, vc = UE4M4.decode(p_codes), expand_kv_heads(vq.centered_codes().float(), h)
    ref = pd @ vc
    bound = t * EPS32 * (pd @ vc.abs()) + EPS32 * ref.abs()
    assert bool(((out - ref).abs() <= bound).all())


def test_tep_halves_weight_fetches_without_changing_results() -> None:
    w = _weight("bitmod", 32, 256, 128)
    x = quantize_scaled_fp8(_heavy(2, 256))
    y_tep, s_tep = pim_linear(x, w, tep=True)
    y_one, s_one = pim_linear(x, w, tep=False)
    assert torch.equal(y_tep, y_one)
    assert s_one.column_accesses == 2 * s_tep.column_accesses == 2 * (32 * 256 * 4 // 256)
    assert s_tep.macs == 2 * 32 * 256 and s_tep.readouts == 2 * 32 * 2


def test_narrow_accumulator_raises_by_default() -> None:
    w = _weight("int4", 16, 128, 128)
    x = quantize_scaled_fp8(torch.full((1, 128), 448.0))
    with pytest.raises(AccumulatorOverflow):
        pim_linear(x, w, PeConfig(acc_bits=20))


def test_shape_errors_are_clear() -> None:
    w = _weight("bitmod", 16, 128, 64)
    with pytest.raises(ValueError, match="does not match"):
        pim_linear(quantize_scaled_fp8(_heavy(1, 64)), w)
    with pytest.raises(TypeError):
        pim_linear(quantize_scaled_fp8(_heavy(1, 128)), w.dequantize())
