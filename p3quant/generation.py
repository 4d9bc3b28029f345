"""Greedy generation over a P3StaticCache, with the decode step optionally replayed as a CUDA graph.

Every decode step runs the same launches on the same buffers (the static cache reads its token count from
the device, masks span the whole storage), so after one eager step the step is captured once and replayed
for every further token: no per-token Python, kernel launches or allocations. Without `cuda_graph` the same
loop runs eagerly (any device and backend), which is how it is tested on CPUs.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .nn.backends import get_backend
from .nn.patching import attention_modules, cache_argument
from .nn.static_cache import P3StaticCache, check_static_config


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax(logits, dim=-1, keepdim=True): the two-launch Triton kernel where Triton runs (a single-block
    torch.argmax over a 128K vocabulary took 36 us per step on an H200), torch.argmax otherwise."""
    from .kernels.common import interpreting

    if logits.is_cuda or interpreting():
        from .kernels.argmax import argmax_tokens

        return argmax_tokens(logits)
    return logits.argmax(dim=-1, keepdim=True)


class GreedyDecoder:
    """Greedy decoding of one batch over a P3StaticCache: the prompt is prefilled on construction (giving the
    first token), then each step() appends one token. With cuda_graph, the second step is captured as a CUDA graph
    and every later step replays it. p3quant.generate drives it; benchmarks time step() alone.

    `tokens` [B, max_new_tokens] holds the tokens produced so far (`produced` of them); call finish() after the
    last step to leave the cache's host-side token counts in sync.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, cuda_graph: bool = False) -> None:
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
        for module in attention_modules(model):  # before the prefill: a decode step must not be the first to fail
            state, head_dim = getattr(module, "p3_attention", None), getattr(module, "head_dim", None)
            if state is not None and head_dim is not None:
                get_backend(state.backend, device).check_static_decode(head_dim)
        self.model, self.cuda_graph, self.max_new_tokens = model, cuda_graph, max_new_tokens
        self.cache = P3StaticCache(config, len(attention_modules(model)), prompt + max_new_tokens)
        self._cache_kw = {cache_argument(model): self.cache}
        self._mask = torch.ones(batch, prompt + max_new_tokens, dtype=torch.long, device=device)
        if attention_mask is not None:
            self._mask[:, :prompt] = attention_mask
        positions = (self._mask[:, :prompt].cumsum(dim=-1) - 1).clamp(min=0)
        # only the last position's logits: all of them would be [B, T, vocabulary] (8 GiB at B = 8, T = 4K, 128K)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        logits = model(input_ids=input_ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
                       **self._cache_kw, **keep).logits
        self.tokens = torch.empty(batch, max_new_tokens, dtype=input_ids.dtype, device=device)
        self._token = _greedy(logits[:, -1])
        self.tokens[:, :1] = self._token
        self._position = positions[:, -1:] + 1
        self._graph: torch.cuda.CUDAGraph | None = None
        self.produced = 1

    def _step(self) -> None:
        logits = self.model(input_ids=self._token, attention_mask=self._mask, position_ids=self._position,
                            use_cache=True, **self._cache_kw).logits
        self._token.copy_(_greedy(logits[:, -1]))
        self._position.add_(1)

    @torch.no_grad()
    def step(self) -> None:
        """Decode one more token (eagerly; with cuda_graph, the 2nd step is captured and later ones replay it)."""
        if self.produced >= self.max_new_tokens:
            raise RuntimeError(f"all {self.max_new_tokens} tokens are decoded; the static cache has no room for more")
        if self._graph is not None:
            self._graph.replay()
        elif self.cuda_graph and self.produced >= 2:  # step 1 ran eagerly: kernels compiled, workspaces allocated
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._step()
            self._graph.replay()
        else:
            self._step()
        self.tokens[:, self.produced : self.produced + 1] = self._token
        self.produced += 1

    def finish(self) -> torch.Tensor:
        """The tokens so far, with the cache's host-side token counts synchronized (one device sync)."""
        self.cache.sync_lengths()
        return self.tokens[:, : self.produced]


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
    decoder = GreedyDecoder(model, input_ids, max_new_tokens, attention_mask, cuda_graph)
    for _ in range(1, max_new_tokens):
        decoder.step()
    return decoder.finish()


__all__ = ["GreedyDecoder", "generate"]
