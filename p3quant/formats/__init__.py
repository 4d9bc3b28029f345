"""Bit-exact number formats of the P3-LLM scheme and their quantized-tensor containers."""

from .bitmod import BITMOD4, BitMoDTensor
from .integer import INT4, INT8, Int4Tensor, Int8Tensor
from .minifloat import FP8_E4M3, ROUNDING_MODES, UE4M4, MiniFloat
from .packing import pack_int4, unpack_int4
from .qtensor import QuantizedTensor
from .scaled import ScaledFp8Tensor, quantize_scaled_fp8

__all__ = [
    "BITMOD4", "BitMoDTensor", "INT4", "INT8", "Int4Tensor", "Int8Tensor", "FP8_E4M3", "UE4M4", "MiniFloat",
    "ROUNDING_MODES", "pack_int4", "unpack_int4", "QuantizedTensor", "ScaledFp8Tensor",
    "quantize_scaled_fp8",
]
