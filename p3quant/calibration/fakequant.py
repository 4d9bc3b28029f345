"""Fast quantize-dequantize of weights for calibration searches (no packing), matching p3quant.quantizers.

AWQ evaluates hundreds of candidate weights per layer; packing each into codes and unpacking it again would
dominate the search. These functions return the dequantized weight directly. BitMoD follows
p3quant.formats.bitmod exactly except on exact rounding ties (measure zero for real weights); INT4 uses the
library quantizer, which is already cheap.
"""

from __future__ import annotations

import torch

from ..formats.bitmod import MAGNITUDES
from ..formats.grouping import scale_from
from ..quantizers import quantize_weight

_MAG = torch.tensor(MAGNITUDES)
_MIDPOINTS = (_MAG[1:] + _MAG[:-1]) / 2
_FAMILIES = ((5.0, 6.0), (8.0, 8.0))  # (special-value magnitude, grid max): scale = amax / grid max


def fake_bitmod(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """BitMoD 4-bit quantize-dequantize of w [out, in] in groups along in (lowest-MSE variant per group)."""
    g = w.float().reshape(-1, group_size)
    mag, positive = g.abs(), g > 0
    amax = mag.amax(-1, keepdim=True)
    fits, errors = [], []
    for sv, grid_max in _FAMILIES:
        s = scale_from(amax, grid_max, torch.float16).float()
        y = mag / s
        base = _MAG.to(g.device)[torch.bucketize(y, _MIDPOINTS.to(g.device))]
        base_err = (y - base) ** 2
        gain = ((y - sv) ** 2 - base_err).clamp(max=0)  # < 0 where the special value is closer
        total = base_err.sum(-1, keepdim=True)
        pos_gain = (gain * positive).sum(-1, keepdim=True)
        fits.append((s, base, gain))
        s2 = s * s
        errors += [(total + gain.sum(-1, keepdim=True) - pos_gain) * s2, (total + pos_gain) * s2]  # SV -, SV +
    choice = torch.stack(errors).argmin(0)  # [groups, 1]: 2 * family + side, ties to the lower selector
    out = torch.empty_like(g)
    for family, (sv, _) in enumerate(_FAMILIES):
        s, base, gain = fits[family]
        for side in (0, 1):
            rows = (choice == 2 * family + side).squeeze(-1)
            if not rows.any():
                continue
            on_side = positive[rows] if side else ~positive[rows] & (g[rows] != 0)
            use_sv = (gain[rows] < 0) & on_side
            q_mag = torch.where(use_sv, torch.full_like(base[rows], sv), base[rows])
            out[rows] = torch.copysign(q_mag, g[rows]) * s[rows]
    return out.reshape(w.shape)


def fake_quantize_weight(w: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """Quantize-dequantize w [out, in] with the weight format `fmt` (float32 result)."""
    if fmt == "bitmod":
        return fake_bitmod(w, group_size)
    return quantize_weight(w.float(), fmt, group_size, check=False).dequantize()
