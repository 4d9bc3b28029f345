"""The "pim" backend: decode through the emulator agrees with the torch reference, and the ledger books
modeled time and energy by the system's mapping policy."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import p3quant
from p3quant import P3Config
from p3quant.attention_math import AttentionFormats, QuantizedKV, p3_attention_reference
from p3quant.formats import BITMOD4
from p3quant.nn.backend_pim import PimBackend
from p3quant.nn.backends import TorchBackend, get_backend
from p3quant.quantizers import key_smoothing_factor, quantize_keys, quantize_values

VOCAB = 96
TINY = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, head_dim=32)


def _kv(b: int, hkv: int, t: int, r: int, d: int) -> QuantizedKV:
    keys, values = torch.randn(b, hkv, t + r, d) * 2, torch.randn(b, hkv, t + r, d)
    s = key_smoothing_factor(keys)
    return QuantizedKV(quantize_keys(keys[:, :, :t], s), quantize_values(values[:, :, :t]), s,
                       keys[:, :, t:], values[:, :, t:])


def test_decode_attention_matches_reference_up_to_p8_rounding_steps() -> None:
    b, h, hkv, t, r, d = 2, 8, 2, 48, 2, 32
    kv = _kv(b, hkv, t, r, d)
    query = torch.randn(b, h, 1, d) * 2
    mask = torch.ones(b, 1, 1, t + r, dtype=torch.bool)
    mask[1, ..., :5] = False  # a padded sequence
    fmt = AttentionFormats()
    backend = PimBackend()
    out = backend.attention(query, kv, mask, d**-0.5, fmt)
    ref = p3_attention_reference(query, kv, mask, d**-0.5, fmt)
    diff = (out - ref).abs()
    # Q.K^T is exact on the PIM and float32 in the reference (relative differences ~1e-7); a probability
    # whose folded value sits that close to an E4M4 rounding midpoint may round one step apart: at most
    # 2^-4 of itself (normal) or 2^-18 (subnormal) per token, times |V| (docs/pim_arithmetic.md).
    vmax = kv.values.dequantize().abs().amax() + kv.residual_values.abs().amax()
    assert float(diff.max()) <= float(vmax) * (2.0**-4 + (t + r) * 2.0**-18) + 1e-5
    assert float(diff.median()) <= 1e-5 * float(ref.abs().max())
    names = set(backend.ledger.decode)
    assert {"pim:qk", "pim:pv", "npu:softmax", "npu:residual window"} <= names


def test_prefill_attention_is_the_reference_booked_on_the_npu() -> None:
    kv = _kv(1, 2, 16, 1, 32)
    query = torch.randn(1, 4, 17, 32)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()[None, None]
    backend = PimBackend()
    out = backend.attention(query, kv, mask, 32**-0.5, AttentionFormats())
    assert torch.equal(out, p3_attention_reference(query, kv, mask, 32**-0.5, AttentionFormats()))
    assert set(backend.ledger.prefill) == {"npu:attention"} and not backend.ledger.decode


def test_linear_follows_the_batch_policy() -> None:
    w = BITMOD4.quantize(torch.randn(64, 128), 64)
    backend = PimBackend()
    for batch in (1, 4, 8):
        x = torch.randn(batch, 1, 128)
        y = backend.linear(x, w, None, "fp8_e4m3")
        ref = TorchBackend().linear(x, w, None, "fp8_e4m3")
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    decode = backend.ledger.decode
    assert decode["pim:linear 64x128"].calls == 2 and decode["npu:linear 64x128"].calls == 1  # batch 8 -> NPU
    assert backend.ledger.decode_tokens == 1 + 4 + 8 and backend.ledger.decode_steps == 3
    assert backend.ledger.arithmetic.macs == (1 + 4) * 64 * 128


def test_generate_reads_modeled_tokens_per_second_and_energy() -> None:
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    ref_model = copy.deepcopy(model)
    p3quant.quantize(model, P3Config.preset("w4a8kv4p8", weight_group_size=64, backend="pim"))
    p3quant.quantize(ref_model, P3Config.preset("w4a8kv4p8", weight_group_size=64, backend="torch"))
    ids = torch.randint(0, VOCAB, (2, 8))
    ledger = get_backend("pim").ledger
    ledger.reset()
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        pim = model.generate(ids, **kwargs)
        ref = ref_model.generate(ids, **kwargs)
    # Compare the logits of every step whose prefix both runs share (the first step is the prefill). Each
    # operation agrees to float32 rounding (mean logit difference ~5e-8 of the logits' range), but an ulp can
    # flip one FP8/INT4/UE4M4 code (a 1/16 step of one element) that later layers and steps carry on: 3 of 61
    # seeds showed such a flip, moving the mean by 1.3e-3 to 2.2e-3 of the range and single logits by < 2%.
    # A wrong operation moves the mean by more: halving the residual window's share of P.V gave 2e-2 to 4e-2.
    for step, (a, b) in enumerate(zip(pim.scores, ref.scores)):
        if not torch.equal(pim.sequences[:, : 8 + step], ref.sequences[:, : 8 + step]):
            break
        diff, scale = (a - b).abs(), float(b.abs().max())
        assert diff.mean() < 5e-3 * scale and diff.max() < 0.1 * scale, step
    assert ledger.decode_tokens == 2 * 3 and ledger.decode_steps == 3 and ledger.prefill_tokens == 16
    assert ledger.tokens_per_s > 0 and ledger.energy_per_token_j > 0
    assert ledger.decode_seconds == pytest.approx(sum(e.seconds for e in ledger.decode.values()))
    assert "tokens/s" in ledger.summary() and "pim:linear 128x128" in ledger.summary()
    ledger.reset()
    assert ledger.decode_tokens == 0 and not ledger.decode and ledger.tokens_per_s == 0.0


def test_system_without_pim_is_rejected() -> None:
    with pytest.raises(ValueError, match="no PIM"):
        PimBackend(system="npu-fp16")
