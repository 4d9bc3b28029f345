"""p3quant.eval.layer_diff: each decoder layer on the triton backend against the torch backend's, fed the same input.

Given the same input, a triton layer differs from the reference only by fp32 summation order and the roundings
that order flips (SmolLM2-135M: <= 5e-5 relative per layer in the interpreter and with 16-bit MMAs on a GPU;
FP8 MMAs' reduced-precision adds flip more: benchmarks/RESULTS.md, twelfth and thirteenth sessions); a semantic
mismatch (a wrong scale, layout or rounding mode) moves a layer's output by far more than the 1e-2 allowed here.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import p3quant
from p3quant.eval.layer_diff import decoder_layers, layer_differences


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, head_dim=16)
    return LlamaForCausalLM(config).eval()


def test_triton_layers_match_torch_layers_given_the_same_input():
    seed = int(torch.randint(0, 2**31, (1,)))
    base = _tiny_llama(seed)
    models = [p3quant.quantize(copy.deepcopy(base), p3quant.P3Config.preset("w4a8kv4p8", backend=backend,
                                                                             weight_group_size=32))
              for backend in ("torch", "triton")]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    diffs = layer_differences(*models, ids)
    assert [d.layer for d in diffs] == [0, 1] and all(d.elements == 2 * 9 * 64 for d in diffs)
    assert all(d.relative < 1e-2 for d in diffs), f"seed {seed}: {diffs}"


def test_a_wrong_layer_shows_in_its_own_line_only():
    """Teacher forcing: a perturbed second layer does not carry over to the comparison of the others."""
    base = _tiny_llama(0)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    diffs = layer_differences(base, other, torch.randint(0, 128, (1, 7)))
    assert diffs[0].relative > 1e-2 and diffs[0].off_elements > 0
    assert diffs[1].relative == 0.0 and diffs[1].max_abs == 0.0


def test_clear_errors_for_models_without_a_decoder_stack_or_of_different_depth():
    with pytest.raises(ValueError, match="model.layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    shallow = _tiny_llama(0)
    shallow.model.layers = shallow.model.layers[:1]
    with pytest.raises(ValueError, match="2 and 1 decoder layers"):
        layer_differences(_tiny_llama(0), shallow, torch.randint(0, 128, (1, 3)))
