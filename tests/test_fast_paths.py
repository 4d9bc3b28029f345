"""Runtime fast paths equal the arithmetic reference formats bit for bit."""

import torch

from p3quant.formats import FP8_E4M3, quantize_scaled_fp8
from p3quant.formats.scaled import fake_quantize_scaled_fp8, fp8_e4m3_codes


def test_native_fp8_cast_equals_reference_encoder_on_every_fp16_value() -> None:
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16)
    x = x[torch.isfinite(x)]
    assert torch.equal(fp8_e4m3_codes(x), FP8_E4M3.encode(x))


def test_fake_quantized_activation_equals_code_path() -> None:
    x = torch.randn(7, 300) * torch.logspace(-3, 3, 300)
    assert torch.equal(fake_quantize_scaled_fp8(x), quantize_scaled_fp8(x).dequantize())
