"""HBM-PIM FP16 MAC lanes against exact-rounding oracles (numpy float16 and exact rationals)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from p3quant.pim_emulator.arith_fp16 import Fp16MacUnit, fp16_mac, round_to_fp16

ALL_FP16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
FINITE_FP16 = ALL_FP16[torch.isfinite(ALL_FP16)]


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh cases every run


def _random_fp16(rng: np.random.Generator, n: int) -> torch.Tensor:
    bits = rng.integers(0, 2**16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits)  # no inf/NaN patterns
    return torch.from_numpy(bits.view(np.float16).copy())


def _fraction_to_fp16(r: Fraction) -> float:
    """Correct round-to-nearest-even of an exact rational to binary16 (inf beyond 65520)."""
    if r == 0:
        return 0.0
    mag = abs(r)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if Fraction(2) ** e > mag:
        e -= 1
    quantum = Fraction(2) ** (max(e, -14) - 10)
    value = round(mag / quantum) * quantum  # Fraction.__round__ rounds half to even
    out = float("inf") if value > 65504 else float(value)
    return out if r > 0 else -out


def test_round_to_fp16_is_identity_on_fp16_and_rounds_midpoints_to_even() -> None:
    v = FINITE_FP16.double()
    assert torch.equal(round_to_fp16(v), v)
    pos = torch.sort(v[v > 0]).values
    mid = (pos[:-1] + pos[1:]) / 2  # exact in float64
    got = round_to_fp16(mid)
    even = (pos[:-1].to(torch.float16).view(torch.int16) & 1) == 0
    assert torch.equal(got, torch.where(even, pos[:-1], pos[1:]))
    assert torch.isinf(round_to_fp16(torch.tensor([65520.0], dtype=torch.float64))).all()
    assert float(round_to_fp16(torch.tensor([65519.99], dtype=torch.float64))) == 65504.0


def test_round_to_fp16_matches_numpy_on_random_doubles() -> None:
    rng = _rng()
    x = rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 17, 200_000))
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float64)  # numpy rounds double -> half directly and correctly
    assert np.array_equal(round_to_fp16(torch.from_numpy(x)).numpy(), want)


def test_separate_rounding_matches_numpy_float16_on_every_a() -> None:
    # numpy's float16 ops compute in float32 (the product exactly; the sum's double rounding via 24 bits
    # is innocuous for 11-bit operands), so they are correctly rounded FP16 operations.
    rng = _rng()
    a = FINITE_FP16.repeat(4)
    b, c = _random_fp16(rng, a.numel()), _random_fp16(rng, a.numel())
    an, bn, cn = a.numpy(), b.numpy(), c.numpy()
    with np.errstate(all="ignore"):
        want = (an * bn) + cn
    got = fp16_mac(c, a, b, "separate").numpy()
    assert np.array_equal(got, want, equal_nan=True)


def _hard_cases(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """acc large, a * b close to half an FP16 ulp of acc: where a double rounding would go wrong."""
    acc = torch.from_numpy((rng.uniform(1, 2, n) * np.exp2(rng.integers(-10, 15, n))).astype(np.float16))
    ulp = torch.pow(2.0, torch.floor(torch.log2(acc.double().abs())) - 10)
    a = torch.from_numpy((rng.uniform(1, 2, n)).astype(np.float16))
    b = round_to_fp16(ulp / 2 / a.double()).to(torch.float16)  # a * b = ulp / 2 up to b's rounding
    return acc, a, b


def test_fused_rounding_matches_exact_rational_oracle() -> None:
    rng = _rng()
    ha, hb, hc = _hard_cases(rng, 2000)
    acc = torch.cat([_random_fp16(rng, 3000), ha])
    a, b = torch.cat([_random_fp16(rng, 3000), hb]), torch.cat([_random_fp16(rng, 3000), hc])
    got = fp16_mac(acc, a, b, "fused").double().tolist()
    for g, x, y, z in zip(got, acc.double().tolist(), a.double().tolist(), b.double().tolist()):
        want = _fraction_to_fp16(Fraction(x) + Fraction(y) * Fraction(z))
        assert g == want, (x, y, z, g, want)


def test_fused_and_separate_differ_somewhere() -> None:
    rng = _rng()
    acc, a, b = _hard_cases(rng, 2000)
    assert bool((fp16_mac(acc, a, b, "fused") != fp16_mac(acc, a, b, "separate")).any())


def test_ieee_special_cases() -> None:
    h = lambda v: torch.tensor([v], dtype=torch.float16)  # noqa: E731
    for mode in ("fused", "separate"):
        assert torch.isnan(fp16_mac(h(0.0), h(float("inf")), h(0.0), mode)).all()
        assert torch.isinf(fp16_mac(h(60000.0), h(256.0), h(256.0), mode)).all()
        assert torch.isnan(fp16_mac(h(float("-inf")), h(float("inf")), h(1.0), mode)).all()
        tiny = fp16_mac(h(0.0), h(2.0**-12), h(2.0**-12), mode)
        assert float(tiny) == 2.0**-24  # subnormal result kept


def test_mac_unit_gemv_accumulates_in_order() -> None:
    rng = _rng()
    w = torch.from_numpy(rng.standard_normal((32, 24)).astype(np.float16))
    x = torch.from_numpy(rng.standard_normal(24).astype(np.float16))
    got = Fp16MacUnit(rounding="separate").gemv(w, x).numpy()
    acc = np.zeros(32, dtype=np.float16)
    for k in range(24):
        acc = acc + w.numpy()[:, k] * x.numpy()[k]
    assert np.array_equal(got, acc)
    fused = Fp16MacUnit(rounding="fused").gemv(w, x).double()
    assert torch.allclose(fused, torch.from_numpy(acc).double(), rtol=0, atol=24 * 2.0**-10 * float(fused.abs().max()))
    with pytest.raises(ValueError):
        Fp16MacUnit(rounding="stochastic")
    with pytest.raises(TypeError):
        fp16_mac(torch.zeros(2), torch.zeros(2), torch.zeros(2))
