"""Independent golden model of the P3 PE for tests: plain numpy, written from the spec, not from arith_p3.

It shares no code with the emulator: operands are decoded from the raw bit fields into exact float64
values (every FP8/E4M3 or UE4M4 value times an integer in [-16, 16] times 2^frac_bits is a dyadic
number with at most 11 significant bits, so float64 holds it exactly), each product is truncated
with np.floor / np.trunc, and the accumulator is stepped 4 products at a time with an explicit
range check after every step.
"""

from __future__ import annotations

import numpy as np

_BITMOD_X2 = (0, 1, 2, 3, 4, 6, 8, 12)  # BitMoD E2M1 magnitudes x 2
_BITMOD_SV_X2 = (-10, 10, -16, 16)  # special value x 2 for selectors 0..3
_FORMATS = {"fp8_e4m3": (True, 3, 7), "ue4m4": (False, 4, 15)}  # signed, mantissa bits, bias


def decode(codes: np.ndarray, fmt: str) -> np.ndarray:
    """8-bit codes to exact float64 values (raises on the FP8 NaN code)."""
    signed, man_bits, bias = _FORMATS[fmt]
    c = codes.astype(np.int64)
    e = (c >> man_bits) & 15
    m = c & ((1 << man_bits) - 1)
    if signed and np.any((e == 15) & (m == (1 << man_bits) - 1)):
        raise ValueError("NaN code")
    normal = (1.0 + m / 2.0**man_bits) * np.exp2(e - bias)
    sub = m / 2.0**man_bits * 2.0 ** (1 - bias)
    value = np.where(e > 0, normal, sub)
    return np.where((c >> 7) & 1 == 1, -value, value) if signed else value


def nibbles(packed: np.ndarray) -> np.ndarray:
    """Packed bytes [..., K/2] to codes [..., K], even element in the low nibble."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int64)
    out[..., 0::2] = packed & 15
    out[..., 1::2] = packed >> 4
    return out


def bitmod_integers(packed: np.ndarray, selectors: np.ndarray, group: int) -> np.ndarray:
    """BitMoD grid x 2 integers [..., K] from packed codes and per-group selectors."""
    codes = nibbles(packed)
    sel = np.repeat(selectors.astype(np.int64), group, axis=-1)
    mag = np.array(_BITMOD_X2)[codes & 7]
    val = np.where(codes & 8, -mag, mag)
    return np.where(codes == 8, np.array(_BITMOD_SV_X2)[sel], val)


def int4_integers(packed: np.ndarray, zeros: np.ndarray, group: int) -> np.ndarray:
    """INT4 code - zero point [..., K]."""
    return nibbles(packed) - np.repeat(zeros.astype(np.int64), group, axis=-1)


def dot(codes: np.ndarray, ints: np.ndarray, fmt: str, *, acc_bits: int = 32, frac_bits: int | None = None,
        truncation: str = "floor", on_overflow: str = "raise") -> tuple[np.ndarray, int]:
    """PE accumulators over the last axis (a multiple of 4) of codes x ints (broadcast).

    Returns (int64 accumulators, number of accumulators that saturated).
    """
    _, man_bits, bias = _FORMATS[fmt]
    k = (bias - 1 + man_bits) if frac_bits is None else frac_bits
    exact = decode(codes, fmt) * ints * 2.0**k
    aligned = (np.floor(exact) if truncation == "floor" else np.trunc(exact)).astype(np.int64)
    steps = aligned.reshape(aligned.shape[:-1] + (-1, 4)).sum(-1)
    lo, hi = -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1
    acc = np.zeros(steps.shape[:-1], dtype=np.int64)
    hit = np.zeros(steps.shape[:-1], dtype=bool)
    for j in range(steps.shape[-1]):
        acc = acc + steps[..., j]
        out = (acc < lo) | (acc > hi)
        if out.any() and on_overflow == "raise":
            raise OverflowError(f"{int(out.sum())} accumulators overflowed")
        hit |= out
        acc = np.clip(acc, lo, hi)
    return acc, int(hit.sum())
