"""QuaRot-style baseline: Hadamard constructions, rotations that keep the float model, finite quantized runs."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from p3quant import P3Config, P3Linear
from p3quant.baselines import quarot_quantize, rotate_model
from p3quant.baselines.hadamard import hadamard, random_hadamard
from p3quant.baselines.quarot import install_online_rotations

VOCAB = 96


def _tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("n", [12, 20, 64, 96, 576, 1536])
def test_hadamard_orders(n: int) -> None:
    h = hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)) and set(h.unique().tolist()) == {-1.0, 1.0}
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_unsupported_hadamard_order() -> None:
    with pytest.raises(ValueError, match="2\\^k"):
        hadamard(28)


@pytest.mark.parametrize("tied", [True, False])
def test_rotations_keep_float_logits(tied: bool) -> None:
    model = _tiny_llama(tied)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model)
        install_online_rotations(model)
        out = model(ids).logits
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, _tiny_llama(tied).model.layers[0].self_attn.q_proj.weight)
    assert (out - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_quarot_quantized_runs_and_rotates_keys() -> None:
    model = quarot_quantize(_tiny_llama(), P3Config.preset("int4-w4a8kv4", weight_group_size=32))
    assert model.config._attn_implementation == "p3_quarot"
    assert isinstance(model.model.layers[0].mlp.down_proj, P3Linear)
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all() and generated.shape == (1, 28)


def _tiny_gemma3(norm_gain_noise: float) -> Gemma3ForCausalLM:
    """A tiny Gemma3 (a sliding and a full layer) whose norm gains get random offsets of the given size."""
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, vocab_size=VOCAB, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(norm_gain_noise * torch.randn_like(p))
    return model


def test_gemma3_rotations_keep_float_logits() -> None:
    torch.manual_seed(0)
    model = _tiny_gemma3(norm_gain_noise=0.3)
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (2, 20))
        ref = model(ids).logits
        rotate_model(model)
        install_online_rotations(model)
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_scaleout_cpu_device_map_auto() -> None:
    import importlib.util
    from pathlib import Path

    import p3quant

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scaleout.py"
    spec = importlib.util.spec_from_file_location("scaleout", path)
    scaleout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaleout)
    model = scaleout.llama_shaped(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=VOCAB)
    model.generation_config.eos_token_id = None  # no early stop (random weights can draw EOS first)
    p3quant.quantize(model, P3Config.preset("w4a8kv4p8", weight_group_size=32))
    device_map = scaleout.dispatch_quantized(model, {"cpu": 10**9})
    assert set(device_map.values()) == {"cpu"}
    with torch.no_grad():
        out = model.generate(torch.randint(0, VOCAB, (1, 8)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_online_norm_gains_keep_float_logits(arch: str) -> None:
    """norm_gains="online": the gains stay on the activation side (x_hat Q times Q^T diag(g) Q), weights unfused."""
    if arch == "llama":
        model = _tiny_llama()
    else:
        model = _tiny_gemma3(norm_gain_noise=3.0)  # large gains, as in the real Gemma-3
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model, norm_gains="online")
        install_online_rotations(model)
        out = model(ids).logits
    # q_proj only rotated (W Q), so its row norms are unchanged: no gain was fused into it
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.norm(dim=1), q_before.norm(dim=1), rtol=1e-5)
    assert (out - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    with pytest.raises(ValueError, match="norm_gains"):
        rotate_model(_tiny_llama(), norm_gains="clip")
