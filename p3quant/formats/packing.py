"""Two 4-bit codes per byte along the last dimension.

Nibble order: element 2*i goes to the LOW nibble of byte i and element 2*i+1 to the HIGH nibble
(little-endian within the byte, the order GPTQ/AWQ-style kernels and the PIM emulator read).
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] (last dim even) into uint8 bytes, halving the last dim."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_int4 expects torch.uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    low, high = codes[..., 0::2], codes[..., 1::2]
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 bytes to uint8 codes in [0, 15], doubling the last dim."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects torch.uint8, got {packed.dtype}")
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
