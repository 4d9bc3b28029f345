"""Tensor-core small-M W4A8 GEMM (kernels/w4_mma.py): the interpreter path vs the exact quantized product, and
the GPU's inline PTX (decodes, the native E4M3 rounding) run through a small PTX emulator over every code, special
value and zero point."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from p3quant.formats import BITMOD4, INT4, quantize_scaled_fp8
from p3quant.kernels import common, gemm_w4, w4_mma
from p3quant.kernels.act_quant import quantize_activation_fp8, quantize_activation_fp8_halves
from p3quant.kernels.common import _E4M3_PAIR, bitmod_special2, decode_tables, decode_w4, int4_pair_bias, round_e4m3

FP32_TOL = 1e-5  # fp32 accumulation against float64 of the same quantized operands


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m,n,k,group,fmt,split_k", [
    (1, 40, 256, 64, "bitmod", None), (2, 19, 96, 32, "bitmod", None), (3, 33, 256, 32, "int4", None),
    (16, 70, 512, 128, "bitmod", 4), (37, 24, 128, 128, "int4", 1), (64, 65, 256, 64, "int4", 2),
    (5, 33, 640, 128, "bitmod", 2),  # 5 groups in splits of 3 and 2: a shorter last split
])
def test_mma_gemm_matches_exact_quantized_product(monkeypatch, m, n, k, group, fmt, split_k):
    monkeypatch.setattr(gemm_w4, "MMA_MIN_M", 1)
    if split_k is not None:
        original = w4_mma.w4_mma_matmul
        monkeypatch.setattr(gemm_w4, "w4_mma_matmul", lambda *a, **kw: original(*a, **kw, split_k=split_k))
    weight = (BITMOD4 if fmt == "bitmod" else INT4).quantize(torch.randn(n, k) * (1 + torch.rand(n, 1)), group)
    x = torch.randn(m, k).to(torch.bfloat16) * 3
    bias = torch.randn(n).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.float32)
    y = gemm_w4.w4_matmul(x, weight, bias, "fp8_e4m3", out_dtype=torch.float32, out=out)
    exact = quantize_scaled_fp8(x).dequantize().double() @ weight.dequantize().double().t() + bias.double()
    assert torch.isfinite(y).all() and _rel(y, exact) < FP32_TOL
    y16 = gemm_w4.w4_matmul(x, weight, None, "fp8_e4m3")
    assert y16.dtype == torch.bfloat16 and _rel(y16, exact - bias.double()) < 2.0**-7


@pytest.mark.parametrize("m,dtype,fmt,split_k", [(3, torch.bfloat16, "bitmod", None), (16, torch.float16, "int4", 2),
                                                  (37, torch.float32, "bitmod", 1), (2, torch.bfloat16, "int4", 3)])
def test_mma_gemm_w4a16_matches_exact_product(monkeypatch, m, dtype, fmt, split_k):
    """16-bit activations through the small-M kernel: weights decoded to the activations' type (fp32 ones run as
    bf16, as everywhere in W4A16), fp32 accumulation."""
    monkeypatch.setattr(gemm_w4, "MMA_MIN_M", 1)
    if split_k is not None:
        original = w4_mma.w4_mma_matmul
        monkeypatch.setattr(gemm_w4, "w4_mma_matmul", lambda *a, **kw: original(*a, **kw, split_k=split_k))
    weight = (BITMOD4 if fmt == "bitmod" else INT4).quantize(torch.randn(41, 384), 128 if fmt == "bitmod" else 64)
    x = (torch.randn(m, 384) * 3).to(dtype)
    bias = torch.randn(41)
    y = gemm_w4.w4_matmul(x, weight, bias, "none", out_dtype=torch.float32, out=torch.full((m, 41), float("nan")))
    xr = x.to(torch.bfloat16) if dtype == torch.float32 else x
    exact = xr.double() @ weight.dequantize().double().t() + bias.double()
    assert torch.isfinite(y).all() and _rel(y, exact) < FP32_TOL


def test_rows_epilogue_sums_splits_in_chunks_of_rows(monkeypatch):
    monkeypatch.setattr(w4_mma, "EPILOGUE_ROWS_PER_LAUNCH", 3)  # 7 rows: launches of 3, 3 and 1 rows
    part = torch.randn(3, 7, 19)
    scales, bias = torch.rand(7) + 0.5, torch.randn(19)
    y = torch.full((7, 19), float("nan"))
    w4_mma.rows_epilogue(part, scales, bias, y, is_bitmod=True)
    expected = (part[0] + part[1] + part[2]) * scales[:, None] * 0.5 + bias
    assert torch.allclose(y, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        w4_mma.rows_epilogue(part.transpose(1, 2), scales, bias, y)


@pytest.mark.parametrize("shared_bytes,x_bytes,want", [(232448, 2, 4), (232448, 1, 4), (101376, 2, 2), (101376, 1, 4),
                                                      (40000, 2, 1)])
def test_pipeline_stages_fit_the_gpus_shared_memory(monkeypatch, shared_bytes, x_bytes, want):
    """128 token rows at groups of 128: 16-bit activations take 36 KB per stage, FP8 codes 20 KB (H100's 227 KB
    holds 4 of either, a 99 KB GPU 2 or 4); a GPU too small for one full stage still gets one (Triton then says
    what it lacks)."""
    monkeypatch.setattr(w4_mma, "shared_memory_bytes", lambda device: shared_bytes)
    assert w4_mma.fitting_stages(4, 128, 64, 128, x_bytes, torch.device("cuda", 0)) == want
    assert w4_mma.fitting_stages(4, 128, 64, 128, x_bytes, torch.device("cpu")) == 4


def test_halves_activation_layout_is_a_permutation_of_the_codes():
    x = torch.randn(3, 96, dtype=torch.bfloat16) * 5
    codes, scales = quantize_activation_fp8(x)
    halves, hs = torch.empty(3, 96, dtype=torch.float16), torch.empty(3)
    quantize_activation_fp8_halves(x, halves, hs)
    k = torch.arange(96)
    pos = ((k // 4) % 2) * 48 + (k // 8) * 4 + k % 4
    assert torch.equal(hs, scales)
    assert torch.equal(halves[:, pos].float(), codes.float())


# --- the inline PTX, emulated -------------------------------------------------------------------------------

def _prmt(a: int, b: int, c: int) -> int:
    data = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 15
        byte = (data >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _f16x2(a: int) -> np.ndarray:
    return np.array([a & 0xFFFF, a >> 16], dtype=np.uint16).view(np.float16)


def _pack_f16x2(lo, hi) -> int:
    d = np.array([lo, hi], dtype=np.float16).view(np.uint16)
    return int(d[0]) | (int(d[1]) << 16)


def _bf16x2(a: int) -> list[float]:
    return [float(np.array([(a & 0xFFFF) << 16], np.uint32).view(np.float32)[0]),
            float(np.array([(a >> 16) << 16], np.uint32).view(np.float32)[0])]


def _pack_bf16x2(lo: float, hi: float) -> int:
    def bits(v: float) -> int:  # float -> bf16 bits, round to nearest even
        f = int(np.array([v], np.float32).view(np.uint32)[0])
        return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16) & 0xFFFF
    return bits(lo) | (bits(hi) << 16)


def _f32(a: int) -> np.float32:
    return np.array([a], dtype=np.uint32).view(np.float32)[0]


def _run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX subset the decodes use (mov, xor, or, shr, prmt, lop3, sub.rn.f16x2, fma.rn.f16x2, fma.rn.bf16x2,
    the fp32 scaling: mov.b32 {l, h}, cvt.f32.f16, mul.rn.f32, cvt.rn.f16x2.f32, the GEMV's fma.rn.f32, the FP8
    weight values' cvt.rn.satfinite.e4m3x2.f16x2 and mov.b32 d, {lo, hi}, and common.round_e4m3_native's
    cvt.rn.satfinite.e4m3x2.f32 and cvt.rn.f16x2.e4m3x2); rounding to nearest even."""
    regs = dict(operands)

    def val(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0) & 0xFFFFFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.rstrip().endswith("}"):  # mov.b32 dst, {lo, hi}: pack two 16-bit registers
            dst, pair = args.split(",", 1)
            lo, hi = (val(t) for t in pair.strip("{} ").split(","))
            regs[dst.strip()] = (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)
            continue
        if op == "mov.b32" and args.startswith("{"):  # mov.b32 {l, h}, src
            pair, src = args.rsplit(",", 1)
            lo, hi = (t.strip() for t in pair.strip("{} ").split(","))
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *src = [t.strip() for t in args.split(",")]
        if op in ("mov.b32", "mov.f32"):
            regs[dst] = val(src[0])
        elif op == "xor.b32":
            regs[dst] = val(src[0]) ^ val(src[1])
        elif op == "or.b32":
            regs[dst] = val(src[0]) | val(src[1])
        elif op == "shr.u32":
            regs[dst] = val(src[0]) >> val(src[1])
        elif op == "prmt.b32":
            regs[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "lop3.b32":  # bit i of immLut is the result for a, b, c bits (i >> 2, (i >> 1) & 1, i & 1)
            a, b, c, lut = (val(t) for t in src)
            regs[dst] = 0
            for i in range(8):
                if lut >> i & 1:
                    pick = [x if (i >> shift) & 1 else ~x & 0xFFFFFFFF for x, shift in ((a, 2), (b, 1), (c, 0))]
                    regs[dst] |= pick[0] & pick[1] & pick[2]
        elif op == "fma.rn.f16x2":  # one rounding of the exact a * b + c per half
            a, b, c = (_f16x2(val(t)).astype(np.float64) for t in src)
            regs[dst] = _pack_f16x2(a[0] * b[0] + c[0], a[1] * b[1] + c[1])
        elif op == "sub.rn.f16x2":
            a, b = _f16x2(val(src[0])), _f16x2(val(src[1]))
            regs[dst] = _pack_f16x2(a[0] - b[0], a[1] - b[1])
        elif op == "fma.rn.bf16x2":
            a, b, c = (_bf16x2(val(t)) for t in src)
            regs[dst] = _pack_bf16x2(a[0] * b[0] + c[0], a[1] * b[1] + c[1])
        elif op == "cvt.f32.f16":
            regs[dst] = int(np.array([np.array([val(src[0])], np.uint16).view(np.float16)[0]], np.float32).view(np.uint32)[0])
        elif op == "fma.rn.f32":  # exact products here (E4M3 x short fp32 values): one rounding, as fma
            exact = float(_f32(val(src[0]))) * float(_f32(val(src[1]))) + float(_f32(val(src[2])))
            regs[dst] = int(np.array([exact], np.float32).view(np.uint32)[0])
        elif op == "mul.rn.f32":
            regs[dst] = int(np.array([_f32(val(src[0])) * _f32(val(src[1]))], np.float32).view(np.uint32)[0])
        elif op == "cvt.rn.satfinite.e4m3x2.f16x2":  # each fp16 half to E4M3 in the same half (lo -> low byte)
            halves = torch.from_numpy(_f16x2(val(src[0])).astype(np.float32))
            e4m3 = halves.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
            regs[dst] = e4m3[0] | (e4m3[1] << 8)
        elif op == "cvt.rn.satfinite.e4m3x2.f32":  # d = {a -> upper byte, b -> lower byte}
            pair = torch.tensor([_f32(val(src[1])), _f32(val(src[0]))], dtype=torch.float32)
            e4m3 = pair.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
            regs[dst] = e4m3[0] | (e4m3[1] << 8)
        elif op == "cvt.rn.f16x2.e4m3x2":  # each byte to fp16 in the same place (low byte -> low half)
            codes = torch.tensor([val(src[0]) & 0xFF, (val(src[0]) >> 8) & 0xFF], dtype=torch.uint8)
            halves = codes.view(torch.float8_e4m3fn).to(torch.float16).numpy()
            regs[dst] = _pack_f16x2(halves[0], halves[1])
        elif op == "cvt.rn.f16x2.f32":  # d = {a -> upper half, b -> lower half}
            regs[dst] = _pack_f16x2(np.float16(_f32(val(src[1]))), np.float16(_f32(val(src[0]))))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return regs


@triton.jit
def _tables_kernel(aux_ptr, out_ptr, IS_BITMOD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tp0, tp1, tn0, tn1 = decode_tables(tl.load(aux_ptr + offs), IS_BITMOD)
    tl.store(out_ptr + offs, tp0)
    tl.store(out_ptr + BLOCK + offs, tp1)
    tl.store(out_ptr + 2 * BLOCK + offs, tn0)
    tl.store(out_ptr + 3 * BLOCK + offs, tn1)


def _tables(aux: torch.Tensor, is_bitmod: bool) -> list[tuple[int, int, int, int]]:
    """decode_tables of each group parameter (run in the interpreter), as unsigned 32-bit values."""
    count = aux.numel()
    out = torch.empty(4 * count, dtype=torch.int32)
    _tables_kernel[(1,)](aux.to(torch.int32), out, IS_BITMOD=is_bitmod, BLOCK=count)
    return [tuple(int(out[i * count + g]) & 0xFFFFFFFF for i in range(4)) for g in range(count)]


CONSTANTS = {"m64": 0x64646464, "bias": 0x64106410}


def _mma_decode(word: int, tables, bf16: bool = False) -> list[float]:
    """w4_mma's PTX on one word: the fp16 (bf16) values of codes 0..7 (outputs $0..$7, 16-bit registers)."""
    if bf16:  # operands as _decode_group passes them
        ops = {"$8": word, "$13": 0x43434343, "$14": 0xC310C310, "$15": 0x3F803F80}
        asm = common._DECODE16_BF16.value
    else:
        ops = {"$8": word, "$13": CONSTANTS["m64"], "$14": CONSTANTS["bias"]}
        asm = common._DECODE16.value
    ops.update(zip(("$9", "$10", "$11", "$12"), tables))
    regs = _run_ptx(asm, ops)
    if bf16:
        return [_bf16x2(regs[f"${i}"])[0] for i in range(8)]
    return [float(np.array([regs[f"${i}"]], np.uint16).view(np.float16)[0]) for i in range(8)]


@triton.jit
def _decode_ref_kernel(codes_ptr, aux_ptr, out_ptr, IS_BITMOD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    aux = tl.load(aux_ptr + offs // 16)
    if IS_BITMOD:
        aux = bitmod_special2(aux)
    tl.store(out_ptr + offs, decode_w4(tl.load(codes_ptr + offs), aux, IS_BITMOD))


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
def test_inline_ptx_decode_is_exact_for_every_code_and_group_parameter(fmt):
    is_bitmod = fmt == "bitmod"
    aux = torch.arange(16, dtype=torch.int32) % (4 if is_bitmod else 16)  # selectors 0..3 / zero points 0..15
    tables = _tables(aux, is_bitmod)
    codes = torch.arange(16, dtype=torch.int32).repeat(16)  # every code under every group parameter
    expected = torch.empty(256, dtype=torch.int32)
    _decode_ref_kernel[(1,)](codes, aux, expected, IS_BITMOD=is_bitmod, BLOCK=256)
    for g in range(16):
        for start in (0, 8):  # two words: codes 0..7 and 8..15 in nibble order
            word = sum(c << (4 * i) for i, c in enumerate(range(start, start + 8)))
            want = [float(expected[16 * g + start + i]) for i in range(8)]
            assert _mma_decode(word, tables[g]) == want, (fmt, g, start)
            assert _mma_decode(word, tables[g], bf16=True) == want, (fmt, g, start, "bf16")


@triton.jit
def _int4_bias_kernel(zeros_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, int4_pair_bias(tl.load(zeros_ptr + offs)))


def test_int4_pair_decode_ptx_is_exact_for_every_code_and_zero_point():
    zeros = torch.arange(16, dtype=torch.uint8)
    biases = torch.empty(16, dtype=torch.int32)
    _int4_bias_kernel[(1,)](zeros, biases, BLOCK=16)
    operands = {"$10": 0x2C003C00, "$11": 0x00F0000F, "$12": 0x64006400}  # as decode_int4_word16 passes them
    for zp in range(16):
        for start in range(16):  # nibble i holds code (start + i) % 16: every code in every nibble
            codes = [(start + i) % 16 for i in range(8)]
            word = sum(c << (4 * i) for i, c in enumerate(codes))
            regs = _run_ptx(common._DECODE_INT4.value, dict(operands, **{"$8": word, "$9": int(biases[zp]) & 0xFFFFFFFF}))
            got = [float(np.array([regs[f"${i}"]], np.uint16).view(np.float16)[0]) for i in range(8)]
            assert got == [float(c - zp) for c in codes], (zp, start)


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
def test_inline_ptx_dequant_equals_dequantize_in_fp16(fmt):
    """dequant_w4's PTX (decode, fp32 scale, one fp16 rounding) on every word of a real quantized weight."""
    from p3quant.kernels.dequant_w4 import _ASM_DEQUANT

    group = 32
    weight = (BITMOD4 if fmt == "bitmod" else INT4).quantize(torch.randn(8, 64) * torch.logspace(-3, 2, 8)[:, None], group)
    aux = weight.selectors if fmt == "bitmod" else weight.zeros
    tables = _tables(aux.flatten(), fmt == "bitmod")
    words = weight.packed.contiguous().view(torch.int32)
    expected = weight.dequantize().to(torch.float16)
    for n in range(words.shape[0]):
        for w in range(words.shape[1]):
            g = 8 * w // group
            scale = np.float32(weight.scales[n, g].float()) * np.float32(0.5 if fmt == "bitmod" else 1.0)
            ops = {"$4": int(words[n, w]) & 0xFFFFFFFF, "$9": CONSTANTS["m64"],
                   "$10": CONSTANTS["bias"], "$11": int(np.array([scale], np.float32).view(np.uint32)[0])}
            ops.update(zip(("$5", "$6", "$7", "$8"), tables[n * aux.shape[1] + g]))
            regs = _run_ptx(_ASM_DEQUANT.value, ops)
            got = [float(v) for i in range(4) for v in _f16x2(regs[f"${i}"])]
            assert got == expected[n, 8 * w: 8 * w + 8].tolist(), (fmt, n, w)


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
def test_inline_ptx_fp8_values_equal_the_triton_ones(fmt):
    """dequant_w4's FP8-values PTX (decode, fp16 pairs to E4M3 pairs, two packed registers) on every word of a real
    quantized weight: the same 8 bytes, in code order, as weight_values_fp8's pure-Triton kernel."""
    from p3quant.kernels.dequant_w4 import _ASM_VALUES_FP8, weight_values_fp8

    group = 32
    weight = (BITMOD4 if fmt == "bitmod" else INT4).quantize(torch.randn(8, 64) * torch.logspace(-3, 2, 8)[:, None], group)
    aux = weight.selectors if fmt == "bitmod" else weight.zeros
    tables = _tables(aux.flatten(), fmt == "bitmod")
    words = weight.packed.contiguous().view(torch.int32)
    expected = weight_values_fp8(weight)[0].view(torch.uint8)
    for n in range(words.shape[0]):
        for w in range(words.shape[1]):
            ops = {"$2": int(words[n, w]) & 0xFFFFFFFF, "$7": CONSTANTS["m64"], "$8": CONSTANTS["bias"]}
            ops.update(zip(("$3", "$4", "$5", "$6"), tables[n * aux.shape[1] + 8 * w // group]))
            regs = _run_ptx(_ASM_VALUES_FP8.value, ops)
            got = [(regs[f"${r}"] >> (8 * i)) & 0xFF for r in (0, 1) for i in range(4)]
            assert got == expected[n, 8 * w: 8 * w + 8].tolist(), (fmt, n, w)


def _bits(x: float) -> int:
    return int(np.array([x], np.float32).view(np.uint32)[0])


@triton.jit
def _round_e4m3_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, round_e4m3(tl.load(x_ptr + offs), False))  # the arithmetic rounding


def test_native_e4m3_rounding_ptx_equals_the_arithmetic_rounding():
    """common.round_e4m3_native's PTX (fp32 pairs to E4M3 and back), emulated: each element of a pair comes back
    in its own place, rounded as the interpreter's arithmetic round_e4m3 rounds it (ties, saturation, signed zeros,
    values below E4M3's smallest subnormal and infinities included)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    grid = torch.tensor(sorted({v for v in values if v == v}))  # the E4M3 values, NaNs left out
    ties = (grid[:-1] + grid[1:]) / 2  # exact midpoints (E4M3 values have 4 significant bits)
    spread = torch.randn(1000) * torch.pow(2.0, torch.randint(-14, 12, (1000,)).float())
    x = torch.cat([ties, -ties, spread, torch.tensor([0.0, -0.0, 448.0, 464.0, 479.0, 1e30, -1e30, 2.0 ** -10,
                                                     float("inf"), float("-inf")])])
    x = torch.cat([x, x[:1]]) if x.numel() % 2 else x
    block = 1 << (x.numel() - 1).bit_length()
    padded = torch.zeros(block)
    padded[: x.numel()] = x
    want = torch.empty_like(padded)
    _round_e4m3_kernel[(1,)](padded, want, BLOCK=block)
    for i in range(0, x.numel(), 2):
        regs = _run_ptx(_E4M3_PAIR.value, {"$2": _bits(float(x[i])), "$3": _bits(float(x[i + 1]))})
        assert (regs["$0"], regs["$1"]) == (_bits(float(want[i])), _bits(float(want[i + 1]))), (x[i], x[i + 1])


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
def test_gemv_inline_ptx_dot_of_every_code_and_group_parameter(fmt):
    """gemm_w4's M = 1 GEMV PTX (_ASM_BIASED_DOT: $0 = $15 + sum_i f_i * a_i over the codes of the word in $1, with
    $2..$5 the doubled decode tables, $6 = 0x42000000, a_i in $7..$14): every code under every selector / zero
    point decodes to exactly f = 40 + v / 2 (v: decode_w4's integer weight), and the FMAs run in code order."""
    is_bitmod = fmt == "bitmod"
    aux = torch.arange(16, dtype=torch.int32) % (4 if is_bitmod else 16)
    tables = _tables(aux, is_bitmod)
    codes = torch.arange(16, dtype=torch.int32).repeat(16)
    expected = torch.empty(256, dtype=torch.int32)
    _decode_ref_kernel[(1,)](codes, aux, expected, IS_BITMOD=is_bitmod, BLOCK=256)
    # E4M3 values spanning 2**10 (as an outlier channel beside small ones): the biased sum stays exact up to ~2**10
    acts = [448.0, -0.5, 3.25, -96.0, 1.0, 12.0, -1.75, 208.0]
    for g in range(16):
        for start in (0, 8):
            word = sum(c << (4 * i) for i, c in enumerate(range(start, start + 8)))
            ops = {"$1": word, "$6": 0x42000000, "$15": _bits(-40.0 * sum(acts))}
            ops.update(zip(("$2", "$3", "$4", "$5"), (2 * t for t in tables[g])))
            ops.update({f"${7 + i}": _bits(a) for i, a in enumerate(acts)})
            regs = _run_ptx(gemm_w4._ASM_BIASED_DOT.value, ops)
            want = np.float32(-40.0 * sum(acts))
            for i in range(8):
                f = np.float32(40 + float(expected[16 * g + start + i]) / 2)
                want = np.float32(float(f) * acts[i] + float(want))
            assert regs["$0"] == _bits(float(want)), (fmt, g, start)
            # sum(f a) - 40 sum(a) = sum(v a) / 2: the bias cancels exactly here
            v = [float(expected[16 * g + start + i]) for i in range(8)]
            assert float(want) == sum(vi * a for vi, a in zip(v, acts)) / 2


def _spy_quantizers(monkeypatch):
    from p3quant.kernels import act_quant

    calls = []
    spied = {}
    for layout, (fn, *rest) in act_quant._QUANTIZERS.items():
        def spy(*args, fn=fn, layout=layout):
            calls.append(layout)
            return fn(*args)
        spied[layout] = (spy, *rest)
    monkeypatch.setattr(act_quant, "_QUANTIZERS", spied)
    monkeypatch.setattr(act_quant, "_last", None)
    return calls


@pytest.mark.parametrize("m", [1, 4])
def test_projections_of_one_input_quantize_it_once(monkeypatch, m):
    """q/k/v-style calls on the same tensor reuse its FP8 codes; an in-place write, another tensor or a CUDA-graph
    capture starting in between quantize again; the outputs equal those of independent calls."""
    from p3quant.kernels import act_quant

    calls = _spy_quantizers(monkeypatch)
    weights = [BITMOD4.quantize(torch.randn(n, 128), 64) for n in (48, 16, 16)]
    x = torch.randn(m, 128).to(torch.bfloat16)
    shared = [gemm_w4.w4_matmul(x, w) for w in weights]
    assert len(calls) == 1
    independent = [gemm_w4.w4_matmul(x.clone(), w) for w in weights]
    assert len(calls) == 4 and all(torch.equal(a, b) for a, b in zip(shared, independent))
    x.mul_(2)  # in place: the version counter moves, the codes must be recomputed
    doubled = gemm_w4.w4_matmul(x, weights[0])
    assert len(calls) == 5 and torch.equal(doubled, gemm_w4.w4_matmul(x.clone(), weights[0]))
    monkeypatch.setattr(act_quant, "_capturing", lambda device: True)  # as if a CUDA graph capture began
    gemm_w4.w4_matmul(x, weights[1])
    assert len(calls) == 7
    monkeypatch.setattr(act_quant, "ACTIVATION_REUSE", False)
    gemm_w4.w4_matmul(x, weights[1])
    assert len(calls) == 8
    with torch.inference_mode():  # no version counter: never reused
        y = torch.randn(m, 128).to(torch.bfloat16)
        gemm_w4.w4_matmul(y, weights[0])
        gemm_w4.w4_matmul(y, weights[1])
    assert len(calls) == 10
