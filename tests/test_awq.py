"""AWQ with the 4-bit quantizer in the loop: exact scale folding, a measurable gain on outliers, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import p3quant
from p3quant import P3Config, P3Linear
from p3quant.calibration.awq import AWQSettings, ScaleGroup, apply_clip, decoder_layers, fold_scales, scale_groups, search_clip, search_scale
from p3quant.calibration.fakequant import fake_bitmod
from p3quant.quantizers import quantize_weight

VOCAB = 96
COMMON = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=VOCAB, max_position_embeddings=256, head_dim=32)


def _tiny(arch: str, kv_heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=kv_heads))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **COMMON, num_key_value_heads=kv_heads, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
        ))
    with torch.no_grad():  # non-trivial norm weights, so folding into them is really exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_fake_bitmod_matches_library_quantizer() -> None:
    w = torch.randn(96, 128) * torch.rand(96, 1)
    assert torch.equal(fake_bitmod(w, 64), quantize_weight(w, "bitmod", 64).dequantize())


@pytest.mark.parametrize("arch,kv_heads", [("llama", 4), ("llama", 2), ("gemma3", 2)])
def test_folded_scales_keep_the_float_model(arch: str, kv_heads: int) -> None:
    model = _tiny(arch, kv_heads)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        for layer in decoder_layers(model):
            groups = scale_groups(layer)
            assert any(g.linears[0][0] == "o_proj" for g in groups) == (kv_heads == 4)  # AWQ's v->o shape rule
            for group in groups:
                fold_scales(group, torch.rand(group.linears[0][1].in_features) * 3 + 0.2)
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item()), (out - ref).abs().max()


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
def test_awq_beats_rtn_on_activation_outliers(fmt: str) -> None:
    torch.manual_seed(1)
    hidden, out_features = 256, 192
    norm = LlamaRMSNorm(hidden)
    linear = nn.Linear(hidden, out_features, bias=False)
    x = torch.randn(2048, hidden)
    x[:, :6] *= 40.0  # a few outlier channels, as in real LLM activations
    h = norm(x).detach()
    config = P3Config.preset("w4a16", weight_format=fmt, weight_group_size=64)
    reference = h @ linear.weight.detach().t()
    rtn = h @ quantize_weight(linear.weight.detach(), fmt, 64).dequantize().t()

    gen = torch.Generator().manual_seed(0)
    s = search_scale(h, [linear], config, AWQSettings(), gen)
    fold_scales(ScaleGroup(norm, [("proj", linear)]), s)
    h2 = norm(x).detach()
    apply_clip(linear, search_clip(h2, linear, config, AWQSettings(), gen), 64)
    awq = h2 @ quantize_weight(linear.weight.detach(), fmt, 64).dequantize().t()
    mse_rtn, mse_awq = (rtn - reference).pow(2).mean(), (awq - reference).pow(2).mean()
    assert mse_awq < 0.9 * mse_rtn, (mse_awq, mse_rtn)


def test_calibrated_model_saves_and_loads(tmp_path) -> None:
    model = _tiny("llama", kv_heads=2)
    config = P3Config.preset("w4a8kv4p8", weight_group_size=64, calibration_samples=4, calibration_seqlen=32)
    calibration = torch.randint(0, VOCAB, (4, 32))
    ids = torch.randint(0, VOCAB, (1, 16))
    plain = p3quant.quantize(_tiny("llama", kv_heads=2), config)
    p3quant.quantize(model, config, calibration=calibration)
    assert sum(isinstance(m, P3Linear) for m in model.modules()) == 14
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight_packed, plain.model.layers[0].mlp.down_proj.weight_packed)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
