"""P3 attention as a transformers attention function ("p3"), plugged in through AttentionInterface.

The model computes q/k/v (with its own norms and RoPE), hands k/v to the cache's `update`, and calls this
function, which commits the new tokens to the P3 cache (quantizing those leaving the residual window) and
lets the module's backend compute attention over the packed cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention_math import AttentionFormats
from ..config import P3Config
from .backends import get_backend
from .kv_cache import P3CacheLayer
from .static_cache import P3StaticCacheLayer

ATTENTION_NAME = "p3"


@dataclass
class P3AttentionState:
    """Per-attention-module settings attached by quantize(); `rope` is refreshed on every forward."""

    config: P3Config
    backend: str
    rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def formats(self) -> AttentionFormats:
        return AttentionFormats(
            query_format=self.config.query_format,
            prob_format=self.config.prob_format,
            prob_rounding=self.config.prob_rounding,
            fold_value_scale=self.config.fold_value_scale,
        )


def _bool_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[B or 1, 1, Tq, Tkv] bool mask (True = attend) from HF's bool/additive mask, or causal if absent."""
    if mask is None:
        offset = kv_len - q_len
        rows = torch.arange(q_len, device=device)[:, None] + offset
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def p3_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; returns ([B, Tq, H, D] output, None)."""
    state: P3AttentionState | None = getattr(module, "p3_attention", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation='p3' but was not prepared by p3quant.quantize(model, config)"
        )
    layer = getattr(key, "_p3_layer", None)
    if layer is None:  # no cache in this forward: quantize this call's keys/values as a prefill would
        layer = P3CacheLayer(state.config)
        layer.update(key, value)
    new_tokens = layer.pending[0].shape[-2] if layer.pending is not None else 0
    total = layer.committed_tokens() + new_tokens
    backend = get_backend(state.backend, query.device)
    # A static cache's decode step on a backend that reads the token count from the device: nothing below may
    # depend on the host-side count, so that the step can be captured in a CUDA graph.
    device_length = (isinstance(layer, P3StaticCacheLayer) and query.shape[-2] == 1 and layer.committed_tokens() > 0
                     and backend.device_length_decode)
    mask = _bool_mask(attention_mask, query.shape[-2], layer.max_cache_len if device_length else total, query.device)
    token_mask = None
    if layer.smoothing is None and new_tokens and mask.shape[0] == query.shape[0]:
        token_mask = mask[:, 0].any(dim=-2)[:, -new_tokens:]
    layer.commit(rope=state.rope, token_mask=token_mask)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    kv = layer.quantized_kv(device_length=True) if device_length else layer.quantized_kv()
    out = backend.attention(query, kv, mask, scaling, state.formats, softcap)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def capture_rope(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: remember the (cos, sin) the module is called with (pre-RoPE keys need them)."""
    module.p3_attention.rope = kwargs.get("position_embeddings")


def explicit_mask(*args, **kwargs):
    """transformers' boolean SDPA mask, always materialized (P3 attention needs the visible keys of each row)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention(name: str, forward) -> None:
    """Register an attention function under `name` with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, explicit_mask)


def register_p3_attention() -> None:
    """Register "p3" with transformers' attention and mask interfaces (idempotent)."""
    register_attention(ATTENTION_NAME, p3_attention_forward)
