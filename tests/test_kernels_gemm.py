"""Fused W4 dequant-GEMM and FP8 activation quantization vs the torch reference, in the Triton interpreter."""

import warnings

import pytest
import torch

from p3quant.formats import BITMOD4, INT4, quantize_scaled_fp8
from p3quant.kernels.act_quant import quantize_activation_fp8
from p3quant.kernels import gemm_w4
from p3quant.kernels.dequant_w4 import dequantize_w4, weight_values_fp8
from p3quant.kernels.gemm_w4 import w4_matmul
from p3quant.nn.backends import TorchBackend, get_backend

# bf16 outputs: the kernel's cast and the reference's each round once (2**-9 relative; the interpreter's
# fp32->bf16 cast truncates: 2**-8), and the reference also rounds FP8 activations to bf16 (2**-9).
BF16_TOL = 2.0**-7
FP32_TOL = 1e-5  # fp32 accumulation over K <= 2048 against float64 of the same quantized operands
# W4A8 at M >= DEQUANT_MIN_M on the CPU multiplies an fp16 copy of the weight: one rounding per weight (<= 2**-11
# relative); the block-scaled FP8 path (Hopper) is checked below with a stand-in for torch's scaled_mm
DEQUANT_TOL = 2.0**-10
# W4A16 at M >= DEQUANT_MIN_M multiplies a copy of the weight in the activations' bf16: one rounding per weight
# (2**-9 relative; the interpreter's cast truncates, 2**-8, all toward zero)
DEQUANT_16BIT_TOL = 2.0**-7


def _weight(fmt, n, k, group, gen):
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    return BITMOD4.quantize(w, group) if fmt == "bitmod" else INT4.quantize(w, group)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [  # M, N, K, group, weight format, activation format
    (1, 40, 256, 64, "bitmod", "fp8_e4m3"),
    (1, 33, 160, 32, "int4", "none"),
    (1, 21, 384, 128, "bitmod", "none"),
    (1, 19, 96, 32, "int4", "fp8_e4m3"),
    (1, 10, 2048, 128, "bitmod", "fp8_e4m3"),  # K a multiple of the GEMV's 1024-wide step: unmasked loads, prefetch
    (1, 9, 1024, 64, "int4", "fp8_e4m3"),
    (3, 33, 96, 32, "bitmod", "none"),
    (6, 24, 256, 64, "int4", "none"),
    (5, 40, 384, 128, "int4", "fp8_e4m3"),
    (16, 17, 128, 64, "bitmod", "fp8_e4m3"),
    (37, 24, 128, 128, "bitmod", "fp8_e4m3"),
    (100, 17, 256, 64, "bitmod", "fp8_e4m3"),  # 64 < M <= MMA_MAX_M: the small-M kernel's 128-row tile
    (90, 21, 128, 128, "int4", "none"),
    (130, 19, 64, 32, "int4", "none"),  # W4A16 at M >= DEQUANT_MIN_M: dequantize once to bf16 + matmul
    (130, 19, 64, 32, "bitmod", "fp8_e4m3"),  # M >= DEQUANT_MIN_M (lowered to 128 here): dequantize once + matmul
    (200, 40, 384, 128, "int4", "fp8_e4m3"),
]


# W4A8 at 1 < M < DEQUANT_MIN_M again through the tiled FP8 kernel (the small-M tensor-core kernel takes them by
# default), and at 1 < M <= 64 with groups of 64 / 128 through the small-M kernel's other operand variants
ROUTES = ([(*case, "default") for case in CASES] + [(*case, "tiled") for case in CASES if 1 < case[0] < 128 and case[5] == "fp8_e4m3"]
          + [(*case, f"mma_{variant}") for case in CASES if 1 < case[0] <= 64 and case[3] >= 64
             for variant in gemm_w4.MMA_VARIANTS if variant != gemm_w4.MMA_VARIANT])


