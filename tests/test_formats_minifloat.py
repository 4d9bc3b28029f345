"""Bit-exactness of the minifloat formats: FP8-E4M3 against torch's float8_e4m3fn, UE4M4 against bit surgery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p3quant.formats import FP8_E4M3, UE4M4, MiniFloat

FP8_MAX_CODE, FP8_NEG_MAX_CODE, FP8_NAN_CODES = 0x7E, 0xFE, (0x7F, 0xFF)
UE4M4_MAX_CODE = 0xFF


def all_fp16() -> torch.Tensor:
    """Every one of the 65536 FP16 bit patterns, as float16 values (NaN and inf included)."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)


def all_bf16() -> torch.Tensor:
    """Every one of the 65536 BF16 bit patterns, as bfloat16 values (NaN and inf included)."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def torch_fp8_codes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


def grid_midpoints(values: torch.Tensor) -> torch.Tensor:
    """Midpoints between consecutive finite, non-negative grid values (exact in float32 for 8-bit formats)."""
    v = torch.unique(values[torch.isfinite(values) & (values >= 0)]).double()
    return ((v[1:] + v[:-1]) / 2).float()


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """x together with its two float32 neighbours (one ulp below and above)."""
    return torch.cat([x, torch.nextafter(x, torch.zeros_like(x)), torch.nextafter(x, torch.full_like(x, 1e30))])


# --------------------------------------------------------------------------------------------- FP8-E4M3


def test_fp8_encode_matches_torch_on_every_fp16_value_in_range() -> None:
    x = all_fp16()
    x = x[torch.isfinite(x) & (x.abs() <= 448)]
    assert x.numel() == 2 * 0x5F01  # +-0 up to 448 (0x5F00) on both signs: the whole range, nothing skipped
    codes = FP8_E4M3.encode(x)
    expected = torch_fp8_codes(x)
    bad = (codes != expected).nonzero().flatten()
    first = bad[:5]
    assert bad.numel() == 0, f"{bad.numel()} mismatches: x={x[first].tolist()} got {codes[first].tolist()} want {expected[first].tolist()}"


def test_fp8_encode_matches_torch_on_every_bf16_value_in_range() -> None:
    x = all_bf16()
    x = x[torch.isfinite(x) & (x.abs() <= 448)]
    assert torch.equal(FP8_E4M3.encode(x), torch_fp8_codes(x))


def test_fp8_encode_matches_torch_on_fp32_ties_and_their_neighbours() -> None:
    """Every midpoint between FP8 values (where round-to-nearest-even decides) and one fp32 ulp either side."""
    mids = grid_midpoints(FP8_E4M3.decode_table())
    mids = mids[mids < 448]
    x = neighbours(torch.cat([mids, -mids]))
    assert torch.equal(FP8_E4M3.encode(x), torch_fp8_codes(x))


def test_fp8_encode_matches_torch_on_random_fp32() -> None:
    magnitude = torch.exp2(torch.empty(200_000).uniform_(-14, 8.8))  # subnormals, normals, up to 448
    x = (magnitude * torch.randn(200_000).sign()).clamp(-448, 448)
    assert torch.equal(FP8_E4M3.encode(x), torch_fp8_codes(x))


def test_fp8_saturates_beyond_448_and_never_emits_nan_code() -> None:
    x = all_fp16()
    big = x[torch.isfinite(x) & (x.abs() > 448)]
    codes = FP8_E4M3.encode(big)
    assert torch.equal(codes, torch.where(big > 0, FP8_MAX_CODE, FP8_NEG_MAX_CODE).to(torch.uint8))
    huge = torch.tensor([448.0001, 464.0, 480.0, 1e6, 1e30, 3.4e38, torch.finfo(torch.float32).max])
    assert torch.equal(FP8_E4M3.encode(huge), torch.full_like(huge, FP8_MAX_CODE, dtype=torch.uint8))
    assert torch.equal(FP8_E4M3.encode(-huge), torch.full_like(huge, FP8_NEG_MAX_CODE, dtype=torch.uint8))
    finite = x[torch.isfinite(x)]
    codes = FP8_E4M3.encode(finite)
    assert not any(bool((codes == c).any()) for c in FP8_NAN_CODES)


def test_fp8_decode_matches_torch_on_all_256_codes() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = FP8_E4M3.decode(codes)
    theirs = codes.view(torch.float8_e4m3fn).float()
    assert ours.dtype == torch.float32
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.isnan(ours).nonzero().flatten().tolist() == list(FP8_NAN_CODES)
    finite = ~torch.isnan(theirs)
    assert torch.equal(ours[finite], theirs[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(theirs[finite]))  # -0 stays -0
    assert FP8_E4M3.max_value == 448.0


def test_fp8_round_trip_of_every_finite_code() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = codes[~torch.isnan(FP8_E4M3.decode(codes))]
    assert torch.equal(FP8_E4M3.encode(FP8_E4M3.decode(finite)), finite)


# ------------------------------------------------------------------------------------------------- UE4M4


def ue4m4_documented_value(code: int) -> float:
    """P3LLM.md 3.2: E=0: (F/16) * 2^-14; E>0: (1 + F/16) * 2^(E-15)."""
    e, f = code >> 4, code & 0xF
    return f / 16 * 2.0**-14 if e == 0 else (1 + f / 16) * 2.0 ** (e - 15)


def ue4m4_oracle(fp16_bits: np.ndarray, rounding: str) -> np.ndarray:
    """Bit surgery on non-negative FP16 bit patterns below 2.0: code = bits >> 6, the 6 dropped bits rounded."""
    bits = fp16_bits.astype(np.int64)
    base, dropped = bits >> 6, bits & 0x3F
    if rounding == "nearest_even":
        up = (dropped > 0x20) | ((dropped == 0x20) & ((base & 1) == 1))
    else:
        up = dropped >= 0x20
    return np.minimum(base + up, UE4M4_MAX_CODE).astype(np.uint8)


def test_ue4m4_decodes_every_code_to_its_documented_value() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = torch.tensor([ue4m4_documented_value(c) for c in range(256)], dtype=torch.float64)
    got = UE4M4.decode(codes)
    assert got.dtype == torch.float32 and torch.equal(got.double(), expected)
    assert got[0xF0] == 1.0 and got[0xFF] == 1.9375 == UE4M4.max_value
    assert got[0x01] == 2.0**-18 == UE4M4.smallest_step
    assert got[0x10] == 2.0**-14 and got[0x0F] == 15 * 2.0**-18  # smallest normal, largest subnormal
    assert bool((got[1:] > got[:-1]).all())  # unsigned and monotonic: no sign bit, no NaN code


@pytest.mark.parametrize("rounding", ["nearest_even", "half_up"])
def test_ue4m4_encode_equals_bit_surgery_on_every_fp16_in_0_2(rounding: str) -> None:
    bits = np.arange(0, 0x4000, dtype=np.uint16)  # 0x4000 is 2.0: all non-negative FP16 values below 2
    x = torch.from_numpy(bits.view(np.float16).copy())
    got = UE4M4.encode(x, rounding).numpy()
    want = ue4m4_oracle(bits, rounding)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mismatches, first: bits={bits[bad[:5]]} got {got[bad[:5]]} want {want[bad[:5]]}"
    assert torch.equal(UE4M4.encode(x.float(), rounding), torch.from_numpy(want))  # same from fp32


def test_ue4m4_rounding_modes_differ_exactly_on_ties() -> None:
    """Half-up rounds every tie away from zero; nearest-even only ties whose lower code is odd."""
    mids = grid_midpoints(UE4M4.decode_table())
    lower = UE4M4.encode(neighbours(mids)[mids.numel():2 * mids.numel()])  # one ulp below: the lower code
    assert torch.equal(UE4M4.encode(mids, "half_up"), lower + 1)
    assert torch.equal(UE4M4.encode(mids, "nearest_even"), lower + (lower & 1))
    for rounding in ("nearest_even", "half_up"):  # away from ties both modes pick the nearest value
        above = torch.nextafter(mids, torch.full_like(mids, 9.0))
        assert torch.equal(UE4M4.encode(above, rounding), lower + 1)


def test_ue4m4_saturates_at_the_top_rounding_boundary() -> None:
    tie = torch.tensor([1.90625])  # midpoint of 0xFE (1.875) and 0xFF (1.9375)
    assert UE4M4.encode(tie, "nearest_even").item() == 0xFE and UE4M4.encode(tie, "half_up").item() == 0xFF
    at_or_above = torch.tensor([1.9375, 1.95, 1.96875, 1.99, 2.0, 3.0, 1e4, 3.4e38])
    for rounding in ("nearest_even", "half_up"):
        assert bool((UE4M4.encode(at_or_above, rounding) == UE4M4_MAX_CODE).all())
    x = all_fp16()
    big = x[torch.isfinite(x) & (x >= 2)]
    assert bool((UE4M4.encode(big) == UE4M4_MAX_CODE).all())


def test_ue4m4_round_trip_of_every_code() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for rounding in ("nearest_even", "half_up"):
        assert torch.equal(UE4M4.encode(UE4M4.decode(codes), rounding), codes)


def test_ue4m4_rejects_negative_input() -> None:
    with pytest.raises(ValueError, match="unsigned.*negative"):
        UE4M4.encode(torch.tensor([0.5, -1e-6]))
    assert UE4M4.encode(torch.tensor([-0.0])).item() == 0  # negative zero is zero, not an error


def test_ue4m4_tiny_values_use_subnormals_and_flush_below_half_a_step() -> None:
    step = UE4M4.smallest_step
    x = torch.tensor([step * 0.49, step * 0.5, step * 0.51, step * 1.5, step * 2.5, step * 7])
    assert UE4M4.encode(x, "nearest_even").tolist() == [0, 0, 1, 2, 2, 7]
    assert UE4M4.encode(x, "half_up").tolist() == [0, 1, 1, 2, 3, 7]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 2.0, width=16, exclude_max=True), min_size=1, max_size=64),
       st.sampled_from(["nearest_even", "half_up"]))
def test_ue4m4_bf16_fp16_fp32_inputs_agree(values: list[float], rounding: str) -> None:
    """An FP16 value gives the same code whatever float dtype carries it (bf16 only where it is exact)."""
    x16 = torch.tensor(values, dtype=torch.float16)
    want = UE4M4.encode(x16, rounding)
    assert torch.equal(UE4M4.encode(x16.float(), rounding), want)
    assert torch.equal(UE4M4.encode(x16.double(), rounding), want)
    exact_in_bf16 = x16.float() == x16.bfloat16().float()
    assert torch.equal(UE4M4.encode(x16.bfloat16()[exact_in_bf16], rounding), want[exact_in_bf16])


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", [FP8_E4M3, UE4M4], ids=lambda f: f.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(fmt: MiniFloat, bad: float) -> None:
    x = torch.rand(7, 3)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        fmt.encode(x)


@pytest.mark.parametrize("fmt", [FP8_E4M3, UE4M4], ids=lambda f: f.name)
def test_bad_rounding_dtype_and_codes_are_errors(fmt: MiniFloat) -> None:
    with pytest.raises(ValueError, match="rounding"):
        fmt.encode(torch.rand(4), rounding="stochastic")
    with pytest.raises(TypeError, match="floating-point"):
        fmt.encode(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        fmt.decode(torch.ones(4, dtype=torch.int32))
