"""The fused rotary embedding (kernels/rope.py, nn/fused_rope.py) is transformers' apply_rotary_pos_emb bit for bit."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import p3quant
from p3quant.kernels import rope
from p3quant.kernels.rope import apply_rotary, rope_kernel_applies


def _inputs(b, h, hkv, t, d, dtype, cos_batch):
    # q and k as HF makes them: projections [B, T, H * D] viewed [B, T, H, D] and transposed (not contiguous)
    q = (torch.randn(b, t, h * d) * 4).to(dtype).view(b, t, h, d).transpose(1, 2)
    k = (torch.randn(b, t, hkv * d) * 4).to(dtype).view(b, t, hkv, d).transpose(1, 2)
    angles = torch.rand(cos_batch, t, d // 2) * 1000
    emb = torch.cat((angles, angles), dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("b,h,hkv,t,d,dtype,cos_batch", [(2, 4, 2, 1, 32, torch.bfloat16, 2), (1, 6, 3, 5, 64, torch.float16, 1),
                                                         (3, 2, 1, 4, 24, torch.bfloat16, 1),
                                                         (1, 12, 6, 2, 16, torch.float16, 1)])  # 3 query, 2 key head blocks
def test_apply_rotary_is_bit_exact(b, h, hkv, t, d, dtype, cos_batch):
    q, k, cos, sin = _inputs(b, h, hkv, t, d, dtype, cos_batch)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    for got, want in ((got_q, want_q), (got_k, want_k)):  # bits, signed zeros included
        assert torch.equal(got.contiguous().view(torch.int16), want.contiguous().view(torch.int16))
    for got, want in ((got_q, want_q), (got_k, want_k)):  # the same memory layout (a size-1 dim's stride is free)
        assert [st for st, n in zip(got.stride(), got.shape) if n > 1] == [st for st, n in zip(want.stride(), want.shape) if n > 1]


def test_apply_rotary_rejects_what_it_cannot_take():
    q, k, cos, sin = _inputs(1, 2, 1, 3, 16, torch.bfloat16, 1)
    assert rope_kernel_applies(q, k, cos, sin)
    assert not rope_kernel_applies(q.float(), k.float(), cos.float(), sin.float())  # 32-bit: the original runs
    assert not rope_kernel_applies(q, k, cos[:, :2], sin[:, :2])  # positions do not match
    assert not rope_kernel_applies(q, k, cos.half(), sin.half())  # mixed dtypes
    with pytest.raises(ValueError, match="16-bit q"):
        apply_rotary(q, k[:, :, :2], cos, sin)


def test_triton_attention_uses_the_fused_rope_and_restores_transformers_function(monkeypatch):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=16)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", backend="triton", weight_group_size=32))
    namespace = sys.modules["transformers.models.llama.modeling_llama"].__dict__
    original = namespace["apply_rotary_pos_emb"]
    ids = torch.randint(0, 64, (2, 7))
    calls = []
    real = rope.apply_rotary
    monkeypatch.setattr(rope, "apply_rotary", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        fused = model(ids).logits
    assert len(calls) == 2  # one launch per layer for queries and keys
    assert namespace["apply_rotary_pos_emb"] is original
    monkeypatch.setattr(rope, "rope_kernel_applies", lambda *a: False)  # transformers' own rotary
    with torch.no_grad():
        unfused = model(ids).logits
    assert len(calls) == 2 and torch.equal(fused, unfused)
    p3quant.set_backend(model, "torch")  # other backends never touch transformers' function
    monkeypatch.setattr(rope, "rope_kernel_applies", lambda *a: pytest.fail("the torch backend must not fuse"))
    with torch.no_grad():
        model(ids)
    assert namespace["apply_rotary_pos_emb"] is original
