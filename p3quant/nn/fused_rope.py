"""Rotary embedding of P3 attention modules in one Triton launch (kernels/rope.py) on the triton backend.

transformers' Llama-family attention calls its modeling module's `apply_rotary_pos_emb` between the projections
and the cache. While a P3 attention module on the triton backend runs its forward, that name points to a wrapper
which hands 16-bit CUDA inputs to the fused kernel (bit-identical to transformers' arithmetic) and everything
else to the original function; the forward's end restores the original. Nothing changes for other modules, and
a concurrent caller of the same class can at most meet the bit-identical wrapper.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from .backends import get_backend

# modeling modules whose attention applies rotary embeddings as apply_rotary_pos_emb(q, k, cos, sin)
FUSED_ROPE_MODULES = frozenset({f"transformers.models.{m}.modeling_{m}" for m in ("llama", "mistral", "qwen2", "qwen3")})
_ORIGINALS: dict[str, Callable] = {}
_FUSED: dict[str, Callable] = {}


def _fused(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        from ..kernels.rope import apply_rotary, rope_kernel_applies

        if not args and not kwargs and rope_kernel_applies(q, k, cos, sin):
            return apply_rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _install(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: on the triton backend, point the modeling module's apply_rotary_pos_emb to the fused one."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    state = getattr(module, "p3_attention", None)
    if not isinstance(hidden, torch.Tensor) or state is None or get_backend(state.backend, hidden.device).name != "triton":
        return
    name = type(module).__module__
    namespace = sys.modules[name].__dict__
    if name not in _ORIGINALS:  # first call: the name still holds transformers' function (hooks always restore it)
        current = namespace.get("apply_rotary_pos_emb")
        if current is None:
            return
        _ORIGINALS[name], _FUSED[name] = current, _fused(current)
    namespace["apply_rotary_pos_emb"] = _FUSED[name]


def _restore(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    """Forward hook (also after an exception): the original apply_rotary_pos_emb again."""
    name = type(module).__module__
    if name in _ORIGINALS:
        sys.modules[name].__dict__["apply_rotary_pos_emb"] = _ORIGINALS[name]


def attach_fused_rope(module: nn.Module) -> bool:
    """Give a Llama-family attention module the fused rotary embedding on the triton backend (idempotent)."""
    if type(module).__module__ not in FUSED_ROPE_MODULES or getattr(module, "_p3_fused_rope", False):
        return False
    module.register_forward_pre_hook(_install, with_kwargs=True)
    module.register_forward_hook(_restore, with_kwargs=True, always_call=True)
    module._p3_fused_rope = True
    return True


__all__ = ["attach_fused_rope", "FUSED_ROPE_MODULES"]
