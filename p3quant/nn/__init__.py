"""nn modules of p3quant: P3Linear, P3 attention, the P3 KV cache, compute backends and model patching."""

from .kv_cache import P3Cache, P3CacheLayer
from .linear import P3Linear

__all__ = ["P3Cache", "P3CacheLayer", "P3Linear"]
