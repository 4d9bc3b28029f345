"""The fused RMSNorm (kernels/rmsnorm.py, P3RMSNorm) against transformers' LlamaRMSNorm, and its FP8 hand-off."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import p3quant
from fp8_handoff import assert_fused_output
from p3quant.kernels import act_quant, gemm_w4
from p3quant.kernels.rmsnorm import rms_norm
from p3quant.nn.norm import P3RMSNorm


@pytest.mark.parametrize("m,k,layout", [(1, 256, "split"), (5, 192, "halves"), (4, 128, "halves_fp8"), (2, 64, "quarters"),
                                         (3, 200, None)])
def test_rms_norm_matches_llama_norm_and_quantizes_its_output(m, k, layout):
    norm = LlamaRMSNorm(k, eps=1e-5)
    norm.weight.data = (1 + torch.randn(k)).to(torch.bfloat16)
    x = (torch.randn(m, 1, k) * torch.logspace(-2, 2, k)).to(torch.bfloat16)
    with torch.no_grad():
        want = norm.to(torch.bfloat16)(x)
    act_quant._last = None
    got = rms_norm(x, norm.weight.data, norm.variance_epsilon, layout)
    # only the mean's summation order differs: at most one bf16 ulp, on few elements
    assert_fused_output(got, want, layout, max_ulps=1)


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="16-bit"):
        rms_norm(x.float(), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="layout"):
        rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, "rows")


def test_quantize_wraps_llama_norms_and_triton_backend_uses_the_kernel(monkeypatch):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, head_dim=16)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    keys_before = set(model.state_dict())
    p3quant.quantize(model, p3quant.P3Config.preset("ablation-a-fp8", weight_group_size=32))
    norms = [m for m in model.modules() if isinstance(m, P3RMSNorm)]
    assert len(norms) == 4 and set(k for k in model.state_dict() if "norm" in k) == set(k for k in keys_before if "norm" in k)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    calls = []
    import p3quant.kernels.rmsnorm as rmsnorm_module

    monkeypatch.setattr(rmsnorm_module, "rms_norm", lambda *a: calls.append(a[3]) or "kernel")
    assert torch.equal(norms[0](x), norms[0]._wrapped(x))  # torch backend: the wrapped module
    assert not calls
    p3quant.set_backend(model, "triton")
    assert norms[0](x) == "kernel" and calls == ["split"]  # W4A8 consumer, one token: the GEMV's layout
    assert norms[0](x.expand(3, 1, 64)) == "kernel" and calls[-1] == "halves"
    monkeypatch.setattr(gemm_w4, "MMA_VARIANT", "quarters")  # the small-M variants take groups of 64 and 128 only
    assert norms[0](x.expand(3, 1, 64)) == "kernel" and calls[-1] == "halves"
