"""Compute backends of P3Linear and P3 attention: one interface, selectable per model and per module.

"torch" is the plain reference (CPU and CUDA); "triton" (fused GPU kernels, p3quant.kernels) and "pim"
(the PIM emulator, p3quant.pim_emulator) register themselves under the same interface.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Callable

import torch

from ..attention_math import AttentionFormats, QuantizedKV, p3_attention_reference
from ..formats import BitMoDTensor, Int4Tensor
from ..quantizers import fake_quantize_activation

QuantizedWeight = BitMoDTensor | Int4Tensor


class Backend(ABC):
    """How a quantized linear layer and attention over the P3 cache are computed."""

    name: str = "abstract"
    # True when attention() accepts a static cache's device-length form (QuantizedKV.length) for decode
    device_length_decode: bool = False

    def check_static_decode(self, head_dim: int) -> None:
        """Raise a ValueError if this backend cannot run a static cache's decode step for heads of `head_dim`."""

    @abstractmethod
    def linear(
        self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, activation_format: str
    ) -> torch.Tensor:
        """y = Q_act(x) @ W^T + bias for x [..., in_features]; returns x.dtype [..., out_features]."""

    def fuses_shared_input(self, x: torch.Tensor, activation_format: str) -> bool:
        """Whether linear_shared_input computes layers fed x in fewer launches than one linear() each."""
        return False

    def linear_shared_input(
        self, x: torch.Tensor, weights: list[QuantizedWeight], biases: list[torch.Tensor | None], activation_format: str
    ) -> list[torch.Tensor]:
        """[linear(x, W_i, b_i) for each i]: layers fed one input (q/k/v, gate/up); backends may fuse them."""
        return [self.linear(x, w, b, activation_format) for w, b in zip(weights, biases)]

    @abstractmethod
    def attention(
        self,
        query: torch.Tensor,
        kv: QuantizedKV,
        attention_mask: torch.Tensor | None,
        scaling: float,
        fmt: AttentionFormats,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention output [B, H, Tq, D] (float32) with the semantics of p3_attention_reference."""


class TorchBackend(Backend):
    """Reference: fake-quantized activations times the dequantized weight, float32 accumulation.

    `cache_dequantized_weights` keeps each layer's dequantized float32 weight between calls (attached to the
    packed buffer, checked against its version), trading memory for speed in token-by-token CPU runs. The
    model's packed storage is unchanged; turn it off to measure the reference's true footprint.
    """

    name = "torch"

    def __init__(self, cache_dequantized_weights: bool = True) -> None:
        self.cache_dequantized_weights = cache_dequantized_weights

    def dequantized(self, weight: QuantizedWeight) -> torch.Tensor:
        if not self.cache_dequantized_weights:
            return weight.dequantize(torch.float32)
        packed = weight.packed
        hit = getattr(packed, "_p3_dequantized", None)
        if hit is None or hit[0] != packed._version:
            hit = (packed._version, weight.dequantize(torch.float32))
            packed._p3_dequantized = hit
        return hit[1]

    def linear(self, x, weight, bias, activation_format):
        xq = fake_quantize_activation(x, activation_format).float()
        y = xq @ self.dequantized(weight).t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def attention(self, query, kv, attention_mask, scaling, fmt, softcap=None):
        return p3_attention_reference(query, kv, attention_mask, scaling, fmt, softcap)


_FACTORIES: dict[str, Callable[[], Backend]] = {"torch": TorchBackend}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make `factory` available as backend `name` (instantiated lazily, once)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def get_backend(name: str, device: torch.device | None = None) -> Backend:
    """The backend called `name`; "auto" picks "triton" on CUDA when it is importable, else "torch"."""
    if name == "auto":
        name = "triton" if device is not None and device.type == "cuda" and triton_available() else "torch"
    if name not in _FACTORIES:
        _load_optional_backend(name)
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends() + ['auto']}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package is installed (looked up once)."""
    return importlib.util.find_spec("triton") is not None


def _load_optional_backend(name: str) -> None:
    """Import the module that registers an optional backend ("triton", "pim")."""
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package: pip install 'p3quant[triton]' (and a CUDA GPU)")
        from . import backend_triton  # noqa: F401
    elif name == "pim":
        from . import backend_pim  # noqa: F401
