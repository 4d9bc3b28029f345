"""The P3 KV cache: packed INT4 keys/values with scales, zero points and smoothing factors, as a transformers Cache.

Per layer it stores, for every (batch, kv-head, token): 4-bit key and value codes (two per byte), an FP16
scale and a 4-bit zero point each (held in a byte), plus one smoothing factor per (batch, kv-head, channel)
computed from the prompt at prefill, and the newest `residual_window` tokens in 16 bits. It never holds a
dequantized copy. New tokens are handed to the layer by `update` (called by the model) and quantized by
`commit` (called by P3 attention, which knows the RoPE tables needed for pre-RoPE keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention_math import QuantizedKV
from ..config import P3Config
from ..formats import INT4, Int4Tensor
from ..quantizers import key_smoothing_factor, quantize_keys_per_channel
from .backends import triton_available
from .rope import rotate, unrotate


@dataclass
class _Int4Store:
    """Growable [B, H, capacity, ...] storage of per-token INT4 groups (one group = head_dim)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, device: torch.device, capacity: int = 64) -> "_Int4Store":
        return cls(
            torch.zeros(batch, heads, capacity, head_dim // 2, dtype=torch.uint8, device=device),
            torch.zeros(batch, heads, capacity, 1, dtype=torch.float16, device=device),
            torch.zeros(batch, heads, capacity, 1, dtype=torch.uint8, device=device),
        )

    def append(self, x: torch.Tensor, divisor: torch.Tensor | None = None) -> None:
        """Quantize rows x [B, H, T, D] (x / divisor if given) to INT4 asymmetric into the next T slots.

        On CUDA with Triton the fused append kernel writes the slots directly (bit-exact with the torch
        quantizers, see kernels/kv_append.py); elsewhere the torch quantizers run and their result is copied.
        """
        n = x.shape[2]
        needed = self.length + n
        if needed > self.packed.shape[2]:
            capacity = max(needed, 2 * self.packed.shape[2])
            self.packed, self.scales, self.zeros = (
                _grow(t, capacity) for t in (self.packed, self.scales, self.zeros)
            )
        sl = slice(self.length, needed)
        if _use_append_kernel(x):
            from ..kernels.kv_append import quantize_int4_rows_into

            quantize_int4_rows_into(x, self.packed[:, :, sl], self.scales[:, :, sl], self.zeros[:, :, sl], divisor)
        else:
            self.packed[:, :, sl], self.scales[:, :, sl], self.zeros[:, :, sl] = quantize_rows(x, divisor)
        self.length = needed

    def write_at(self, position: torch.Tensor, x: torch.Tensor, ring: torch.Tensor, divisor: torch.Tensor | None = None) -> None:
        """Quantize one token per row, x [B, H, 1, D], into the slot at `position` ([1] int64 on x's device), and
        put x itself into the 16-bit ring [B, H, R, D] at slot position % R (PyTorch ops; write_pair_at uses one
        kernel launch for keys and values together on CUDA). The index stays on the device, so the write can be
        captured in a CUDA graph."""
        for storage, rows in zip((self.packed, self.scales, self.zeros), quantize_rows(x, divisor)):
            storage.index_copy_(2, position, rows)
        ring.index_copy_(2, position % ring.shape[2], x)
        self.length += 1

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.packed, self.scales, self.zeros

    def view(self, head_dim: int, length: int | None = None) -> Int4Tensor:
        """The first `length` (default: all stored) tokens, as views."""
        length = self.length if length is None else length
        b, h = self.packed.shape[:2]
        sl = slice(0, length)
        return Int4Tensor(self.packed[:, :, sl], self.scales[:, :, sl], self.zeros[:, :, sl], (b, h, length, head_dim), head_dim)

    def nbytes(self) -> int:
        per_token = sum(t[:, :, :1].numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))
        return per_token * self.length

    def map_batch(self, fn) -> None:
        self.packed, self.scales, self.zeros = fn(self.packed), fn(self.scales), fn(self.zeros)


