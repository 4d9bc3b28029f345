"""Integer formats: INT4 asymmetric/symmetric per group (KV cache, baseline weights) and INT8 symmetric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .grouping import scale_from, to_groups
from .packing import pack_int4, unpack_int4
from .qtensor import QuantizedTensor
from .validation import require_finite

INT4_MAX_CODE = 15
SYMMETRIC_INT4_ZERO = 8


@dataclass
class Int4Tensor(QuantizedTensor):
    """4-bit codes q in [0, 15] with an integer zero point zp in [0, 15] per group: x ~ (q - zp) * scale.

    packed: uint8 [..., K // 2] (see packing.py for nibble order); scales: [..., K // group_size];
    zeros: uint8 [..., K // group_size] (8 for every group of a symmetric tensor).
    """

    kind: ClassVar[str] = "int4"
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, ...]
    group_size: int

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed)

    def centered_codes(self) -> torch.Tensor:
        """q - zp as int16 in [-15, 15]: what the PIM multiplies."""
        q = self.codes().view(*self.shape[:-1], -1, self.group_size).to(torch.int16)
        return (q - self.zeros.to(torch.int16).unsqueeze(-1)).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.centered_codes().view(*self.shape[:-1], -1, self.group_size).float()
        return (q * self.scales.float().unsqueeze(-1)).reshape(self.shape).to(dtype)


@dataclass
class Int8Tensor(QuantizedTensor):
    """Symmetric INT8 values in [-127, 127] with one scale per group: x ~ q * scale."""

    kind: ClassVar[str] = "int8"
    values: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.values.view(*self.shape[:-1], -1, self.group_size).float()
        return (q * self.scales.float().unsqueeze(-1)).reshape(self.shape).to(dtype)


class _Int4Format:
    """INT4 per group along the last dim. Asymmetric: the range always includes 0, so zp is exact."""

    name = "INT4"

    def quantize(
        self, x: torch.Tensor, group_size: int, symmetric: bool = False, scale_dtype: torch.dtype = torch.float16,
        check: bool = True,
    ) -> Int4Tensor:
        if check:
            require_finite(x, "INT4.quantize")
        g = to_groups(x, group_size, "INT4.quantize")
        if symmetric:
            scale = scale_from(g.abs().amax(-1), 7, scale_dtype)
            zero = torch.full_like(scale, SYMMETRIC_INT4_ZERO, dtype=torch.uint8)
        else:
            lo = g.amin(-1).clamp(max=0)
            hi = g.amax(-1).clamp(min=0)
            scale = scale_from(hi - lo, INT4_MAX_CODE, scale_dtype)
            zero = torch.round(-lo / scale.float()).clamp(0, INT4_MAX_CODE).to(torch.uint8)
        q = torch.round(g / scale.float().unsqueeze(-1)) + zero.float().unsqueeze(-1)
        codes = q.clamp(0, INT4_MAX_CODE).to(torch.uint8).reshape(x.shape)
        return Int4Tensor(pack_int4(codes), scale, zero, tuple(x.shape), group_size)


class _Int8Format:
    """Symmetric INT8 per group along the last dim (group_size None: the whole last dim, i.e. per token)."""

    name = "INT8"

    def quantize(
        self, x: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype = torch.float16, check: bool = True
    ) -> Int8Tensor:
        if check:
            require_finite(x, "INT8.quantize")
        group_size = group_size or x.shape[-1]
        g = to_groups(x, group_size, "INT8.quantize", even=False)
        scale = scale_from(g.abs().amax(-1), 127, scale_dtype)
        q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return Int8Tensor(q.reshape(x.shape), scale, tuple(x.shape), group_size)


INT4 = _Int4Format()
INT8 = _Int8Format()
