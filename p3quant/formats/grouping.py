"""Reshape helpers for per-group quantization along the last dimension, and scale storage."""

from __future__ import annotations

import torch

from .validation import require_group_size


def to_groups(x: torch.Tensor, group_size: int, what: str, even: bool = True) -> torch.Tensor:
    """View [..., K] as [..., K // group_size, group_size] (float32)."""
    if x.dim() == 0:
        raise ValueError(f"{what}: cannot group a 0-d tensor")
    require_group_size(x.shape[-1], group_size, what, even)
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def scale_from(numerator: torch.Tensor, levels: float, dtype: torch.dtype) -> torch.Tensor:
    """store_scale(numerator / levels), with an IEEE division on every device.

    torch on CUDA divides by a Python scalar as a multiplication by its reciprocal, which can differ from the
    CPU's correctly rounded quotient by one ulp; dividing by a same-device tensor keeps scales (and therefore
    codes) identical on CPU and GPU.
    """
    return store_scale(numerator.float() / torch.full_like(numerator, levels, dtype=torch.float32), dtype)


def store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a positive float32 scale to its storage dtype, clamped to the dtype's normal range.

    Clamping keeps an all-zero or denormal-tiny group from getting a zero (division by zero) or
    infinite scale; such a group then quantizes to zeros, never to NaN.
    """
    info = torch.finfo(dtype)
    return scale.clamp(min=info.tiny, max=info.max).to(dtype)
