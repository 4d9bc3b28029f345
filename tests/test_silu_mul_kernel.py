"""The fused SiLU(gate) * up (kernels/silu_mul.py, P3GatedMLP) against transformers' MLP arithmetic, and its FP8
hand-off to the down projection."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import p3quant
from fp8_handoff import assert_fused_output
from p3quant.kernels import act_quant
from p3quant.kernels.silu_mul import silu_mul
from p3quant.nn.mlp import P3GatedMLP


@pytest.mark.parametrize("m,k,layout,dtype", [(1, 384, "split", torch.bfloat16), (4, 200, "halves", torch.bfloat16),
                                               (3, 136, "halves_fp8", torch.float16), (2, 72, "quarters", torch.bfloat16),
                                              (3, 96, None, torch.float16),
                                              (2, 2600, "split", torch.float16)])  # 3 chunks, the last one ragged
def test_silu_mul_matches_pytorch_and_quantizes_its_output(m, k, layout, dtype):
    gate = (torch.randn(m, 1, k) * torch.logspace(-2, 1.5, k)[torch.randperm(k)]).to(dtype)  # peaks in any chunk
    up = (torch.randn(m, 1, k) * 3).to(dtype)
    want = F.silu(gate) * up  # PyTorch rounds after the SiLU and after the product, as the kernel does
    act_quant._last = None
    got = silu_mul(gate, up, layout)
    # the exponential may differ by an ulp, which can move the rounded SiLU by one ulp and the product by one more
    assert_fused_output(got, want, layout, max_ulps=2)


def test_silu_mul_rejects_bad_inputs():
    g = torch.randn(2, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="16-bit"):
        silu_mul(g.float(), g.float())
    with pytest.raises(TypeError, match="16-bit"):
        silu_mul(g, g.half())
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(g, g[:, :32])
    with pytest.raises(ValueError, match="layout"):
        silu_mul(g, g, "rows")


def test_quantize_wraps_llama_mlps_and_triton_backend_uses_the_kernel(monkeypatch):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=16)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    reference = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    p3quant.quantize(model, p3quant.P3Config.preset("ablation-a-fp8", weight_group_size=32))
    p3quant.quantize(reference, p3quant.P3Config.preset("ablation-a-fp8", weight_group_size=32))
    mlps = [m for m in model.modules() if isinstance(m, P3GatedMLP)]
    assert len(mlps) == 2
    assert set(model.state_dict()) == set(reference.state_dict())  # same keys: the projections kept their names
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    mlp = mlps[0]
    with torch.no_grad():  # torch backend: exactly the unfused arithmetic
        assert torch.equal(mlp(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))
    calls = []
    import p3quant.kernels.silu_mul as silu_module

    def spy(gate, up, layout):
        calls.append(layout)
        return F.silu(gate) * up

    monkeypatch.setattr(silu_module, "silu_mul", spy)
    p3quant.set_backend(model, "triton")
    with torch.no_grad():
        mlp(x)
        assert calls == ["split"]  # W4A8 down projection, one token: the GEMV's layout
        mlp(x.expand(3, 1, 64))
        assert calls[-1] == "halves"


def test_modules_with_accelerate_hooks_are_not_replaced():
    """A dispatched model's hooks live on its modules: fusing would drop them, so those modules stay."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=16)
    model = LlamaForCausalLM(config).eval()
    hooked = model.model.layers[0]
    add_hook_to_module(hooked.mlp, ModelHook())
    add_hook_to_module(hooked.input_layernorm, ModelHook())
    p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", weight_group_size=32))
    assert type(hooked.mlp).__name__ == "LlamaMLP" and hasattr(hooked.mlp, "_hf_hook")
    assert type(hooked.input_layernorm).__name__ == "LlamaRMSNorm"
    assert isinstance(model.model.layers[1].mlp, P3GatedMLP)
