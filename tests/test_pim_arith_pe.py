"""P3 PE arithmetic, exhaustively over operand codes, against exact values and the numpy golden model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p3quant.formats import FP8_E4M3, UE4M4, BitMoDTensor, Int4Tensor, pack_int4
from p3quant.pim_emulator import golden
from p3quant.pim_emulator.arith_p3 import (
    AccumulatorOverflow, P3Pcu, PeConfig, accumulate, aligned_products, decompose, input_format, product_table,
)
from p3quant.pim_emulator.functional import weight_integers

FMTS = {"fp8_e4m3": FP8_E4M3, "ue4m4": UE4M4}
ALL_W = torch.arange(-16, 17)  # every BitMoD integer (grid x 2, SV +-10/+-16) and every INT4 code - zp


def _finite_codes(name: str) -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8)
    return codes[~torch.isnan(FMTS[name].decode(codes))]


@pytest.mark.parametrize("name", ["fp8_e4m3", "ue4m4"])
def test_decompose_fits_6bit_multiplier_and_reconstructs_every_code(name: str) -> None:
    fmt = FMTS[name]
    codes = _finite_codes(name)
    sig, shift = decompose(codes, fmt)
    assert int(sig.abs().max()) <= 31 and int(shift.min()) >= 0 and int(shift.max()) <= 14
    value = sig.double() * torch.pow(2.0, (shift + fmt.min_normal_exponent - fmt.man_bits).double())
    assert torch.equal(value, fmt.decode(codes).double())


@pytest.mark.parametrize("name", ["fp8_e4m3", "ue4m4"])
@pytest.mark.parametrize("frac_bits", [None, 0, 3, 7, 12])
@pytest.mark.parametrize("truncation", ["floor", "zero"])
def test_every_product_matches_exact_value_and_golden(name: str, frac_bits: int | None, truncation: str) -> None:
    fmt = FMTS[name]
    cfg = PeConfig(frac_bits=frac_bits, truncation=truncation)
    codes = _finite_codes(name)
    got = aligned_products(codes[:, None], ALL_W[None, :], fmt, cfg)
    k = cfg.frac_bits_for(fmt)
    exact = fmt.decode(codes).double()[:, None] * ALL_W[None, :].double() * 2.0**k
    want = torch.floor(exact) if truncation == "floor" else torch.trunc(exact)
    assert torch.equal(got.double(), want)
    if frac_bits is None:
        assert torch.equal(got.double(), exact)  # the default alignment never drops a bit
    c = np.broadcast_to(codes.numpy()[:, None, None], (len(codes), len(ALL_W), 4)).copy()
    w = np.zeros_like(c, dtype=np.int64)
    w[..., 0] = ALL_W.numpy()[None, :]
    g_acc, _ = golden.dot(c, w, name, frac_bits=frac_bits, truncation=truncation)
    assert np.array_equal(g_acc, got.numpy())


def test_product_table_rows_are_the_pe_products() -> None:
    cfg = PeConfig(frac_bits=5)
    table = product_table("fp8_e4m3", cfg)
    codes = _finite_codes("fp8_e4m3")
    assert torch.equal(table[codes.long()], aligned_products(codes[:, None], ALL_W[None, :], FP8_E4M3, cfg))


def test_nan_input_code_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        decompose(torch.tensor([0x7F], dtype=torch.uint8), FP8_E4M3)


def test_weight_integers_cover_every_code_selector_and_zero_point() -> None:
    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 16)  # [4 rows, 256]: each group = all 16 codes
    sel = torch.arange(4, dtype=torch.uint8)[:, None].repeat(1, 16)
    bm = BitMoDTensor(pack_int4(codes), torch.ones(4, 16, dtype=torch.float16), sel, (4, 256), 16)
    ints, unit = weight_integers(bm)
    assert unit == 0.5 and torch.equal(ints.long(), bm.integer_values().long())
    assert np.array_equal(ints.numpy(), golden.bitmod_integers(bm.packed.numpy(), sel.numpy(), 16))
    assert sorted(set(ints.flatten().tolist())) == [-16, -12, -10, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 10, 12, 16]
    codes = torch.arange(16, dtype=torch.uint8).repeat(16, 1)
    zeros = torch.arange(16, dtype=torch.uint8)[:, None]
    i4 = Int4Tensor(pack_int4(codes), torch.ones(16, 1, dtype=torch.float16), zeros, (16, 16), 16)
    ints, unit = weight_integers(i4)
    assert unit == 1.0 and torch.equal(ints.long(), i4.centered_codes().long())
    assert ints.min() == -15 and ints.max() == 15


def test_pcu_step_and_tep_share_one_weight_slice() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    inputs = torch.randint(0, 256, (2, 4), generator=gen, dtype=torch.uint8) & 0xF6  # never the NaN code
    weights = torch.randint(-16, 17, (16, 4), generator=gen)
    tep, plain = P3Pcu(tep=True), P3Pcu(tep=False)
    both = tep.step(torch.zeros(2, 16, dtype=torch.int64), inputs, weights, "fp8_e4m3")
    one = [plain.step(torch.zeros(1, 16, dtype=torch.int64), inputs[i:i + 1], weights, "fp8_e4m3") for i in range(2)]
    assert torch.equal(both, torch.cat(one))
    exact = (FP8_E4M3.decode(inputs).double()[:, None, :] * weights.double()[None]).sum(-1) * 2**9
    assert torch.equal(both.double(), exact)
    with pytest.raises(ValueError, match="n <= 1"):
        plain.step(torch.zeros(2, 16, dtype=torch.int64), inputs, weights, "fp8_e4m3")


def test_overflow_is_detected_even_when_the_final_sum_fits() -> None:
    cfg = PeConfig(acc_bits=16)
    big = 1 << 14
    products = torch.tensor([[big, big, 0, 0, -big, -big, 0, 0]])  # running sum 2^15 > 2^15 - 1, final 0
    with pytest.raises(AccumulatorOverflow):
        accumulate(products, cfg)
    acc, report = accumulate(products, PeConfig(acc_bits=16, on_overflow="saturate"))
    assert report.saturated == 1 and int(acc) == (2**15 - 1) - 2 * big
    g_acc, g_sat = golden.dot(np.full((1, 8), 0x38, dtype=np.uint8), (products // 512).numpy(), "fp8_e4m3",
                              acc_bits=16, on_overflow="saturate")  # 0x38 = 1.0: product = w * 2^9
    assert g_sat == 1 and int(g_acc[0]) == int(acc)
    fine, report = accumulate(products[:, :4] // 2, cfg)
    assert int(fine) == big and report.saturated == 0


def test_pcu_step_reports_overflow() -> None:
    inputs = torch.full((1, 4), 0x7E, dtype=torch.uint8)  # 448
    weights = torch.full((16, 4), 16)
    with pytest.raises(AccumulatorOverflow):
        P3Pcu(tep=False).step(torch.zeros(1, 16, dtype=torch.int64), inputs, weights, "fp8_e4m3", PeConfig(acc_bits=20))


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        PeConfig(truncation="nearest")
    with pytest.raises(ValueError):
        PeConfig(acc_bits=4)
    with pytest.raises(ValueError):
        input_format("int8")
    with pytest.raises(ValueError, match="multiple of 4"):
        accumulate(torch.zeros(1, 6, dtype=torch.int64), PeConfig())
