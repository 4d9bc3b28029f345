"""p3quant: P3-LLM hybrid-format quantization (W4A8KV4P8) for Hugging Face models."""

from .config import PRESETS, P3Config
from .formats import BITMOD4, FP8_E4M3, INT4, INT8, UE4M4

__version__ = "0.1.0"

__all__ = ["P3Config", "PRESETS", "BITMOD4", "FP8_E4M3", "INT4", "INT8", "UE4M4", "__version__"]
