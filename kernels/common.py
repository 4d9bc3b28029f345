"""Shared Triton helpers: exact minifloat rounding in fp32, BitMoD/INT4 decode, device checks.

Rounding is done arithmetically (exponent bits + magic-number round-to-nearest-even) instead of
`.to(tl.float8e4nv)`, because it must equal p3quant.formats.MiniFloat.round_to_grid bit for bit on
every backend, including the Triton CPU interpreter (whose fp32->fp8 cast mis-rounds carries).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch
import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be tl.constexpr.
FP16_TINY = tl.constexpr(float(torch.finfo(torch.float16).tiny))
FP16_MAX = tl.constexpr(float(torch.finfo(torch.float16).max))
FP8_MAX = tl.constexpr(448.0)
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds |x| < 2**22 to the nearest integer, ties to even


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (tests), where CPU tensors are allowed."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_F = TypeVar("_F", bound=Callable)


def on_input_device(fn: _F) -> _F:
    """Run a kernel wrapper with its first tensor argument's GPU as the current device.

    Triton launches on the current CUDA device, so a tensor on cuda:1 (a model split by accelerate's
    device_map) would otherwise be read by a kernel running on cuda:0.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_device(what: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless every given tensor is on CUDA (or on the CPU under the interpreter), all on one device."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{what}: tensors on different devices {sorted(map(str, devices))}")
    if not interpreting() and any(not t.is_cuda for t in present):
        raise ValueError(f"{what}: the Triton kernel needs CUDA tensors (got {present[0].device}); use backend='torch' on CPU")


def require_dtype(what: str, name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{what}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")


def fp8_dot_supported(device: torch.device) -> bool:
    """FP8 x FP8 tensor-core dots need compute capability >= 8.9 (Ada, Hopper); the interpreter emulates them."""
    if interpreting() or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def rne(x):
    """Round fp32 |x| < 2**22 to the nearest integer, ties to even (torch.round)."""
    return (x + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def round_minifloat(x, MAN_BITS: tl.constexpr, MIN_EXP: tl.constexpr, MAX_VALUE: tl.constexpr, HALF_UP: tl.constexpr):
    """Value of fp32 `x` rounded to a minifloat grid (MiniFloat.round_to_grid), saturating at +-MAX_VALUE.

    The quantum of x's binade is 2**(max(floor(log2|x|), MIN_EXP) - MAN_BITS); scaling by it is exact.
    """
    mag = tl.abs(x)
    exp = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, MIN_EXP)
    quantum = ((exp - MAN_BITS + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - exp + MAN_BITS) << 23).to(tl.float32, bitcast=True)
    steps = mag * inv_quantum
    if HALF_UP:
        steps = (steps + 0.5).to(tl.int32).to(tl.float32)
    else:
        steps = rne(steps)
    rounded = tl.minimum(steps * quantum, MAX_VALUE)
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def fp16_scale(x):
    """fp32 scale -> the float16 value formats.grouping.store_scale stores (clamp, then round to nearest even),
    as fp32. Rounded arithmetically: the compiled fp32->fp16 cast was seen to break ties differently on an H200."""
    x = tl.minimum(tl.maximum(x, FP16_TINY), FP16_MAX)
    return round_minifloat(x, 10, -14, FP16_MAX, False)


@triton.jit
def bitmod_special2(selectors):
    """Special value x2 of each group from its selector (0:-5, 1:+5, 2:-8, 3:+8), as int32."""
    sel = selectors.to(tl.int32)
    return (10 + 6 * (sel >> 1)) * ((sel & 1) * 2 - 1)


@triton.jit
def decode_w4(codes, aux, IS_BITMOD: tl.constexpr):
    """Integer weights of 4-bit codes (int32 in [0, 15]).

    BitMoD: grid x 2 in [-16, 16] (aux = the group's special value x2, see bitmod_special2); the caller
    multiplies by scale / 2. INT4 asymmetric: code - zero point (aux = zp), times scale.
    """
    if IS_BITMOD:
        # nibble i of 0xC8643210 (as int32) = E2M1 magnitude x2 of magnitude index i
        mag = (-932957680 >> ((codes & 7) * 4)) & 15
        val = tl.where(codes >= 8, -mag, mag)
        return tl.where(codes == 8, aux, val)
    else:
        return codes - aux


@triton.jit
def dot16(a, b, NATIVE_BF16: tl.constexpr):
    """tl.dot with fp32 accumulation; NATIVE_BF16=False (interpreter) runs bf16 operands as exact fp32,
    since the CPU interpreter mis-evaluates bf16 dots."""
    if NATIVE_BF16:
        return tl.dot(a, b)
    else:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            return tl.dot(a, b)
