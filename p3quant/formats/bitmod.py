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

from .grouping import scale_from, to_groups
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
    """Rounding of one scale family (SV +-5 or +-8); the special value's side is chosen later."""

    scale: torch.Tensor
    base_codes: torch.Tensor
    base_err: torch.Tensor
    take_sv: torch.Tensor
    sv_err: torch.Tensor


def _fit_family(
    mag: torch.Tensor, negative: torch.Tensor, amax: torch.Tensor, sv_mag: float, grid_max: float, scale_dtype: torch.dtype
) -> _FamilyFit:
    scale = scale_from(amax, grid_max, scale_dtype)
    s = scale.float().unsqueeze(-1)
    idx = torch.bucketize(mag / s, _MAG_MIDPOINTS.to(mag.device), right=False)  # ties -> smaller magnitude
    base = _MAG.to(mag.device)[idx]
    # Squared errors in the weight domain: an element that rounds to the same value under two variants (e.g. to
    # 0) costs exactly the same in both, so exact MSE ties stay ties and go to the lower selector.
    base_err = (mag - base * s) ** 2
    sv_err = (mag - sv_mag * s) ** 2
    take_sv = (sv_err < base_err) | ((sv_err == base_err) & (base > sv_mag))
    base_codes = (idx | ((negative & (idx > 0)).to(idx.dtype) << 3)).to(torch.uint8)
    return _FamilyFit(scale, base_codes, base_err, take_sv, sv_err)


_CHUNK_ELEMENTS = 1 << 18


def _quantize_groups(g: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and selectors of groups g [N, group_size] (lowest MSE; ties to the lower selector)."""
    mag = g.abs()
    amax = mag.amax(-1)
    negative, positive = g < 0, g > 0
    fits = [_fit_family(mag, negative, amax, sv, top, scale_dtype) for sv, top in ((5.0, 6.0), (8.0, 8.0))]
    # Selector 2 * family + side (side 0: SV negative, 1: positive); argmin keeps the first of equal MSEs. The sums
    # run in float64, where they are (all but always) exact: mirrored groups whose two variants make the same
    # errors at different positions then tie exactly, whatever the summation order of the device.
    err = torch.stack(
        [
            torch.where(f.take_sv & on_side, f.sv_err, f.base_err).sum(-1, dtype=torch.float64)
            for f in fits
            for on_side in (negative, positive)
        ],
        dim=-1,
    )
    sel = err.argmin(-1)
    wide = (sel >= 2).unsqueeze(-1)
    on_side = torch.where((sel % 2 == 1).unsqueeze(-1), positive, negative)
    take_sv = torch.where(wide, fits[1].take_sv, fits[0].take_sv) & on_side
    codes = torch.where(take_sv, SPECIAL_CODE, torch.where(wide, fits[1].base_codes, fits[0].base_codes))
    scale = torch.where(wide.squeeze(-1), fits[1].scale, fits[0].scale)
    return codes, scale, sel.to(torch.uint8)


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
        flat = g.reshape(-1, group_size)
        codes = torch.empty(flat.shape, dtype=torch.uint8, device=w.device)
        scales = torch.empty(flat.shape[0], dtype=scale_dtype, device=w.device)
        selectors = torch.empty(flat.shape[0], dtype=torch.uint8, device=w.device)
        # Groups are independent: chunking keeps the temporaries cache-sized (several times faster on CPU).
        step = max(1, _CHUNK_ELEMENTS // group_size)
        for start in range(0, flat.shape[0], step):
            part = slice(start, start + step)
            codes[part], scales[part], selectors[part] = _quantize_groups(flat[part], scale_dtype)
        return BitMoDTensor(
            pack_int4(codes.reshape(w.shape)), scales.reshape(g.shape[:-1]), selectors.reshape(g.shape[:-1]),
            tuple(w.shape), group_size,
        )

    def decode(self, codes: torch.Tensor, selectors: torch.Tensor) -> torch.Tensor:
        """Grid value (scale units) of uint8 `codes` under broadcastable uint8 `selectors`."""
        return _TABLE.to(codes.device)[selectors.long(), codes.long()]


BITMOD4 = _BitMoDFormat()
