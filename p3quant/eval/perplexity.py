"""Perplexity with the standard protocol (GPTQ / QuaRot / P3-LLM): non-overlapping windows, one forward each.

The text is tokenized once; the first `windows * seqlen` tokens are cut into non-overlapping windows (the tail
shorter than a window is dropped); each window is scored independently with the loss on all of its shifted tokens;
ppl = exp(mean NLL over every predicted token of every window).

Two code paths score the same windows:
- "prefill": one forward pass per window. When the model offers a KV-cache factory (`model.p3_make_cache`, added
  by `p3quant.quantize`), the window runs through that cache, so with a quantized cache this is the paper's setting:
  all but the last R (residual window) tokens are quantized before attention. Otherwise no cache is used.
- "decode": the window's tokens go one at a time through `model(input_ids=..., cache=cache, use_cache=True)`
  (`past_key_values=` in transformers releases before its rename), with the cache from
  `model.p3_make_cache(batch_size, max_length)` or, for an unquantized model, transformers' `DynamicCache`.
  This measures the decode code path token by token. For an unquantized model both paths agree up to float
  rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..nn.patching import cache_argument

ScoringPath = Literal["prefill", "decode"]


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll is the mean negative log-likelihood (nats) over `tokens` predicted tokens."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    path: str


def _make_cache(model: torch.nn.Module, batch_size: int, max_length: int):
    """The model's own cache (a P3 cache on quantized models), else transformers' DynamicCache."""
    factory = getattr(model, "p3_make_cache", None)
    if callable(factory):
        return factory(batch_size, max_length)
    return DynamicCache(config=model.config)


def _window_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of `targets` [b, n] under `logits` [b, n, vocab], one row at a time to bound memory."""
    return sum(F.cross_entropy(row.float(), target, reduction="sum").item() for row, target in zip(logits, targets))


def _prefill_nll(model: torch.nn.Module, batch: torch.Tensor) -> float:
    if callable(getattr(model, "p3_make_cache", None)):
        cache = _make_cache(model, batch.shape[0], batch.shape[1])
        logits = model(input_ids=batch, use_cache=True, **{cache_argument(model): cache}).logits
    else:
        logits = model(input_ids=batch, use_cache=False).logits
    return _window_nll_sum(logits[:, :-1], batch[:, 1:])


def _decode_nll(model: torch.nn.Module, batch: torch.Tensor, prompt_len: int, bar: tqdm) -> float:
    cache = {cache_argument(model): _make_cache(model, batch.shape[0], batch.shape[1])}
    total = 0.0
    logits = model(input_ids=batch[:, :prompt_len], use_cache=True, **cache).logits
    total += _window_nll_sum(logits, batch[:, 1 : prompt_len + 1])
    bar.update(batch.shape[0] * prompt_len)
    for i in range(prompt_len, batch.shape[1] - 1):
        logits = model(input_ids=batch[:, i : i + 1], use_cache=True, **cache).logits
        total += _window_nll_sum(logits[:, -1:], batch[:, i + 1 : i + 2])
        bar.update(batch.shape[0])
    return total


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    path: ScoringPath = "prefill",
    batch_size: int = 1,
    progress: bool = True,
    prompt_len: int | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `text` with windows of `seqlen` tokens (at most `max_windows` of them).

    `path` selects one forward per window ("prefill") or token-by-token decoding through the KV cache ("decode");
    `batch_size` windows run together. Prefill keeps [batch, seqlen, vocab] logits in memory (2 GiB per window for
    Gemma-3's 262k vocabulary at 2048 in FP32).
    On the decode path the first `prompt_len` tokens of each window (default seqlen // 8) are the prompt: one
    prefill forward scores them and, on a P3 model, fixes the key smoothing factor, as a deployment would; every
    later token is decoded one at a time. prompt_len=1 decodes the whole window token by token.
    """
    if path not in ("prefill", "decode"):
        raise ValueError(f"path must be 'prefill' or 'decode', got {path!r}")
    if seqlen < 2 or batch_size < 1:
        raise ValueError(f"need seqlen >= 2 and batch_size >= 1, got seqlen={seqlen}, batch_size={batch_size}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    prompt_len = max(1, seqlen // 8) if prompt_len is None else prompt_len
    if not 1 <= prompt_len < seqlen:
        raise ValueError(f"prompt_len must lie in [1, seqlen), got {prompt_len} with seqlen={seqlen}")
    if windows < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    device = next(model.parameters()).device
    data = ids[: windows * seqlen].view(windows, seqlen).to(device)

    if path == "prefill":
        bar = tqdm(total=windows, unit="window", desc=f"ppl prefill {seqlen}", disable=not progress)
    else:
        bar = tqdm(total=windows * (seqlen - 1), unit="tok", desc=f"ppl decode {seqlen}", disable=not progress)
    nll_sum = 0.0
    with bar:
        for start in range(0, windows, batch_size):
            batch = data[start : start + batch_size]
            if path == "prefill":
                nll_sum += _prefill_nll(model, batch)
                bar.update(batch.shape[0])
            else:
                nll_sum += _decode_nll(model, batch, prompt_len, bar)
    tokens = windows * (seqlen - 1)
    nll = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=windows, seqlen=seqlen, path=path)