def quantize_rows(x: torch.Tensor, divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 asymmetric per (b, h, t) row of x / divisor, as new (packed uint8, fp16 scales, uint8 zero points)."""
    b, h, t, d = x.shape
    if _use_append_kernel(x):
        from ..kernels.kv_append import quantize_int4_rows_into

        packed = torch.empty(b, h, t, d // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty(b, h, t, 1, dtype=torch.float16, device=x.device)
        zeros = torch.empty(b, h, t, 1, dtype=torch.uint8, device=x.device)
        quantize_int4_rows_into(x, packed, scales, zeros, divisor)
        return packed, scales, zeros
    q = INT4.quantize(x if divisor is None else x.float() / divisor, d)
    return q.packed, q.scales.to(torch.float16), q.zeros


def prompt_smoothing(keys: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The per-channel key smoothing factor of the prompt's keys (the GPU kernel where it applies)."""
    if _use_append_kernel(keys):
        from ..kernels.kv_append import key_smoothing_factor_gpu

        return key_smoothing_factor_gpu(keys, token_mask)
    return key_smoothing_factor(keys, token_mask)


def _use_append_kernel(x: torch.Tensor) -> bool:
    """The Triton KV-append kernel serves CUDA tensors whose rows are contiguous, when Triton is installed."""
    return x.is_cuda and x.stride(-1) == 1 and triton_available()


def write_pair_at(key_store: _Int4Store, value_store: _Int4Store, position: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, ring_keys: torch.Tensor, ring_values: torch.Tensor,
                  divisor: torch.Tensor | None) -> None:
    """_Int4Store.write_at for a decode token's keys (divided by `divisor`) and values: on CUDA one launch for
    both (kernels.kv_append.append_kv_at), otherwise the two stores' own writes."""
    if _use_append_kernel(keys) and keys.shape == values.shape and ring_keys.shape == ring_values.shape:
        from ..kernels.kv_append import append_kv_at

        append_kv_at(keys, values, position, key_store.storage(), value_store.storage(), ring_keys, ring_values, divisor)
        key_store.length += 1
        value_store.length += 1
    else:
        key_store.write_at(position, keys, ring_keys, divisor)
        value_store.write_at(position, values, ring_values)


def _grow(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = torch.zeros(*t.shape[:2], capacity, *t.shape[3:], dtype=t.dtype, device=t.device)
    out[:, :, : t.shape[2]] = t
    return out


class P3CacheLayer(DynamicLayer):
    """One decoder layer's P3 cache (see the module docstring). Layout [batch, kv-heads, tokens, head_dim]."""

    is_sliding = False
    is_croppable = False

    def __init__(self, config: P3Config, **kwargs) -> None:
        super().__init__(**kwargs)
        self.p3 = config
        self._reset_state()

    def _reset_state(self) -> None:
        self.key_store: _Int4Store | None = None
        self.value_store: _Int4Store | None = None
        self.channel_key_chunks: list[Int4Tensor] = []
        self.dense_keys: torch.Tensor | None = None
        self.dense_values: torch.Tensor | None = None
        self.smoothing: torch.Tensor | None = None
        self.residual_keys: torch.Tensor | None = None
        self.residual_values: torch.Tensor | None = None
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen_tokens = 0
        self.is_initialized = False

    # transformers' Cache-layer protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        if self.p3.key_format != "none" or self.p3.value_format != "none":
            if d % 2:
                raise ValueError(f"the P3 KV cache packs two 4-bit codes per byte: head_dim must be even, got {d}")
        self.residual_keys = key_states.new_zeros(b, h, 0, d)
        self.residual_values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take the new tokens; P3 attention commits (quantizes) them. Returns tensors tagged with this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "P3CacheLayer got new tokens before the previous ones were committed: the model must run with "
                "attn_implementation='p3' (set by p3quant.quantize)"
            )
        self.pending = (key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        key_states._p3_layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_state()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the P3 KV cache does not support cropping (assisted decoding); use greedy or sampling")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for store in (self.key_store, self.value_store):
            if store is not None:
                store.map_batch(fn)
        self.channel_key_chunks = [
            Int4Tensor(fn(c.packed), fn(c.scales), fn(c.zeros), (fn(c.packed).shape[0], *c.shape[1:]), c.group_size)
            for c in self.channel_key_chunks
        ]
        for name in ("smoothing", "residual_keys", "residual_values", "dense_keys", "dense_values", "rope_cos", "rope_sin"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    # P3 behaviour -----------------------------------------------------------------------------------
    def commit(
        self, rope: tuple[torch.Tensor, torch.Tensor] | None = None, token_mask: torch.Tensor | None = None
    ) -> None:
        """Quantize the pending tokens that leave the residual window.

        rope: (cos, sin) [B, T_new, D] of the pending tokens, needed for pre-RoPE keys.
        token_mask: [B, T_new] bool, real (non-padding) pending tokens, used for the smoothing factor.
        """
        if self.pending is None:
            return
        keys, values = self.pending
        self.pending = None
        if self.p3.key_position == "pre_rope" and self.p3.key_format != "none":
            if rope is None:
                raise ValueError("pre-RoPE keys need the RoPE tables: the attention module's position_embeddings were not captured")
            cos, sin = rope
            self.rope_cos = _cat_tokens(self.rope_cos, cos.unsqueeze(1).to(keys.dtype), dim=2)
            self.rope_sin = _cat_tokens(self.rope_sin, sin.unsqueeze(1).to(keys.dtype), dim=2)
        if self.smoothing is None and self.p3.key_smoothing:
            self.smoothing = prompt_smoothing(keys, token_mask)
        self.residual_keys = torch.cat([self.residual_keys, keys], dim=-2)
        self.residual_values = torch.cat([self.residual_values, values], dim=-2)
        self._flush()

    def _flush(self) -> None:
        """Move tokens older than the residual window (in whole KIVI groups for per-channel keys) to INT4."""
        overflow = self.residual_keys.shape[-2] - self.p3.residual_window
        if self.p3.key_granularity == "per_channel":
            overflow = (overflow // self.p3.kivi_group_size) * self.p3.kivi_group_size if overflow > 0 else 0
        if overflow <= 0 or not self.p3.quantizes_kv:
            return
        old_k, old_v = self.residual_keys[:, :, :overflow], self.residual_values[:, :, :overflow]
        self.residual_keys = self.residual_keys[:, :, overflow:]
        self.residual_values = self.residual_values[:, :, overflow:]
        self._store_keys(old_k)
        self._store_values(old_v)

    def _store_keys(self, k: torch.Tensor) -> None:
        if self.p3.key_format == "none":
            self.dense_keys = _cat_tokens(self.dense_keys, k, dim=2)
            return
        if self.p3.key_granularity == "per_channel":
            for start in range(0, k.shape[2], self.p3.kivi_group_size):
                self.channel_key_chunks.append(quantize_keys_per_channel(k[:, :, start : start + self.p3.kivi_group_size]))
            return
        if self.p3.key_position == "pre_rope":
            n_done = self.key_store.length if self.key_store is not None else 0
            cos = self.rope_cos[:, :, n_done : n_done + k.shape[2]]
            sin = self.rope_sin[:, :, n_done : n_done + k.shape[2]]
            k = unrotate(k.float(), cos.float(), sin.float())
        if self.key_store is None:
            self.key_store = _Int4Store.empty(k.shape[0], k.shape[1], k.shape[3], k.device)
        self.key_store.append(k, self.smoothing)

    def _store_values(self, v: torch.Tensor) -> None:
        if self.p3.value_format == "none":
            self.dense_values = _cat_tokens(self.dense_values, v, dim=2)
            return
        if self.value_store is None:
            self.value_store = _Int4Store.empty(v.shape[0], v.shape[1], v.shape[3], v.device)
        self.value_store.append(v)

    def quantized_kv(self) -> QuantizedKV:
        """The committed cache as the backends see it (views, no copies of the packed data)."""
        head_dim = self.residual_keys.shape[-1]
        keys = self.key_store.view(head_dim) if self.key_store is not None and self.p3.key_position == "post_rope" else None
        dense_keys = self.dense_keys
        if self.key_store is not None and self.p3.key_position == "pre_rope":
            n = self.key_store.length
            dense_keys = rotate(
                self.key_store.view(head_dim).dequantize(), self.rope_cos[:, :, :n].float(), self.rope_sin[:, :, :n].float()
            )
        if self.channel_key_chunks:
            dense_keys = torch.cat([c.dequantize().transpose(-1, -2) for c in self.channel_key_chunks], dim=2)
        values = self.value_store.view(self.residual_values.shape[-1]) if self.value_store is not None else None
        dense_values = self.dense_values
        if keys is None and dense_keys is None:
            dense_keys = self.residual_keys[:, :, :0]
        if values is None and dense_values is None:
            dense_values = self.residual_values[:, :, :0]
        return QuantizedKV(keys, values, self.smoothing if keys is not None else None, self.residual_keys,
                           self.residual_values, dense_keys, dense_values)

    def nbytes(self) -> int:
        """Bytes held for the committed tokens: packed codes, scales, zero points, factors, residual window."""
        total = sum(s.nbytes() for s in (self.key_store, self.value_store) if s is not None)
        total += sum(c.nbytes() for c in self.channel_key_chunks)
        for name in ("smoothing", "residual_keys", "residual_values", "dense_keys", "dense_values", "rope_cos", "rope_sin"):
            t = getattr(self, name)
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def fp16_nbytes(self) -> int:
        """Bytes an FP16 cache of the same committed tokens would take."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.residual_keys.shape
        return 2 * b * h * self.committed_tokens() * d * 2

    def committed_tokens(self) -> int:
        return self.seen_tokens - (self.pending[0].shape[-2] if self.pending is not None else 0)


def _cat_tokens(old: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=dim)


class P3Cache(Cache):
    """A transformers Cache whose layers are P3CacheLayers; pass it as past_key_values or let quantize()'s hook make it."""

    def __init__(self, config: P3Config | None = None, num_layers: int | None = None) -> None:
        self.p3 = config or P3Config()
        if num_layers is None:
            super().__init__(layer_class_to_replicate=lambda: P3CacheLayer(self.p3))
        else:
            super().__init__(layers=[P3CacheLayer(self.p3) for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Total bytes of the cache's committed tokens over all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """Bytes an FP16 cache of the same tokens would take (for the compression ratio)."""
        return sum(layer.fp16_nbytes() for layer in self.layers)