@pytest.mark.parametrize("m,n,k,group,wfmt,afmt,route", ROUTES)
def test_w4_matmul_matches_exact_quantized_product(monkeypatch, m, n, k, group, wfmt, afmt, route):
    monkeypatch.setattr(gemm_w4, "DEQUANT_MIN_M", 128)  # reach the prefill path with interpreter-sized M
    if route == "tiled":
        monkeypatch.setattr(gemm_w4, "MMA_MAX_M", 0)
    if route.startswith("mma_"):
        monkeypatch.setattr(gemm_w4, "MMA_VARIANT", route[4:])
        want = {"halves": "halves", "quarters": "quarters", "fp8": "halves_fp8"}[route[4:]] if afmt == "fp8_e4m3" else (
            "quarters_bf16" if route == "mma_quarters" else "halves_bf16")
        assert gemm_w4.mma_layout(afmt, torch.bfloat16, group, torch.device("cpu")) == want
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16) * 3
    weight = _weight(wfmt, n, k, group, gen)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.float32)
    y = w4_matmul(x, weight, bias, afmt, out_dtype=torch.float32, out=out)
    xq = quantize_scaled_fp8(x).dequantize().double() if afmt == "fp8_e4m3" else x.double()
    exact = xq @ weight.dequantize().double().t() + bias.double()
    assert torch.isfinite(y).all()
    prefill = m >= gemm_w4.DEQUANT_MIN_M
    assert _rel(y, exact) < (FP32_TOL if not prefill else DEQUANT_TOL if afmt == "fp8_e4m3" else DEQUANT_16BIT_TOL)
    y16 = w4_matmul(x, weight, bias, afmt)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert _rel(y16, TorchBackend().linear(x, weight, bias, afmt)) < BF16_TOL


