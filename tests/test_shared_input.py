"""Grouped projections (q/k/v, gate/up): one backend call for the siblings, outputs equal to separate calls."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import p3quant
from p3quant.kernels import gemm_w4
from p3quant.nn.linear import P3Linear
from p3quant.nn.shared_input import SharedInputGroup

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64, head_dim=16)


def _count_launches(monkeypatch) -> list[int]:
    launches = []
    monkeypatch.setattr(gemm_w4, "_gemv", lambda *a, _f=gemm_w4._gemv: launches.append(len(a[2])) or _f(*a))
    return launches


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_quantize_groups_projections_and_decode_logits_are_unchanged(monkeypatch, arch):
    model = (LlamaForCausalLM(LlamaConfig(**SIZES)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**SIZES))).eval()
    p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", backend="triton", weight_group_size=32))
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
        assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None
        assert mlp.down_proj.shared_input is None
    launches = _count_launches(monkeypatch)
    ids = torch.randint(0, 128, (1, 1))  # one token: the projections' one-launch GEMV
    with torch.no_grad():
        grouped = model(ids).logits
        assert launches == [3, 1, 2, 1] * 2  # per layer: q/k/v, o, gate/up, down
        assert all(m.shared_input._pending is None for m in model.modules() if isinstance(m, P3Linear) and m.shared_input)
        for m in model.modules():
            if isinstance(m, P3Linear):
                m.shared_input = None
        assert torch.equal(grouped, model(ids).logits)


def _group(k: int, ns: tuple[int, ...], backend: str = "triton") -> list[P3Linear]:
    config = p3quant.P3Config.preset("w4a8kv4p8", backend=backend, weight_group_size=32)
    members = [P3Linear.from_linear(torch.nn.Linear(k, n, bias=True, dtype=torch.bfloat16), config) for n in ns]
    group = SharedInputGroup(members)
    for m in members:
        m.shared_input = group
    return members


def test_triton_group_runs_one_launch_and_each_member_gets_its_output(monkeypatch):
    launches = _count_launches(monkeypatch)
    members = _group(128, (64, 16, 16))
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    want = [m.compute(x) for m in members]
    launches.clear()
    got = [m(x) for m in members[::-1]][::-1]  # any call order
    assert launches == [3] and members[0].shared_input._pending is None
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_members_fed_different_or_changed_inputs_compute_their_own():
    x, other = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16)
    members = _group(64, (32, 8))
    members[0](x)
    assert torch.equal(members[1](other), members[1].compute(other))  # not x's pending output
    group = members[0].shared_input
    assert not group.sharing and group._pending is None  # this module feeds its members different inputs
    assert torch.equal(members[0](x), members[0].compute(x)) and group._pending is None
    members = _group(64, (32, 8))
    members[0](x)
    x.mul_(2)  # changed in place after the first member's call: the pending output is stale
    assert torch.equal(members[1](x), members[1].compute(x))
    members = _group(64, (32, 8))
    with torch.inference_mode():  # no version counter: each member computes its own
        y = torch.randn(1, 64, dtype=torch.bfloat16)
        members[0](y)
        assert members[0].shared_input._pending is None
        assert torch.equal(members[1](y), members[1].compute(y))


def test_group_shares_only_where_one_call_can_compute_every_member():
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    members = _group(64, (32, 8), backend="torch")  # the reference backend computes each layer anyway
    members[0](x)
    assert members[0].shared_input._pending is None
    members = _group(64, (32, 8))
    group = members[0].shared_input
    members[1]._hf_hook = object()  # e.g. accelerate's offload hook: its weight is loaded in its own forward only
    members[0](x)
    assert group._pending is None
    del members[1]._hf_hook
    members[0](torch.randn(2, 64, dtype=torch.bfloat16))  # two tokens: one launch per weight anyway
    assert group._pending is None
    members[0](x)
    assert group._pending is not None and not group._uniform(torch.device("meta"))
    assert copy.deepcopy(group)._pending is None  # copies leave the waiting outputs behind
    waiting = group._pending[2][1]
    assert members[1](x) is waiting and group._pending is None
