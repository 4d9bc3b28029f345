"""A preallocated P3 cache whose one-token decode step can be captured in a CUDA graph.

The dynamic P3Cache grows its storage and moves tokens out of the 16-bit residual window with Python-side
bookkeeping, so every decode step runs different host code. This cache fixes everything up front: packed
storage for `max_cache_len` tokens, the residual window as a ring of R slots (token at position q in slot
q % R), and the token count as a device tensor. A decode step quantizes the new token into its slot and
writes it into the ring with device-side indices only, and the triton backend reads the count from device
memory, so the same launches serve every step. Semantics equal the dynamic cache's: every token is
quantized on arrival (slots of the newest R tokens are simply not read), keys divided by the prompt's
smoothing factor, the newest R tokens served in 16 bits.

Scope: per-token INT4 keys after RoPE and INT4 values (the P3 scheme and its INT4 baselines), prompts of at
least R tokens, and on the triton backend a head_dim that is a multiple of 8; other configurations use the dynamic
P3Cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..attention_math import QuantizedKV
from ..config import P3Config
from .kv_cache import P3Cache, P3CacheLayer, _Int4Store, prompt_smoothing, write_pair_at


def check_static_config(config: P3Config) -> None:
    """Raise unless the static cache supports `config`."""
    unsupported = []
    if config.key_format != "int4" or config.value_format != "int4":
        unsupported.append("key_format/value_format must be 'int4'")
    if config.key_granularity != "per_token":
        unsupported.append("key_granularity must be 'per_token' (KIVI-style keys need the dynamic cache)")
    if config.key_position != "post_rope":
        unsupported.append("key_position must be 'post_rope'")
    if config.residual_window < 1:
        unsupported.append("residual_window must be >= 1")
    if unsupported:
        raise ValueError("P3StaticCache: " + "; ".join(unsupported) + ". Use the dynamic P3Cache for this configuration.")


class P3StaticCacheLayer(P3CacheLayer):
    """One layer of P3StaticCache (see the module docstring)."""

    def __init__(self, config: P3Config, max_cache_len: int) -> None:
        check_static_config(config)
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.max_cache_len = max_cache_len
        super().__init__(config)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.length = 0  # committed tokens, host copy (exact in eager mode; a graph replay advances only length_t)
        self.length_t: torch.Tensor | None = None
        self.ring_keys: torch.Tensor | None = None
        self.ring_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        window = self.p3.residual_window
        self.key_store = _Int4Store.empty(b, h, d, key_states.device, capacity=self.max_cache_len)
        self.value_store = _Int4Store.empty(b, h, value_states.shape[-1], value_states.device, capacity=self.max_cache_len)
        self.ring_keys = key_states.new_zeros(b, h, window, d)
        self.ring_values = value_states.new_zeros(b, h, window, value_states.shape[-1])
        self.length_t = torch.zeros(1, dtype=torch.int64, device=key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.length + key_states.shape[-2] > self.max_cache_len:
            raise ValueError(f"P3StaticCache holds {self.max_cache_len} tokens; {self.length} are stored and "
                             f"{key_states.shape[-2]} more arrived: create it with a larger max_cache_len")
        return super().update(key_states, value_states, *args, **kwargs)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, cache_position: torch.Tensor, *args, **kwargs) -> tuple[int, int]:
        """Masks always span the whole storage, so their shape does not change from step to step."""
        return self.max_cache_len, 0

    def commit(self, rope=None, token_mask: torch.Tensor | None = None) -> None:
        """Quantize the pending tokens into their slots and put the newest into the 16-bit ring."""
        if self.pending is None:
            return
        keys, values = self.pending
        self.pending = None
        new = keys.shape[-2]
        if self.smoothing is None and self.p3.key_smoothing:
            self.smoothing = prompt_smoothing(keys, token_mask)
        if self.length == 0 and new < self.p3.residual_window:
            raise ValueError(f"P3StaticCache needs a prompt of at least residual_window={self.p3.residual_window} tokens, got {new}")
        if self.length > 0 and new == 1:
            self._commit_one(keys, values)
        else:
            self._commit_many(keys, values)
        self.length += new

    def _commit_many(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefill (or several tokens at once): host-side positions, not capturable."""
        self.key_store.append(keys, self.smoothing)
        self.value_store.append(values)
        window = self.p3.residual_window
        newest = min(window, keys.shape[-2])
        slots = torch.arange(self.length + keys.shape[-2] - newest, self.length + keys.shape[-2], device=keys.device) % window
        self.ring_keys.index_copy_(2, slots, keys[:, :, -newest:])
        self.ring_values.index_copy_(2, slots, values[:, :, -newest:])
        self.length_t.fill_(self.length + keys.shape[-2])

    def _commit_one(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One decode token at the device-side position: capturable in a CUDA graph."""
        write_pair_at(self.key_store, self.value_store, self.length_t, keys, values, self.ring_keys, self.ring_values,
                      self.smoothing)
        self.length_t.add_(1)

    def quantized_kv(self, device_length: bool = False) -> QuantizedKV:
        """The committed cache for the backends.

        device_length=False: the dynamic cache's form (quantized tokens [0, n - R) and the window in position
        order), sliced with the host-side count (eager use). device_length=True: the whole storage, the ring
        as stored and the device-side count in `length`, for the triton decode kernel (graph capture).
        """
        head_dim = self.ring_keys.shape[-1]
        if device_length:
            keys = self.key_store.view(head_dim, self.max_cache_len)
            values = self.value_store.view(self.ring_values.shape[-1], self.max_cache_len)
            return QuantizedKV(keys, values, self.smoothing, self.ring_keys, self.ring_values, length=self.length_t)
        window = self.p3.residual_window
        n_quant = self.length - window
        keys = self.key_store.view(head_dim, n_quant)
        values = self.value_store.view(self.ring_values.shape[-1], n_quant)
        order = torch.arange(n_quant, self.length, device=self.ring_keys.device) % window
        return QuantizedKV(keys, values, self.smoothing, self.ring_keys.index_select(2, order),
                           self.ring_values.index_select(2, order))

    def committed_tokens(self) -> int:
        return self.length

    def nbytes(self) -> int:
        """The dynamic layer's count (packed tokens, smoothing factors) plus the 16-bit ring."""
        ring = sum(t.numel() * t.element_size() for t in (self.ring_keys, self.ring_values) if t is not None)
        return super().nbytes() + ring

    def _map_batch(self, fn) -> None:
        raise NotImplementedError("P3StaticCache has a fixed batch: beam search and batch reordering need the dynamic P3Cache")


class P3StaticCache(P3Cache):
    """A transformers Cache of P3StaticCacheLayers for at most `max_cache_len` tokens per sequence."""

    def __init__(self, config: P3Config, num_layers: int, max_cache_len: int) -> None:
        self.p3 = config
        Cache.__init__(self, layers=[P3StaticCacheLayer(config, max_cache_len) for _ in range(num_layers)])

    @property
    def max_cache_len(self) -> int:
        """Tokens per sequence the storage holds (prompt + generated)."""
        return self.layers[0].max_cache_len

    def get_query_offset(self, layer_idx: int = 0):
        """The position of the first new query token, as a device tensor (read without a host sync)."""
        layer = self.layers[layer_idx]
        return layer.length_t[0] if layer.length_t is not None else 0

    def sync_lengths(self) -> None:
        """Refresh the host-side token counts from the device ones (after CUDA-graph replays)."""
        for layer in self.layers:
            if layer.length_t is not None:
                layer.length = int(layer.length_t.item())
                layer.seen_tokens = layer.key_store.length = layer.value_store.length = layer.length


__all__ = ["P3StaticCache", "P3StaticCacheLayer", "check_static_config"]
