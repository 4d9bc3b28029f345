"""quantize(model, config): the one call that turns a Hugging Face decoder into its P3 version, in place."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import P3Config
from .nn.backends import get_backend
from .nn.linear import P3Linear
from .nn.mlp import fuse_mlps
from .nn.norm import fuse_norms
from .nn.shared_input import group_shared_inputs
from .nn.patching import attach_attention, replace_linears, uses_p3_attention

CalibrationData = Iterable[str] | Iterable[torch.Tensor] | None


def quantize(model: nn.Module, config: P3Config | None = None, calibration: CalibrationData = None, tokenizer=None) -> nn.Module:
    """Quantize `model` in place with `config` (default: the paper's W4A8KV4P8) and return it.

    Decoder nn.Linear modules become P3Linear (packed 4-bit weights); attention runs through P3 attention
    over a packed P3 KV cache. `calibration` (texts with `tokenizer`, or token-id tensors) runs the
    config's calibration (AWQ with the BitMoD quantizer in the loop) before the weights are packed.
    """
    config = config or P3Config.preset("w4a8kv4p8")
    if getattr(model, "p3_config", None) is not None:
        raise ValueError("this model is already P3-quantized; load the original weights to quantize again")
    if config.backend not in ("auto", "torch"):
        get_backend(config.backend)  # fail early with a clear message
    if config.quantizes_weights:
        if calibration is not None and config.calibration == "awq":
            from .calibration.awq import apply_awq

            apply_awq(model, config, calibration, tokenizer)
        names = replace_linears(model, config)
        fuse_norms(model)
        fuse_mlps(model)
        group_shared_inputs(model)
    else:
        names = []
    if uses_p3_attention(config):
        attach_attention(model, config)
    model.p3_config = config
    if hasattr(model, "config"):
        from .hf.quantizer import P3QuantizationConfig

        model.config.quantization_config = P3QuantizationConfig(p3_config=config.to_dict(), modules=names)
    return model


def set_backend(model_or_module: nn.Module, name: str) -> nn.Module:
    """Switch the compute backend ("torch", "triton", "pim", "auto") of every P3 module under it."""
    if name != "auto":
        get_backend(name)
    for module in model_or_module.modules():
        if isinstance(module, P3Linear):
            module.backend = name
        state = getattr(module, "p3_attention", None)
        if state is not None:
            state.backend = name
    return model_or_module
