"""P3StaticCache and p3quant.generate: same tokens as the dynamic cache; the device-length decode kernel path."""

import pytest
import torch
from poison import poisoned_empty
from transformers import LlamaConfig, LlamaForCausalLM

import p3quant
from p3quant.attention_math import AttentionFormats, p3_attention_reference
from p3quant.kernels.decode_attention import p3_decode_attention
from p3quant.nn.patching import attention_modules, cache_argument
from p3quant.nn.static_cache import P3StaticCache, P3StaticCacheLayer


def _model(backend: str, residual_window: int = 1, preset: str = "w4a8kv4p8") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, head_dim=16)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # larger than HF's init so that greedy decoding does not repeat one token
        p.data.normal_(0, 0.2)
    model.generation_config.eos_token_id = None  # p3quant.generate never stops early: neither may the reference
    return p3quant.quantize(model, p3quant.P3Config.preset(preset, backend=backend, weight_group_size=32,
                                                           residual_window=residual_window))


def _prompt(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("preset,residual_window", [("w4a8kv4p8", 1), ("int4-w4a8kv4", 3)])
def test_generate_matches_dynamic_cache(preset, residual_window):
    ids, mask = _prompt(torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,)))))
    model = _model("torch", residual_window, preset)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 12:]
    assert torch.equal(p3quant.generate(model, ids, 8, attention_mask=mask), expected)
    # the static cache also serves transformers' own generate loop (eagerly)
    static = P3StaticCache(model.p3_config, len(attention_modules(model)), 20)
    via_hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                            **{cache_argument(model): static})[:, 12:]
    assert torch.equal(via_hf, expected)


def test_triton_device_length_attention_in_a_model(residual_window=3):
    """Attention on the triton backend (decode steps in the device-length form), linears on torch (fast here)."""
    ids, mask = _prompt(torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,)))))
    expected = p3quant.generate(_model("torch", residual_window), ids, 4, attention_mask=mask)
    model = _model("torch", residual_window)
    for module in attention_modules(model):
        module.p3_attention.backend = "triton"
    assert torch.equal(p3quant.generate(model, ids, 4, attention_mask=mask), expected)


