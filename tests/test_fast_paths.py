"""Runtime fast paths equal the arithmetic reference formats bit for bit."""

import pytest
import torch

from p3quant.formats import FP8_E4M3, UE4M4, quantize_scaled_fp8
from p3quant.formats.minifloat import ue4m4_codes
from p3quant.formats.scaled import fake_quantize_scaled_fp8, fp8_e4m3_codes


def test_native_fp8_cast_equals_reference_encoder_on_every_fp16_value() -> None:
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16)
    x = x[torch.isfinite(x)]
    assert torch.equal(fp8_e4m3_codes(x), FP8_E4M3.encode(x))


def test_fake_quantized_activation_equals_code_path() -> None:
    x = torch.randn(7, 300) * torch.logspace(-3, 3, 300)
    assert torch.equal(fake_quantize_scaled_fp8(x), quantize_scaled_fp8(x).dequantize())


def test_chunked_reference_attention_equals_one_shot(monkeypatch) -> None:
    from p3quant import attention_math as am
    from p3quant.quantizers import key_smoothing_factor, quantize_keys, quantize_values

    b, h, hk, t, d = 2, 4, 2, 90, 16
    k, v, q = torch.randn(b, hk, t, d), torch.randn(b, hk, t, d), torch.randn(b, h, t, d)
    s = key_smoothing_factor(k)
    kv = am.QuantizedKV(quantize_keys(k[:, :, :-1], s), quantize_values(v[:, :, :-1]), s, k[:, :, -1:], v[:, :, -1:])
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    whole = am.p3_attention_reference(q, kv, mask, d**-0.5, am.AttentionFormats())
    monkeypatch.setattr(am, "MAX_SCORES_PER_CHUNK", b * h * t * 7)
    assert torch.equal(am.p3_attention_reference(q, kv, mask, d**-0.5, am.AttentionFormats()), whole)


@pytest.mark.parametrize("rounding", ["nearest_even", "half_up"])
def test_ue4m4_bit_arithmetic_equals_reference_encoder(rounding: str) -> None:
    bits = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = bits[torch.isfinite(bits)].float()
    x = x[x < 2]  # every FP16 value in [0, 2)
    assert torch.equal(ue4m4_codes(x, rounding), UE4M4.encode(x, rounding))
    y = torch.rand(200_000) ** 8 * 2.2  # fp32 values down to the subnormals and past the saturation point
    assert torch.equal(ue4m4_codes(y, rounding), UE4M4.encode(y, rounding))


def test_host_launch_helpers_equal_triton_on_every_size_up_to_2_pow_16() -> None:
    import triton

    from p3quant.kernels.common import cdiv, next_power_of_2

    for n in range(0, 2**16 + 2):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in list(range(0, 300)) + [2**31 - 1, 2**40 + 7]:
        for b in (1, 2, 3, 7, 16, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
