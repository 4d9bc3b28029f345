"""Input checks shared by every format: finite values, floating dtypes, divisible groups."""

from __future__ import annotations

import torch


def require_float(x: torch.Tensor, what: str) -> None:
    """Raise a TypeError unless `x` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{what} expects a floating-point torch.Tensor, got {kind}")


def require_finite(x: torch.Tensor, what: str) -> None:
    """Raise a ValueError if `x` holds NaN or inf (quantizing them would silently corrupt scales)."""
    require_float(x, what)
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what}: input holds {bad} non-finite value(s) (NaN/inf); check the model's activations/weights")


def require_group_size(features: int, group_size: int, what: str, even: bool = True) -> None:
    """Raise a ValueError unless `group_size` is a positive divisor of `features` (even, for packed 4-bit)."""
    if group_size <= 0 or (even and group_size % 2):
        raise ValueError(f"{what}: group size must be a positive {'even ' if even else ''}number, got {group_size}")
    if features % group_size:
        divisors = [g for g in range(2 if even else 1, features + 1, 2 if even else 1) if features % g == 0]
        hint = f"; group sizes that divide it: {divisors}" if divisors else "; it has no even divisor, so 4-bit packing cannot group it"
        raise ValueError(
            f"{what}: group size {group_size} does not divide the reduction dimension {features}{hint}"
        )
