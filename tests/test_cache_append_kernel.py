"""The P3 cache's Triton append path (used on CUDA) builds the same cache as the torch path (interpreter here)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import p3quant
from p3quant import P3Config
from p3quant.nn import kv_cache
from p3quant.nn.patching import cache_argument


@pytest.mark.parametrize("key_position", ["post_rope", "pre_rope"])
def test_kernel_append_equals_torch_append(monkeypatch, key_position: str) -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=16)
    model = LlamaForCausalLM(config).eval()
    extra = dict(key_smoothing=False, query_format="none") if key_position == "pre_rope" else {}
    p3quant.quantize(model, P3Config.preset("kv4", key_position=key_position, **extra))
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    def run():
        cache = model.p3_make_cache()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, **{cache_argument(model): cache}, use_cache=True).logits
            step = model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **{cache_argument(model): cache},
                         use_cache=True).logits
        return cache.layers[0], torch.cat([logits, step], 1)

    reference_layer, reference_logits = run()
    monkeypatch.setattr(kv_cache, "_use_append_kernel", lambda x: x.stride(-1) == 1)
    kernel_layer, kernel_logits = run()
    for name in ("packed", "scales", "zeros"):
        for store in ("key_store", "value_store"):
            got, want = getattr(getattr(kernel_layer, store), name), getattr(getattr(reference_layer, store), name)
            assert torch.equal(got[:, :, :9], want[:, :, :9]), (store, name)
    if reference_layer.smoothing is not None:
        assert torch.equal(kernel_layer.smoothing, reference_layer.smoothing)
    assert torch.equal(kernel_logits, reference_logits)
