"""p3quant: P3-LLM hybrid-format quantization (W4A8KV4P8) for Hugging Face models."""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _map_sibling_packages() -> None:
    """Serve kernels/ and pim_emulator/ as p3quant.kernels / p3quant.pim_emulator where the installer did not.

    setup.py maps them under p3quant; a source checkout on sys.path, or an editable install by an older
    setuptools that only adds the repository root to sys.path, lacks that mapping.
    """
    root = _Path(__file__).resolve().parent.parent
    for name in ("kernels", "pim_emulator"):
        full = f"{__name__}.{name}"
        init = root / name / "__init__.py"
        if full in _sys.modules or not init.is_file() or _importlib_util.find_spec(full) is not None:
            continue
        spec = _importlib_util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[full] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_map_sibling_packages()

from .config import PRESETS, P3Config
from .formats import BITMOD4, FP8_E4M3, INT4, INT8, UE4M4
from . import models
from .hf import P3QuantizationConfig
from .nn.attention import register_p3_attention
from .nn.kv_cache import P3Cache
from .nn.static_cache import P3StaticCache
from .nn.linear import P3Linear
from .nn.patching import model_memory
from .quantize import quantize, set_backend
from .generation import GreedyDecoder, generate

register_p3_attention()

__version__ = "0.1.0"

__all__ = [
    "P3Config", "PRESETS", "P3Cache", "P3StaticCache", "GreedyDecoder", "generate", "P3Linear", "P3QuantizationConfig", "quantize", "set_backend", "models", "model_memory", "BITMOD4", "FP8_E4M3", "INT4", "INT8", "UE4M4", "__version__"]
