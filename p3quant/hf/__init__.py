"""transformers integration: the "p3" quantization method for save_pretrained / from_pretrained."""

from .quantizer import P3HfQuantizer, P3QuantizationConfig

__all__ = ["P3HfQuantizer", "P3QuantizationConfig"]
