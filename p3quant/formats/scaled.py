"""FP8-E4M3 tensors with a dynamic per-group scale (activations per token, queries per head)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .grouping import scale_from, to_groups
from .minifloat import FP8_E4M3
from .qtensor import QuantizedTensor
from .validation import require_finite


@dataclass
class ScaledFp8Tensor(QuantizedTensor):
    """codes: uint8 FP8-E4M3 [..., K]; scales: [..., K // group_size] = amax / 448: x ~ decode(code) * scale."""

    kind: ClassVar[str] = "fp8_e4m3"
    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    group_size: int

    def values(self) -> torch.Tensor:
        """Decoded FP8 values before scaling (float32)."""
        return FP8_E4M3.decode(self.codes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v = self.values().view(*self.shape[:-1], -1, self.group_size)
        return (v * self.scales.float().unsqueeze(-1)).reshape(self.shape).to(dtype)


def fp8_e4m3_codes(y: torch.Tensor) -> torch.Tensor:
    """FP8-E4M3 codes of finite `y` via torch's native cast after saturation: the fast runtime path.

    Bit-identical to FP8_E4M3.encode (round to nearest even, saturating), which the test suite checks
    over every FP16 value; FP8_E4M3.encode stays the arithmetic reference.
    """
    return y.float().clamp(-FP8_E4M3.max_value, FP8_E4M3.max_value).to(torch.float8_e4m3fn).view(torch.uint8)


def fake_quantize_scaled_fp8(x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Quantize-dequantize per token (scale amax/448 stored in FP16) as float32, without building codes."""
    if check:
        require_finite(x, "FP8-E4M3 quantization")
    x = x.float()
    scale = scale_from(x.abs().amax(-1, keepdim=True), FP8_E4M3.max_value, torch.float16).float()
    y = (x / scale).clamp(-FP8_E4M3.max_value, FP8_E4M3.max_value)
    return y.to(torch.float8_e4m3fn).float() * scale


def quantize_scaled_fp8(
    x: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype = torch.float16, check: bool = True
) -> ScaledFp8Tensor:
    """FP8-E4M3 with scale = amax / 448 per group along the last dim (None: the whole last dim)."""
    if check:
        require_finite(x, "FP8-E4M3 quantization")
    group_size = group_size or x.shape[-1]
    g = to_groups(x, group_size, "FP8-E4M3 quantization", even=False)
    scale = scale_from(g.abs().amax(-1), FP8_E4M3.max_value, scale_dtype)
    codes = fp8_e4m3_codes(g / scale.float().unsqueeze(-1))
    return ScaledFp8Tensor(codes.reshape(x.shape), scale, tuple(x.shape), group_size)
