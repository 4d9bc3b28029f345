"""Bit-exact small floating-point formats (FP8-E4M3, unsigned E4M4) as torch code <-> value maps.

Encoding is done arithmetically on float32 (exact for every FP16/BF16/FP32 input inside the format's
range), decoding by a 256-entry lookup table, so both run vectorized on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .validation import require_finite

ROUNDING_MODES = ("nearest_even", "half_up")


@dataclass(frozen=True)
class MiniFloat:
    """A float format of at most 8 bits: optional sign, `exp_bits` exponent bits, `man_bits` mantissa bits.

    `nan_code_is_all_ones` reserves the all-ones magnitude code for NaN (OCP E4M3FN); no infinities.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    signed: bool
    nan_code_is_all_ones: bool = False

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def max_magnitude_code(self) -> int:
        top = (1 << (self.exp_bits + self.man_bits)) - 1
        return top - 1 if self.nan_code_is_all_ones else top

    @property
    def max_value(self) -> float:
        return self._magnitude_of(self.max_magnitude_code)

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def smallest_step(self) -> float:
        """Spacing of the subnormals (the smallest positive value)."""
        return 2.0 ** (self.min_normal_exponent - self.man_bits)

    def _magnitude_of(self, code: int) -> float:
        exp_field = code >> self.man_bits
        man_field = code & ((1 << self.man_bits) - 1)
        if exp_field == 0:
            return man_field * self.smallest_step
        return (1.0 + man_field / (1 << self.man_bits)) * 2.0 ** (exp_field - self.bias)

    def decode_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 value of every code (NaN for the reserved code)."""
        return _decode_table(self, str(device))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) to float32 values."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"{self.name}.decode expects torch.uint8 codes, got {codes.dtype}")
        return self.decode_table(codes.device)[codes.long()]

    def round_to_grid(self, x: torch.Tensor, rounding: str = "nearest_even") -> torch.Tensor:
        """Value of `x` after rounding to this format (saturating), as float32; no validation."""
        x = x.float()
        mag = x.abs()
        # Quantum of each element's binade, floored at the subnormal step.
        _, exponent = torch.frexp(mag)
        binade = torch.clamp(exponent - 1, min=self.min_normal_exponent)
        quantum = torch.ldexp(torch.ones_like(mag), binade - self.man_bits)
        steps = mag / quantum
        if rounding == "nearest_even":
            steps = torch.round(steps)
        elif rounding == "half_up":
            steps = torch.floor(steps + 0.5)
        else:
            raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDING_MODES}")
        rounded = torch.clamp(steps * quantum, max=self.max_value)
        return torch.copysign(rounded, x) if self.signed else rounded

    def encode(self, x: torch.Tensor, rounding: str = "nearest_even") -> torch.Tensor:
        """Float tensor to uint8 codes, rounding per `rounding` and saturating at +-max_value."""
        require_finite(x, self.name)
        if not self.signed and bool((x < 0).any()):
            raise ValueError(f"{self.name} is unsigned: got negative input (min {x.min().item():.4g})")
        value = self.round_to_grid(x, rounding)
        mag = value.abs()
        _, exponent = torch.frexp(mag)
        is_normal = mag >= 2.0**self.min_normal_exponent
        exp_field = torch.where(is_normal, exponent - 1 + self.bias, torch.zeros_like(exponent))
        significand = torch.where(
            is_normal, torch.ldexp(mag, self.man_bits - (exponent - 1)) - (1 << self.man_bits), mag / self.smallest_step
        )
        code = (exp_field << self.man_bits) | significand.to(torch.int32)
        if self.signed:
            code = code | (torch.signbit(value).to(torch.int32) << (self.exp_bits + self.man_bits))
        return code.to(torch.uint8)


@lru_cache(maxsize=None)
def _decode_table(fmt: MiniFloat, device: str) -> torch.Tensor:
    magnitude_codes = 1 << (fmt.exp_bits + fmt.man_bits)
    values = [fmt._magnitude_of(c) for c in range(magnitude_codes)]
    if fmt.nan_code_is_all_ones:
        values[-1] = float("nan")
    if fmt.signed:
        values = values + [-v for v in values]
    return torch.tensor(values, dtype=torch.float32, device=device)


FP8_E4M3 = MiniFloat("FP8_E4M3", exp_bits=4, man_bits=3, bias=7, signed=True, nan_code_is_all_ones=True)
"""OCP FP8 E4M3FN: max +-448, all-ones magnitude is NaN (never produced for finite input)."""

UE4M4 = MiniFloat("UE4M4", exp_bits=4, man_bits=4, bias=15, signed=False)
"""Unsigned E4M4 for attention probabilities: 1.0 = 0xF0, max 0xFF = 1.9375, step 2**-18."""


_UE4M4_MIN_NORMAL = 2.0**-14
_UE4M4_SUBNORMAL_STEPS = 2.0**18
_FP32_TO_UE4M4_SHIFT = 23 - UE4M4.man_bits
_FP32_TO_UE4M4_REBIAS = (127 - UE4M4.bias) << UE4M4.man_bits


def ue4m4_codes(p: torch.Tensor, rounding: str = "nearest_even") -> torch.Tensor:
    """UE4M4 codes of finite p >= 0 by float32 bit arithmetic: the fast path for attention probabilities.

    Normals round the fp32 mantissa's 19 dropped bits (to nearest even, or half up) and re-bias the exponent;
    subnormals (p < 2**-14) are round(p * 2**18); a carry into the next binade is the next code, and values
    above 1.9375 saturate. No input checks: callers pass softmax outputs. Bit-identical to UE4M4.encode
    (checked over every FP16 value in [0, 2) and random FP32 values in the tests).
    """
    p = p.float()
    bits = p.view(torch.int32)
    if rounding == "nearest_even":
        carry = ((bits >> _FP32_TO_UE4M4_SHIFT) & 1) + ((1 << (_FP32_TO_UE4M4_SHIFT - 1)) - 1)
        subnormal = torch.round(p * _UE4M4_SUBNORMAL_STEPS)
    elif rounding == "half_up":
        carry = torch.full_like(bits, 1 << (_FP32_TO_UE4M4_SHIFT - 1))
        subnormal = torch.floor(p * _UE4M4_SUBNORMAL_STEPS + 0.5)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDING_MODES}")
    normal = ((bits + carry) >> _FP32_TO_UE4M4_SHIFT) - _FP32_TO_UE4M4_REBIAS
    codes = torch.where(p < _UE4M4_MIN_NORMAL, subnormal.to(torch.int32), normal)
    return codes.clamp(0, UE4M4.max_magnitude_code).to(torch.uint8)
