"""BitMoD FP4 weights: an E2M1 grid whose redundant -0 code becomes a per-group special value.

Code layout (4 bits, sign-magnitude): bit 3 = sign, bits 0-2 index MAGNITUDES. Code 0b1000 (-0) is the
group's special value SV, picked by a 2-bit selector: 0 -> -5, 1 -> +5, 2 -> -8, 3 -> +8.
Scale per group = max|w| / 6 for the +-5 variants and max|w| / 8 for the +-8 variants (as the reference
does, even when the group's max lies on the side SV does not cover: that element clips, and the MSE
selection rejects the variant). Elements round to the nearest grid value; ties go to the value of smaller
magnitude. The variant with the lowest group MSE wins (ties: the lower selector).
Integer view (grid x 2): magnitudes {0,1,2,3,4,6,8,12}, SV +-10 / +-16, a 6-bit signed PIM operand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .grouping import store_scale, to_groups
from .packing import pack_int4, unpack_int4
from .qtensor import QuantizedTensor
from .validation import require_finite

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SPECIAL_VALUES = (-5.0, 5.0, -8.0, 8.0)
GRID_MAX = (6.0, 6.0, 8.0, 8.0)
SPECIAL_CODE = 0b1000
NUM_VARIANTS = 4


def code_values() -> torch.Tensor:
    """[4, 16] float32 table: value of each code under each selector (in units of the group scale)."""
    table = torch.empty(NUM_VARIANTS, 16)
    for sel, sv in enumerate(SPECIAL_VALUES):
        for code in range(16):
            mag = MAGNITUDES[code & 7]
            table[sel, code] = sv if code == SPECIAL_CODE else (-mag if code & 8 else mag)
    return table


def code_integers() -> torch.Tensor:
    """[4, 16] int8 table: the integer view (value x 2) the PIM's 6-bit multipliers consume."""
    return (code_values() * 2).to(torch.int8)


_TABLE = code_values()
_MAG = torch.tensor(MAGNITUDES)
_MAG_MIDPOINTS = (_MAG[1:] + _MAG[:-1]) / 2


@dataclass
class _FamilyFit:
    """Rounding of one scale family (SV +-5 or +-8) with the special value on either side."""

    scale: torch.Tensor
    base_codes: torch.Tensor
    base_err: torch.Tensor
    take_sv: torch.Tensor
    sv_err: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


def _fit_family(g: torch.Tensor, amax: torch.Tensor, sv_mag: float, grid_max: float, scale_dtype: torch.dtype) -> _FamilyFit:
    scale = store_scale(amax / grid_max, scale_dtype)
    y = g / scale.float().unsqueeze(-1)
    a = y.abs()
    idx = torch.bucketize(a, _MAG_MIDPOINTS.to(g.device), right=False)  # ties -> smaller magnitude
    base = _MAG.to(g.device)[idx]
    base_err = (a - base) ** 2
    sv_err = (a - sv_mag) ** 2
    take_sv = (sv_err < base_err) | ((sv_err == base_err) & (base > sv_mag))
    negative = y < 0
    base_codes = (idx | ((negative & (idx > 0)).to(idx.dtype) << 3)).to(torch.uint8)
    return _FamilyFit(scale, base_codes, base_err, take_sv, sv_err, y > 0, negative)


@dataclass
class BitMoDTensor(QuantizedTensor):
    """packed: uint8 [..., K // 2]; scales: [..., K // group_size]; selectors: uint8 [..., K // group_size]."""

    kind: ClassVar[str] = "bitmod4"
    packed: torch.Tensor
    scales: torch.Tensor
    selectors: torch.Tensor
    shape: tuple[int, ...]
    group_size: int

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed)

    def integer_values(self) -> torch.Tensor:
        """Integer view of every element (grid x 2) as int8 in [-16, 16]."""
        table = code_integers().to(self.packed.device)
        codes = self.codes().view(*self.shape[:-1], -1, self.group_size).long()
        sel = self.selectors.long().unsqueeze(-1).expand_as(codes)
        return table[sel, codes].reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        grid = self.integer_values().view(*self.shape[:-1], -1, self.group_size).float() * 0.5
        return (grid * self.scales.float().unsqueeze(-1)).reshape(self.shape).to(dtype)


class _BitMoDFormat:
    name = "BITMOD4"

    def quantize(
        self, w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16, check: bool = True
    ) -> BitMoDTensor:
        """Quantize along the last dim in groups, choosing each group's special value by lowest MSE."""
        if check:
            require_finite(w, "BITMOD4.quantize")
        g = to_groups(w, group_size, "BITMOD4.quantize")
        amax = g.abs().amax(-1)
        best_err = best_codes = best_scale = best_sel = None
        for family, (sv_mag, grid_max) in enumerate(((5.0, 6.0), (8.0, 8.0))):
            fit = _fit_family(g, amax, sv_mag, grid_max, scale_dtype)
            weight = fit.scale.float() ** 2
            for side, on_side in enumerate((fit.negative, fit.positive)):
                sel = 2 * family + side
                use_sv = fit.take_sv & on_side
                err = torch.where(use_sv, fit.sv_err, fit.base_err).sum(-1) * weight
                codes = torch.where(use_sv, torch.full_like(fit.base_codes, SPECIAL_CODE), fit.base_codes)
                if best_err is None:
                    best_err, best_codes, best_scale = err, codes, fit.scale
                    best_sel = torch.zeros_like(amax, dtype=torch.uint8)
                    continue
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
                best_scale = torch.where(better, fit.scale, best_scale)
                best_sel = torch.where(better, torch.full_like(best_sel, sel), best_sel)
        return BitMoDTensor(pack_int4(best_codes.reshape(w.shape)), best_scale, best_sel, tuple(w.shape), group_size)

    def decode(self, codes: torch.Tensor, selectors: torch.Tensor) -> torch.Tensor:
        """Grid value (scale units) of uint8 `codes` under broadcastable uint8 `selectors`."""
        return _TABLE.to(codes.device)[selectors.long(), codes.long()]


BITMOD4 = _BitMoDFormat()
