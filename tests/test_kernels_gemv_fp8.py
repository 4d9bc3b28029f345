"""FP8 tensor-core decode GEMV (kernels/gemv_fp8.py): the interpreter path (tensor-op fragments) vs the exact
quantized product, and its PTX's E4M3 table lookup, run through a small PTX emulator over every code, special
value and sign."""

import pytest
import torch

from p3quant.formats import BITMOD4, INT4, quantize_scaled_fp8
from p3quant.formats.bitmod import code_integers
from p3quant.kernels import gemm_w4, gemv_fp8

FP32_TOL = 1e-5  # fp32 sums of exact products against float64 of the same quantized operands


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m,n,k,group,fmt,config", [
    (1, 40, 256, 128, "bitmod", None), (3, 19, 384, 64, "int4", (1, 2)), (8, 70, 640, 128, "bitmod", (2, 4)),
    (5, 33, 512, 64, "bitmod", (1, 1)), (2, 16, 896, 128, "int4", (2, 8)),  # 7 groups over 8 warps: idle warps
])
def test_gemv_fp8_matches_exact_quantized_product(monkeypatch, m, n, k, group, fmt, config):
    """Ragged N (rows past N load row N - 1, never stored), tokens 1..8, K split over warps unevenly, bias."""
    monkeypatch.setattr(gemv_fp8, "CONFIG_OVERRIDE", config)
    calls = []
    original = gemv_fp8.gemv_fp8
    monkeypatch.setattr(gemm_w4, "gemv_fp8", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    weight = (BITMOD4 if fmt == "bitmod" else INT4).quantize(torch.randn(n, k) * (1 + torch.rand(n, 1)), group)
    x = torch.randn(m, k).to(torch.bfloat16) * 3
    bias = torch.randn(n).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.float32)
    y = gemm_w4.w4_matmul(x, weight, bias, "fp8_e4m3", out_dtype=torch.float32, out=out)
    exact = quantize_scaled_fp8(x).dequantize().double() @ weight.dequantize().double().t() + bias.double()
    assert calls and torch.isfinite(y).all() and _rel(y, exact) < FP32_TOL


def test_gemv_fp8_routing(monkeypatch):
    """W4A8 with M <= 8 and groups of 64 / 128 take the FP8 GEMV; M = 9, group 32 and W4A16 do not."""
    calls = []
    original = gemv_fp8.gemv_fp8
    monkeypatch.setattr(gemm_w4, "gemv_fp8", lambda *a, **kw: calls.append(a[0].shape[0]) or original(*a, **kw))
    for m, group, fmt in ((8, 128, "fp8_e4m3"), (9, 128, "fp8_e4m3"), (1, 32, "fp8_e4m3"), (1, 64, "none")):
        weight = BITMOD4.quantize(torch.randn(16, 256), group)
        gemm_w4.w4_matmul(torch.randn(m, 256), weight, None, fmt)
    assert calls == [8]
    assert gemm_w4.activation_layout(4, "fp8_e4m3", 128, torch.device("cpu")) == "halves_e4m3"
    assert gemm_w4.activation_layout(4, "fp8_e4m3", 32, torch.device("cpu")) == "halves"


# --- the PTX table lookup, emulated bit for bit (prmt with sign replication, or, shl, lop3) ---

def _prmt(a: int, b: int, sel: int) -> int:
    src = (a | (b << 32)).to_bytes(8, "little")
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 15
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """lop3.b32: bit i of the result is bit (4 a_i + 2 b_i + c_i) of the truth table."""
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i for i in range(32))


def _e4m3(byte: int) -> float:
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


def _decode_half(sel: int, bitmod: bool, tables: tuple[int, ...]) -> int:
    """_decode_half_ptx's instructions on Python ints."""
    seln = sel ^ 0x8888
    if not bitmod:
        t0, t1, t2, t3 = tables
        return _prmt(t0, t1, sel) | _prmt(t2, t3, seln)
    p0, p1, n0, n1, s0, s1 = tables
    r = _prmt(p0, p1, sel) | _prmt(n0, n1, seln)
    s = (_prmt(s0, s1, sel) << 7) & 0xFFFFFFFF
    return _lop3(r, s, 0x80808080, 0xF2)


@pytest.mark.parametrize("selector", range(4))
def test_bitmod_e4m3_lookup_every_code(selector):
    """Every 4-bit code under every special value: the PTX lookup's byte is the E4M3 encoding of BitMoD's grid x 2
    (code_integers; the special value in the slot of code 8, with its sign)."""
    n0 = 0x44403800 | (0x58 if selector >= 2 else 0x52)
    s0 = 0x7F7F7FFF if selector & 1 else 0x7F7F7F7F
    tables = (int(gemv_fp8._BM_P0), int(gemv_fp8._BM_P1), n0, int(gemv_fp8._BM_P1), s0, 0x7F7F7F7F)
    expected = code_integers()[selector].tolist()
    for code in range(16):
        out = _decode_half(code * 0x1111, True, tables)  # the same code in all four slots
        assert [_e4m3((out >> (8 * i)) & 0xFF) for i in range(4)] == [expected[code]] * 4, (selector, code)


def test_int4_e4m3_lookup_every_code():
    tables = tuple(int(t) for t in (gemv_fp8._I4_T0, gemv_fp8._I4_T1, gemv_fp8._I4_T2, gemv_fp8._I4_T3))
    for code in range(16):
        out = _decode_half(code * 0x1111, False, tables)
        assert [_e4m3((out >> (8 * i)) & 0xFF) for i in range(4)] == [code] * 4


def test_mixed_codes_land_in_their_own_bytes():
    """Four different codes in one selector: byte i holds code i's value (no bleeding between bytes from the shift)."""
    tables = (int(gemv_fp8._BM_P0), int(gemv_fp8._BM_P1), 0x44403858, int(gemv_fp8._BM_P1), 0x7F7F7FFF, 0x7F7F7F7F)
    expected = code_integers()[3].tolist()
    for codes in ((8, 1, 15, 0), (9, 8, 7, 12), (0, 8, 8, 3)):
        sel = sum(c << (4 * i) for i, c in enumerate(codes))
        out = _decode_half(sel, True, tables)
        assert [_e4m3((out >> (8 * i)) & 0xFF) for i in range(4)] == [expected[c] for c in codes]
