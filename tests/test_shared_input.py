"""Grouped projections (q/k/v, gate/up): one backend call for the siblings, outputs equal to separate calls."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import p3quant
from p3quant.kernels import gemm_w4
from p3quant.nn.linear import P3Linear
from p3quant.nn.shared_input import SharedInputGroup

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64, head_dim=16)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_quantize_groups_projections_and_logits_are_unchanged(arch):
    model = (LlamaForCausalLM(LlamaConfig(**SIZES)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**SIZES))).eval()
    p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", backend="torch", weight_group_size=32))
    layers = model.model.layers
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
        assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None
        assert mlp.down_proj.shared_input is None
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        grouped = model(ids).logits
        assert all(m.shared_input._pending is None for m in model.modules() if isinstance(m, P3Linear) and m.shared_input)
        for m in model.modules():
            if isinstance(m, P3Linear):
                m.shared_input = None
        assert torch.equal(grouped, model(ids).logits)


def _linears(k: int, ns: tuple[int, ...], backend: str) -> list[P3Linear]:
    config = p3quant.P3Config.preset("w4a8kv4p8", backend=backend, weight_group_size=32)
    return [P3Linear.from_linear(torch.nn.Linear(k, n, bias=True, dtype=torch.bfloat16), config) for n in ns]


def test_triton_group_runs_one_launch_and_each_member_gets_its_output(monkeypatch):
    launches = []
    monkeypatch.setattr(gemm_w4, "_gemv_fp8", lambda *a, _f=gemm_w4._gemv_fp8: launches.append(len(a[2])) or _f(*a))
    members = _linears(128, (64, 16, 16), "triton")
    group = SharedInputGroup(members)
    for m in members:
        m.shared_input = group
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    want = [m.compute(x) for m in members]
    launches.clear()
    got = [m(x) for m in members]
    assert launches == [3] and group._pending is None
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_group_recomputes_for_another_or_changed_input():
    members = _linears(64, (32, 8), "torch")
    group = SharedInputGroup(members)
    for m in members:
        m.shared_input = group
    x, other = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16)
    members[0](x)
    assert torch.equal(members[1](other), members[1].compute(other))  # not x's pending output
    members[0](x)
    x.mul_(2)  # changed in place after the first member's call: the pending output is stale
    assert torch.equal(members[1](x), members[1].compute(x))
    with torch.inference_mode():  # no version counter: each member computes its own
        y = torch.randn(1, 64, dtype=torch.bfloat16)
        members[0](y)
        assert group._pending is None or group._pending[0] is not y
        assert torch.equal(members[1](y), members[1].compute(y))


def test_group_leaves_hooked_or_other_device_members_to_their_own_forward():
    members = _linears(64, (32, 8), "torch")
    group = SharedInputGroup(members)
    for m in members:
        m.shared_input = group
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    members[1]._hf_hook = object()  # e.g. accelerate's offload hook: its weight is loaded in its own forward only
    members[0](x)
    assert group._pending is None
    del members[1]._hf_hook
    members[0](x)
    assert group._pending is not None
    assert not group._uniform(torch.device("meta"))
