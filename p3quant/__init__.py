"""p3quant: P3-LLM hybrid-format quantization (W4A8KV4P8) for Hugging Face models."""

from .config import PRESETS, P3Config
from .formats import BITMOD4, FP8_E4M3, INT4, INT8, UE4M4
from . import models
from .hf import P3QuantizationConfig
from .nn.attention import register_p3_attention
from .nn.kv_cache import P3Cache
from .nn.linear import P3Linear
from .quantize import quantize, set_backend

register_p3_attention()

__version__ = "0.1.0"

__all__ = [
    "P3Config", "PRESETS", "P3Cache", "P3Linear", "P3QuantizationConfig", "quantize", "set_backend", "models", "BITMOD4", "FP8_E4M3", "INT4", "INT8", "UE4M4", "__version__"]
