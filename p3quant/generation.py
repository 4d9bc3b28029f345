"""Greedy generation over a P3StaticCache, with the decode step optionally replayed as a CUDA graph.

Every decode step runs the same launches on the same buffers (the static cache reads its token count from
the device, masks span the whole storage), so after one eager step the step is captured once and replayed
for every further token: no per-token Python, kernel launches or allocations. Without `cuda_graph` the same
loop runs eagerly (any device and backend), which is how it is tested on CPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from .nn.patching import attention_modules, cache_argument
from .nn.static_cache import P3StaticCache, check_static_config


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Greedy continuation [B, max_new_tokens] of `input_ids` [B, L] (left-padded per `attention_mask`).

    Always produces max_new_tokens tokens per row (no early stop at an end-of-sequence token: that would
    need a host sync per step). `model` must be quantized by p3quant.quantize with a configuration the
    static cache supports (p3quant.nn.static_cache); cuda_graph=True needs CUDA and the triton backend.
    """
    config = getattr(model, "p3_config", None)
    if config is None:
        raise ValueError("p3quant.generate needs a model quantized by p3quant.quantize(model, config)")
    check_static_config(config)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_length >= 1], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and input_ids on a CUDA device")
    batch, prompt = input_ids.shape
    device = input_ids.device
    cache = P3StaticCache(config, len(attention_modules(model)), prompt + max_new_tokens)
    cache_kw = {cache_argument(model): cache}
    mask = torch.ones(batch, prompt + max_new_tokens, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :prompt] = attention_mask
    positions = (mask[:, :prompt].cumsum(dim=-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw).logits
    out = torch.empty(batch, max_new_tokens, dtype=input_ids.dtype, device=device)
    token = logits[:, -1].argmax(dim=-1, keepdim=True)
    out[:, :1] = token
    position = positions[:, -1:] + 1

    def step() -> None:
        step_logits = model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **cache_kw).logits
        token.copy_(step_logits[:, -1].argmax(dim=-1, keepdim=True))
        position.add_(1)

    graph = None
    for i in range(1, max_new_tokens):
        if graph is not None:
            graph.replay()
        elif cuda_graph and i >= 2:  # step 1 ran eagerly: kernels compiled, workspaces allocated
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
        else:
            step()
        out[:, i : i + 1] = token
    cache.sync_lengths()
    return out


__all__ = ["generate"]