@pytest.mark.parametrize("residual_window,splits", [(1, 3), (4, 1), (4, 3)])
def test_decode_kernel_reads_length_and_ring(monkeypatch, residual_window, splits):
    """The kernel on the whole storage with the device-side count equals the reference on the sliced cache."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    b, hkv, heads, d, prompt, steps, capacity = 2, 2, 4, 32, 9, 6, 40
    layer = P3StaticCacheLayer(p3quant.P3Config(residual_window=residual_window), capacity)
    keys = torch.randn(b, hkv, prompt + steps, d, generator=gen) * (0.5 + 3 * torch.rand(d, generator=gen))
    values = torch.randn(b, hkv, prompt + steps, d, generator=gen)
    layer.update(keys[:, :, :prompt], values[:, :, :prompt])
    layer.commit()
    for t in range(prompt, prompt + steps):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        layer.commit()
    n = prompt + steps
    for store in (layer.key_store, layer.value_store):  # slots past the live quantized count are never data
        store.scales[:, :, n - residual_window:] = float("nan")
        store.packed[:, :, n - residual_window:] = 255
    visible = torch.rand(b, n, generator=gen) > 0.2
    visible[:, -1] = True
    full_mask = torch.zeros(b, capacity, dtype=torch.bool)
    full_mask[:, :n] = visible
    q = torch.randn(b, heads, 1, d, generator=gen)
    poisoned_empty(monkeypatch)  # the kernels' scratch (scores past the live count included) starts as NaN
    # 16-token blocks: each split prefetches blocks past its live end, some splits hold no live token at all
    got = p3_decode_attention(q, layer.quantized_kv(device_length=True), full_mask, d**-0.5, num_splits=splits, block_t=16)
    monkeypatch.undo()
    ref = p3_attention_reference(q, layer.quantized_kv(), visible[:, None, None, :], d**-0.5, AttentionFormats())
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_static_cache_errors():
    with pytest.raises(ValueError, match="dynamic P3Cache"):
        P3StaticCache(p3quant.P3Config.preset("kivi-kv4"), 2, 16)
    with pytest.raises(ValueError, match="dynamic P3Cache"):
        P3StaticCache(p3quant.P3Config(key_position="pre_rope", key_smoothing=False, query_format="none"), 2, 16)
    layer = P3StaticCacheLayer(p3quant.P3Config(residual_window=4), 8)
    layer.update(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))
    with pytest.raises(ValueError, match="at least residual_window"):
        layer.commit()
    layer = P3StaticCacheLayer(p3quant.P3Config(), 8)
    layer.update(torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8))
    layer.commit()
    with pytest.raises(ValueError, match="larger max_cache_len"):
        layer.update(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="sliced cache form"):
        p3_attention_reference(torch.randn(1, 1, 1, 8), layer.quantized_kv(device_length=True), None, 0.3, AttentionFormats())
    model = _model("torch")
    with pytest.raises(ValueError, match="CUDA"):
        p3quant.generate(model, torch.zeros(1, 4, dtype=torch.long), 2, cuda_graph=True)
    with pytest.raises(ValueError, match="quantized by p3quant.quantize"):
        p3quant.generate(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long), 2)
    odd_heads = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=300, head_dim=12)).eval()
    p3quant.quantize(odd_heads, p3quant.P3Config.preset("w4a8kv4p8", backend="triton", weight_group_size=16))
    with pytest.raises(ValueError, match="multiple of 8"):  # up front, not at the first decode step
        p3quant.generate(odd_heads, torch.zeros(1, 4, dtype=torch.long), 2)


def test_greedy_decoder_steps_give_generate_tokens_and_stop_at_capacity():
    model = _model("triton", 1)
    ids = torch.randint(0, 100, (2, 9))
    expected = p3quant.generate(model, ids, 5)
    decoder = p3quant.GreedyDecoder(model, ids, 5)
    assert decoder.produced == 1 and torch.equal(decoder.tokens[:, :1], expected[:, :1])
    for _ in range(4):
        decoder.step()
    assert torch.equal(decoder.finish(), expected)
    with pytest.raises(RuntimeError, match="no room"):
        decoder.step()


@pytest.mark.parametrize("residual_window", [1, 3])
def test_fused_decode_append_equals_the_torch_path(monkeypatch, residual_window):
    """The one-launch decode append (kernels.kv_append.append_kv_at: quantize keys and values into the device-side
    slot and copy them into the rings) leaves storage, rings and count exactly as the torch path (quantize_rows +
    index_copy_)."""
    from p3quant.nn import kv_cache

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    b, hkv, d, prompt, steps, capacity = 2, 3, 32, 7, 5, 16
    keys = (torch.randn(b, hkv, prompt + steps, d, generator=gen) * (0.5 + 3 * torch.rand(d, generator=gen))).to(torch.bfloat16)
    values = torch.randn(b, hkv, prompt + steps, d, generator=gen).to(torch.bfloat16)

    def run(kernel: bool) -> P3StaticCacheLayer:
        monkeypatch.setattr(kv_cache, "_use_append_kernel", lambda x: False)
        layer = P3StaticCacheLayer(p3quant.P3Config(residual_window=residual_window), capacity)
        layer.update(keys[:, :, :prompt], values[:, :, :prompt])
        layer.commit()
        # the decode steps only (the prefill is the same host-position path in both runs)
        monkeypatch.setattr(kv_cache, "_use_append_kernel", (lambda x: x.stride(-1) == 1) if kernel else (lambda x: False))
        for t in range(prompt, prompt + steps):
            layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
            layer.commit()
        return layer

    want, got = run(False), run(True)
    for store in ("key_store", "value_store"):
        for name in ("packed", "scales", "zeros"):
            assert torch.equal(getattr(getattr(got, store), name), getattr(getattr(want, store), name)), (store, name)
        assert getattr(got, store).length == getattr(want, store).length == prompt + steps
    assert torch.equal(got.ring_keys, want.ring_keys) and torch.equal(got.ring_values, want.ring_values)
    assert torch.equal(got.length_t, want.length_t)


def test_fused_decode_append_rejects_bad_storage():
    from p3quant.kernels.kv_append import append_kv_at

    x = torch.randn(1, 2, 1, 8)
    packed, scales, zeros = torch.zeros(1, 2, 4, 4, dtype=torch.uint8), torch.zeros(1, 2, 4, 1, dtype=torch.float16), torch.zeros(1, 2, 4, 1, dtype=torch.uint8)
    ring, pos = torch.zeros(1, 2, 2, 8), torch.zeros(1, dtype=torch.int64)
    storage = (packed, scales, zeros)
    with pytest.raises(ValueError, match="ring must be"):
        append_kv_at(x, x, pos, storage, storage, ring.to(torch.float16), ring.to(torch.float16))
    with pytest.raises(ValueError, match="position must be"):
        append_kv_at(x, x, pos.int(), storage, storage, ring, ring)
    with pytest.raises(ValueError, match="same number"):
        append_kv_at(x, x, pos, (packed, scales[:, :, :3], zeros), storage, ring, ring)
    with pytest.raises(ValueError, match="both be"):
        append_kv_at(x, torch.randn(1, 2, 2, 8), pos, storage, storage, ring, ring)
    with pytest.raises(ValueError, match="rings must have one shape"):
        append_kv_at(x, x, pos, storage, storage, ring, torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="divisor"):
        append_kv_at(x, x, pos, storage, storage, ring, ring, torch.ones(1, 2, 1, 4))
