"""Bit-accurate HBM-PIM FP16 MAC lanes (Samsung Aquabolt-XL style), vectorized in torch.

Each lane computes acc <- acc + a * b on IEEE binary16 operands, round-to-nearest-even, subnormals
kept, overflow to +-inf, NaN/inf propagated as IEEE does. Two rounding behaviours:

- "fused": one rounding per MAC, the exact a * b + acc rounded once to FP16 (an FMA);
- "separate": the product rounded to FP16, then the sum rounded to FP16 (two roundings).

Why float64 is exact here: an FP16 significand has 11 bits, so a * b has at most 22 significant bits
and lies in [2^-48, 2^32]: float64 (53 bits, exponent down to 2^-1022) holds it exactly. The sum of
two FP16 values is a multiple of 2^-24 below 2^17 (41 bits): exact too. The fused sum a * b + acc
may need up to 80 bits, so it is formed as s = fl64(p + acc) plus its exact error e (Knuth's
TwoSum, exact in binary floating point), then rounded to odd (if e != 0 and s is even, s moves one
float64 ulp towards e). Rounding to odd in a precision of at least p + 2 bits followed by rounding to
nearest in p bits equals a single correct rounding (Boldo & Melquiond, IEEE TC 2008); 53 >= 11 + 2.
The final float64 -> FP16 rounding is done here arithmetically (scale by a power of two, which is
exact, then round half to even), not by a dtype cast, whose path through float32 would round twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_ROUNDINGS = ("fused", "separate")
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL_EXP = -14
_FP16_MAN_BITS = 10


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest FP16 value (ties to even, overflow to inf), as float64."""
    if x.dtype != torch.float64:
        raise TypeError(f"round_to_fp16 expects float64, got {x.dtype}")
    mag = x.abs()
    _, exponent = torch.frexp(mag)
    binade = torch.clamp(exponent.to(torch.int64) - 1, min=_FP16_MIN_NORMAL_EXP)
    quantum = torch.ldexp(torch.ones_like(mag), binade - _FP16_MAN_BITS)
    rounded = torch.round(mag / quantum) * quantum  # both scalings by powers of two are exact
    rounded = torch.where(rounded > _FP16_MAX, torch.full_like(rounded, float("inf")), rounded)
    return torch.where(torch.isfinite(x), torch.copysign(rounded, x), x)


def _as_fp64(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float16:
        raise TypeError(f"{what} must be torch.float16, got {t.dtype}")
    return t.double()


def _round_sum_to_odd(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fl64(p + c) rounded to odd instead of to nearest (finite inputs), via TwoSum."""
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))
    even = (s.view(torch.int64) & 1) == 0
    towards = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    fix = (err != 0) & even & torch.isfinite(s)
    return torch.where(fix, torch.nextafter(s, towards), s)


def fp16_mac(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rounding: str = "fused") -> torch.Tensor:
    """acc + a * b elementwise on float16 tensors (broadcasting), with `rounding` in FP16_ROUNDINGS."""
    acc64, a64, b64 = _as_fp64(acc, "acc"), _as_fp64(a, "a"), _as_fp64(b, "b")
    product = a64 * b64  # exact (22 significant bits)
    if rounding == "fused":
        exact_sum = _round_sum_to_odd(product, acc64)
        plain = product + acc64  # IEEE inf/NaN semantics where the TwoSum does not apply
        total = torch.where(torch.isfinite(product) & torch.isfinite(acc64), exact_sum, plain)
    elif rounding == "separate":
        total = round_to_fp16(product) + acc64  # exact: both are FP16 values
    else:
        raise ValueError(f"unknown FP16 MAC rounding {rounding!r}; use one of {FP16_ROUNDINGS}")
    return round_to_fp16(total).to(torch.float16)  # exact cast: the value is an FP16 value


@dataclass(frozen=True)
class Fp16MacUnit:
    """One HBM-PIM PCU: `lanes` FP16 MAC lanes fed by one 256-bit column access per step."""

    lanes: int = 16
    rounding: str = "fused"

    def __post_init__(self) -> None:
        if self.rounding not in FP16_ROUNDINGS:
            raise ValueError(f"unknown FP16 MAC rounding {self.rounding!r}; use one of {FP16_ROUNDINGS}")

    def step(self, acc: torch.Tensor, weights: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """One MAC command: acc[..., lanes] += weights[..., lanes] * inputs (broadcast per lane)."""
        if acc.shape[-1] != self.lanes or weights.shape[-1] != self.lanes:
            raise ValueError(f"a step works on {self.lanes} lanes; got acc {tuple(acc.shape)}, weights {tuple(weights.shape)}")
        return fp16_mac(acc, weights, inputs, self.rounding)

    def gemv(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y = W @ x in FP16 the way HBM-PIM runs a GEMV: output rows on lanes, K walked in order.

        weight: float16 [N, K] (N a multiple of `lanes`); x: float16 [K]. Each output accumulates
        from 0 through K MAC commands in index order, one FP16 rounding behaviour per MAC.
        """
        if weight.dim() != 2 or x.dim() != 1 or weight.shape[1] != x.shape[0]:
            raise ValueError(f"gemv expects weight [N, K] and x [K], got {tuple(weight.shape)} and {tuple(x.shape)}")
        if weight.shape[0] % self.lanes:
            raise ValueError(f"N = {weight.shape[0]} must be a multiple of the {self.lanes} lanes")
        acc = torch.zeros(weight.shape[0] // self.lanes, self.lanes, dtype=torch.float16)
        tiles = weight.reshape(-1, self.lanes, weight.shape[1])
        for k in range(weight.shape[1]):
            acc = self.step(acc, tiles[..., k], x[k])
        return acc.reshape(-1)