def test_split_16bit_layout_holds_the_values_and_word_sums():
    """W4A16's GEMV input: the 16-bit values unchanged (fp32), de-interleaved by k % 8, then each word's sum."""
    from p3quant.kernels.act_quant import split_16bit

    m, k = 3, 8200  # over one 4096-wide step, K % 4096 != 0
    x = (torch.randn(m, k) * torch.rand(m, 1) * 10).to(torch.float16)
    out = torch.full((m, k + k // 8), float("nan"))
    split_16bit(x, out, torch.empty(m))
    words = x.float().view(m, k // 8, 8)
    assert torch.equal(out[:, :k], words.transpose(1, 2).reshape(m, k))
    # fp32 sums of 8 terms: within 7 roundings (2**-24 each) of their magnitudes' sum, whatever the order
    err = (out[:, k:].double() - words.double().sum(-1)).abs()
    assert (err <= 7 * 2.0**-24 * words.double().abs().sum(-1)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_w4a16_gemv_input_dtypes(dtype):
    """W4A16 at M = 1 through the split-layout GEMV: fp16 activations as they are, fp32 ones rounded to bf16 first
    (w4_matmul's W4A16 rule), against float64 of the same operands; q/k/v-style siblings in one launch equal
    separate calls bit for bit."""
    gen = torch.Generator().manual_seed(77)
    x = (torch.randn(1, 256, generator=gen) * 3).to(dtype)
    weights = [_weight(fmt, n, 256, 64, gen) for fmt, n in (("bitmod", 40), ("bitmod", 24), ("bitmod", 8))]
    xr = (x.to(torch.bfloat16) if dtype == torch.float32 else x).double()
    y = w4_matmul(x, weights[0], None, "none")
    assert y.dtype == dtype and _rel(y, xr @ weights[0].dequantize().double().t()) < (
        FP32_TOL if dtype == torch.float32 else 2.0**-10)
    shared = gemm_w4.w4_matmul_shared_input(x, weights, activation_format="none")
    assert all(torch.equal(a, w4_matmul(x.clone(), w, None, "none")) for a, w in zip(shared, weights))


def test_w4a8_without_fp8_support_uses_fp16_codes_and_clear_errors(monkeypatch):
    """On GPUs without FP8-E4M3 (compute capability < 8.9, where Triton has no E4M3 type) the tiled W4A8 kernel
    takes the activation codes in fp16 (exact), and the FP8-typed helpers say what to use instead."""
    from p3quant.kernels import act_quant, dequant_w4

    for module in (gemm_w4, act_quant, dequant_w4):
        monkeypatch.setattr(module, "fp8_dot_supported", lambda device: False)
    monkeypatch.setattr(gemm_w4, "MMA_MAX_M", 0)  # M = 37 through the tiled kernel
    code_dtypes = []
    quantize = gemm_w4.quantize_activation_fp8
    monkeypatch.setattr(gemm_w4, "quantize_activation_fp8",
                        lambda x, dtype=torch.float8_e4m3fn, **kw: code_dtypes.append(dtype) or quantize(x, dtype, **kw))
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(37, 128, generator=gen).to(torch.bfloat16) * 3
    weight = _weight("bitmod", 24, 128, 128, gen)
    y = w4_matmul(x, weight, None, "fp8_e4m3", out_dtype=torch.float32)
    exact = quantize_scaled_fp8(x).dequantize().double() @ weight.dequantize().double().t()
    assert _rel(y, exact) < FP32_TOL and code_dtypes == [torch.float16]  # the interpreter would take FP8 codes too
    with pytest.raises(TypeError, match="dtype=torch.float16"):
        act_quant.quantize_activation_fp8(x)
    assert act_quant.quantize_activation_fp8(x, torch.float16)[0].dtype == torch.float16
    with pytest.raises(RuntimeError, match="compute capability 8.9"):
        dequant_w4.weight_values_fp8(weight)


@pytest.mark.parametrize("wfmt", ["bitmod", "int4"])
@pytest.mark.parametrize("n,k,group", [(37, 256, 128), (5, 96, 32), (16, 1408, 64)])
def test_dequantize_w4_is_bit_exact(wfmt, n, k, group):
    weight = _weight(wfmt, n, k, group, torch.Generator().manual_seed(n * k + group))
    for dtype in (torch.float16, torch.float32):
        assert torch.equal(dequantize_w4(weight, dtype), weight.dequantize().to(dtype))
    # bf16: rounded to nearest even on the GPU (benchmarks/gpu_check.py); the interpreter's cast truncates
    exact = weight.dequantize()
    truncated = (exact.view(torch.int32) & -65536).view(torch.float32)
    got = dequantize_w4(weight, torch.bfloat16).float()
    assert torch.equal(got, exact.to(torch.bfloat16).float()) or torch.equal(got, truncated)


@pytest.mark.parametrize("wfmt", ["bitmod", "int4"])
@pytest.mark.parametrize("n,k,group", [(37, 256, 128), (16, 1408, 64), (5, 96, 32)])
def test_weight_values_fp8_times_scales_is_the_dequantized_weight(wfmt, n, k, group):
    weight = _weight(wfmt, n, k, group, torch.Generator().manual_seed(n + k + group))
    values, scales = weight_values_fp8(weight)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (n, k)
    assert values.float().abs().max() <= 16 and torch.equal(values.float(), values.float().round())
    assert scales.shape == (n, k // group) and scales.stride() == (1, n) and scales.dtype == torch.float32
    assert torch.equal(values.float() * scales.repeat_interleave(group, dim=1), weight.dequantize().float())


def _scaled_mm_1x128(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16, **_):
    """torch's block-scaled FP8 GEMM as cuBLAS runs it (1x128 blocks on both operands), in float64, with the
    operand layouts cuBLAS requires checked: the CPU build has no kernel for it."""
    block = torch.nn.functional.ScalingType.BlockWise1x128
    m, k = a.shape
    n = b.shape[1]
    assert recipe_a == recipe_b == block and a.dtype == b.dtype == torch.float8_e4m3fn
    assert a.stride(1) == 1 and b.stride(0) == 1  # row-major A, column-major B
    assert scale_a.shape == (m, k // 128) and scale_a.stride() == (1, m) and scale_a.dtype == torch.float32
    assert scale_b.shape == (n, k // 128) and scale_b.stride() == (1, n) and scale_b.dtype == torch.float32
    sa = scale_a.double().repeat_interleave(128, dim=1)
    sb = scale_b.double().repeat_interleave(128, dim=1)
    return ((a.double() * sa) @ (b.double() * sb.t())).to(output_dtype)


@pytest.mark.parametrize("wfmt,m", [("bitmod", 40), ("int4", 42)])  # 42: rows padded to a multiple of 4
@pytest.mark.parametrize("with_bias", [False, True])
def test_blockwise_fp8_prefill_operands(monkeypatch, wfmt, m, with_bias):
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", _scaled_mm_1x128)
    gen = torch.Generator().manual_seed(11)
    n, k = 48, 256
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16) * 3
    weight = _weight(wfmt, n, k, 128, gen)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    y = gemm_w4._blockwise_fp8_matmul(x, weight, bias, torch.bfloat16, out)
    assert y is out and torch.isfinite(y).all()
    exact = quantize_scaled_fp8(x).dequantize().double() @ weight.dequantize().double().t()
    if with_bias:
        exact = exact + bias.double()
    assert _rel(y, exact) < BF16_TOL


def _route_blockwise_on_cpu(monkeypatch, scaled_mm):
    """w4_matmul's prefill as on a Hopper GPU: the block-scaled path's gate without its device conditions, and a
    stand-in for torch's CUDA-only scaled_mm."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_mm", counted)
    monkeypatch.setattr(gemm_w4, "_blockwise_unsupported", {})
    monkeypatch.setattr(gemm_w4, "_blockwise_fp8_ok", lambda x, prep, out_dtype: (
        prep.group == 128 and out_dtype in (torch.float16, torch.bfloat16) and 0 not in gemm_w4._blockwise_unsupported))
    monkeypatch.setattr(gemm_w4, "DEQUANT_MIN_M", 128)
    return calls


def test_w4_matmul_routes_prefill_through_blockwise_fp8(monkeypatch):
    calls = _route_blockwise_on_cpu(monkeypatch, _scaled_mm_1x128)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 65, 256, generator=gen).to(torch.bfloat16)  # M = 130 rows: padded to 132
    weight = _weight("bitmod", 32, 256, 128, gen)
    bias = torch.randn(32, generator=gen).to(torch.bfloat16)
    out = torch.full((130, 32), float("nan"), dtype=torch.bfloat16)
    y = w4_matmul(x, weight, bias, "fp8_e4m3", out=out)
    assert calls == [132] and y.shape == (2, 65, 32) and y.data_ptr() == out.data_ptr()
    exact = quantize_scaled_fp8(x.reshape(130, 256)).dequantize().double() @ weight.dequantize().double().t()
    assert _rel(out, exact + bias.double()) < BF16_TOL


def test_blockwise_fp8_refusal_falls_back_once(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("block scaling needs cuBLAS >= 12.9")

    calls = _route_blockwise_on_cpu(monkeypatch, refuse)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(130, 256, generator=gen).to(torch.bfloat16)
    weight = _weight("int4", 16, 256, 128, gen)
    exact = quantize_scaled_fp8(x).dequantize().double() @ weight.dequantize().double().t()
    for attempt in range(2):
        out = torch.full((130, 16), float("nan"), dtype=torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w4_matmul(x, weight, None, "fp8_e4m3", out=out)
        refusals = [w for w in caught if "falls back to an fp16 copy" in str(w.message)]
        assert len(refusals) == (1 if attempt == 0 else 0) and len(calls) == 1  # asked once, then not again
        assert _rel(out, exact) < BF16_TOL  # the dequant path filled `out`
    assert gemm_w4._blockwise_unsupported == {0: "block scaling needs cuBLAS >= 12.9"}


def test_activation_quant_pads_rows_with_zeros():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(14)) + 1
    codes, scales = quantize_activation_fp8(x)
    padded, padded_scales = quantize_activation_fp8(x, rows=8)
    assert padded.shape == (8, 256) and padded_scales.shape == (8,)
    assert torch.equal(padded[:5].float(), codes.float()) and torch.equal(padded_scales[:5], scales)
    assert not padded[5:].float().any() and not padded_scales[5:].any()
    with pytest.raises(ValueError, match="fewer"):
        quantize_activation_fp8(x, rows=4)
    with pytest.raises(ValueError, match="scale_blocks"):
        quantize_activation_fp8(x, scale_blocks=0)


@pytest.mark.parametrize("k", [256, 16384 + 256])  # one pass over each row, and two (rows wider than ONE_PASS_MAX_K)
def test_activation_quant_kernel_writes_padding_and_scale_copies_itself(k):
    """Into NaN-filled buffers: the kernel writes the padding rows' codes and scales (zeros) and exactly
    `scale_copies` copies of every scale (3 of a 4-row buffer: the last row stays untouched)."""
    from p3quant.kernels import act_quant

    x = torch.randn(5, k, generator=torch.Generator().manual_seed(16)) * 3
    codes, scales = quantize_activation_fp8(x, torch.float32)
    padded_codes = torch.full((8, k), float("nan"))
    copies = torch.full((4, 8), float("nan"))
    act_quant._quantize_into(x, padded_codes, copies, act_quant._PLAIN, rows=8, scale_copies=3)
    assert torch.equal(padded_codes[:5], codes) and torch.equal(padded_codes[5:], torch.zeros(3, k))
    assert torch.equal(copies[:3, :5], scales.expand(3, 5)) and torch.equal(copies[:3, 5:], torch.zeros(3, 3))
    assert copies[3].isnan().all()


@pytest.mark.parametrize("k", [256, 16384 + 256])  # one pass over each row, and two (rows wider than ONE_PASS_MAX_K)
def test_activation_quant_writes_block_scales_column_major(k):
    """scale_blocks = K / 128: the token scales repeated per K-block, [rows, K / 128] column-major (cuBLAS's
    block-scale layout), padded rows zero, codes as without."""
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(15)) * 3
    codes, scales = quantize_activation_fp8(x)
    blocked_codes, blocks = quantize_activation_fp8(x, rows=8, scale_blocks=k // 128)
    assert blocks.shape == (8, k // 128) and blocks.stride() == (1, 8)
    assert torch.equal(blocked_codes[:5].float(), codes.float()) and not blocked_codes[5:].float().any()
    assert torch.equal(blocks[:5], scales[:, None].expand(5, k // 128)) and not blocks[5:].any()


def test_dequantize_w4_rejects_bad_input():
    weight = _weight("int4", 4, 64, 32, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="dtype"):
        dequantize_w4(weight, torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="BitMoDTensor or Int4Tensor"):
        dequantize_w4(torch.zeros(4, 64))


def test_backend_linear_3d_fp16_and_int8_fallback():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 128, generator=gen).to(torch.float16)
    weight = _weight("bitmod", 24, 128, 64, gen)
    triton_backend, ref = get_backend("triton"), TorchBackend()
    for afmt in ("fp8_e4m3", "none", "int8"):
        y = triton_backend.linear(x, weight, None, afmt)
        assert y.shape == (2, 3, 24) and y.dtype == torch.float16
        assert _rel(y, ref.linear(x, weight, None, afmt)) < 2.0**-9  # fp16 outputs: one rounding each side


@pytest.mark.parametrize("one_pass_max_k", [16384, 64])  # the row read once in registers / twice in chunks
def test_activation_quant_is_bit_exact(monkeypatch, one_pass_max_k):
    from p3quant.kernels import act_quant

    monkeypatch.setattr(act_quant, "ONE_PASS_MAX_K", one_pass_max_k)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 300, generator=gen) * torch.logspace(-6, 3, 300)  # spans FP8 subnormals to saturation
    x = x.to(torch.bfloat16)
    codes, scales = quantize_activation_fp8(x)
    ref = quantize_scaled_fp8(x)
    assert torch.equal(scales, ref.scales.float().squeeze(-1))
    assert torch.equal(codes.float() * scales[:, None], ref.dequantize())


def test_split_activation_quant_matches():
    from p3quant.kernels.act_quant import quantize_activation_fp8_split

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 96, generator=gen) * torch.logspace(-6, 3, 96)).to(torch.bfloat16)
    codes, scales = quantize_activation_fp8(x)
    a, s = torch.full((2, 96 + 12), float("nan")), torch.empty(2)
    quantize_activation_fp8_split(x, a, s)
    assert torch.equal(s, scales)
    assert torch.equal(a[:, :96].view(2, 8, 12).transpose(1, 2).reshape(2, 96), codes.float())
    assert torch.equal(a[:, 96:], codes.float().view(2, 12, 8).sum(-1))  # the words' sums, exact


def test_bad_inputs_are_rejected(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weight = _weight("bitmod", 8, 512, 256, gen)
    with pytest.raises(ValueError, match="group size 256"):
        w4_matmul(torch.randn(1, 512), weight)
    weight = _weight("int4", 8, 128, 64, gen)
    with pytest.raises(ValueError, match="features"):
        w4_matmul(torch.randn(1, 96), weight)
    with pytest.raises(ValueError, match="activation_format"):
        w4_matmul(torch.randn(1, 128), weight, activation_format="int8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        w4_matmul(torch.randn(1, 128), weight)


@pytest.mark.parametrize("wfmt,ns,group,with_bias", [("bitmod", (40, 9, 23), 64, True), ("int4", (16, 33), 32, False),
                                                     ("bitmod", (8, 8, 8), 128, False)])
def test_shared_input_gemv_equals_separate_calls(monkeypatch, wfmt, ns, group, with_bias):
    """q/k/v-style weights in one GEMV launch: bit-equal to one w4_matmul per weight, each output its own tensor."""
    launches = []
    monkeypatch.setattr(gemm_w4, "_gemv", lambda *a, _f=gemm_w4._gemv: launches.append(len(a[2])) or _f(*a))
    k = 256
    weights = [_weight(wfmt, n, k, group, None) for n in ns]
    biases = [torch.randn(n).to(torch.bfloat16) if with_bias else None for n in ns]
    x = torch.randn(1, 1, k).to(torch.bfloat16) * 3
    fused = gemm_w4.w4_matmul_shared_input(x, weights, biases)
    assert launches == [len(ns)]
    separate = [w4_matmul(x, w, b) for w, b in zip(weights, biases)]
    for got, want in zip(fused, separate):
        assert got.shape == want.shape == (1, 1, want.shape[-1]) and got.is_contiguous()
        assert torch.equal(got, want)


def test_shared_input_falls_back_where_one_launch_does_not_apply(monkeypatch):
    launches = []
    monkeypatch.setattr(gemm_w4, "_gemv", lambda *a, _f=gemm_w4._gemv: launches.append(len(a[2])) or _f(*a))
    k = 128
    a, b = _weight("bitmod", 12, k, 64, None), _weight("bitmod", 7, k, 32, None)  # different groups
    x = torch.randn(1, k).to(torch.bfloat16)
    outs = gemm_w4.w4_matmul_shared_input(x, [a, b], [torch.randn(12), None])
    assert launches == [1, 1]  # one launch per weight
    assert torch.equal(outs[1], w4_matmul(x, b))
    x3 = torch.randn(3, k).to(torch.bfloat16)  # M > 1: the small-M kernel, once per weight
    assert all(torch.equal(o, w4_matmul(x3, w)) for o, w in zip(gemm_w4.w4_matmul_shared_input(x3, [a, a]), [a, a]))
    with pytest.raises(ValueError, match="2 weights but 1 biases"):
        gemm_w4.w4_matmul_shared_input(x, [a, b], [None])
    with pytest.raises(ValueError, match="features"):
        gemm_w4.w4_matmul_shared_input(torch.randn(1, 96), [a, b])
