"""Teacher-forced comparison of two copies of one decoder model (e.g. the torch and triton backends).

Comparing whole-model outputs of a quantized model says little: its roundings (FP8 activations, 4-bit keys and
values, UE4M4 probabilities) make it discontinuous, so a difference in fp32 summation order early on can flip a
rounding and move the logits by percents. Feeding each decoder layer of the second model the input the first
model's layer got shows what each layer itself adds instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerDifference:
    """One decoder layer's output in the second model against the first's, both fed the first model's input."""

    layer: int
    relative: float  # ||b - a|| / ||a|| over the whole output
    max_abs: float
    off_elements: int  # elements off by more than `tolerance` of their row's largest magnitude
    elements: int


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder stack of a Hugging Face causal LM (model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("expected a decoder model with model.layers (a Hugging Face causal LM), got "
                         f"{type(model).__name__}")
    return list(layers)


def layer_differences(first: torch.nn.Module, second: torch.nn.Module, input_ids: torch.Tensor,
                      tolerance: float = 1e-3, **forward_kwargs) -> list[LayerDifference]:
    """Runs `first` on input_ids, then `second` with each decoder layer's input replaced by what `first`'s layer of
    the same index received, and compares the layers' outputs (in float64)."""
    layers_a, layers_b = decoder_layers(first), decoder_layers(second)
    if len(layers_a) != len(layers_b):
        raise ValueError(f"the models have {len(layers_a)} and {len(layers_b)} decoder layers; compare copies of one "
                         "model")
    inputs: dict[int, torch.Tensor] = {}
    outputs: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})

    def hooks(side: int, index: int):
        def pre(module, args, kwargs):
            if side == 0:
                inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            elif args:
                args = (inputs[index],) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, hidden_states=inputs[index])
            return args, kwargs

        def post(module, args, kwargs, out):
            outputs[side][index] = (out[0] if isinstance(out, tuple) else out).detach().double()
        return pre, post

    handles = []
    for side, layers in enumerate((layers_a, layers_b)):
        for index, layer in enumerate(layers):
            pre, post = hooks(side, index)
            handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                        layer.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            first(input_ids, **forward_kwargs)
            second(input_ids, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    result = []
    for index, a in sorted(outputs[0].items()):
        d = outputs[1][index] - a
        off = int((d.abs() > tolerance * a.abs().amax(-1, keepdim=True)).sum())
        result.append(LayerDifference(index, float(d.norm() / a.norm()), float(d.abs().max()), off, a.numel()))
    return result
