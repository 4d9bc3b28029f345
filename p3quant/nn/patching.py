"""Patch a Hugging Face decoder in place: P3Linear modules, P3 attention and the P3 cache hook."""

from __future__ import annotations

import inspect
import re
from typing import Iterator

import torch
from torch import nn

from ..config import P3Config
from .attention import ATTENTION_NAME, P3AttentionState, capture_rope, register_p3_attention
from .fused_rope import attach_fused_rope
from .kv_cache import P3Cache
from .linear import P3Linear


def quantizable_linears(model: nn.Module, config: P3Config) -> Iterator[tuple[str, nn.Linear]]:
    """Decoder nn.Linear modules to replace: not the output embeddings, not names matching skip_modules."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = [re.compile(p) for p in config.skip_modules]
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if module is output and "lm_head" in config.skip_modules:
            continue
        if any(p.search(name) for p in skip):
            continue
        yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_architecture(model: nn.Module) -> None:
    """Raise a clear error unless the model routes attention through transformers' AttentionInterface."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not use transformers' attention interface, so P3 attention cannot plug in; "
            "supported: decoder LLMs such as Llama, Mistral, Qwen2/Qwen3, Gemma3 (or quantize weights only with "
            "P3Config.preset('w4a16'))"
        )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules of the decoder (they carry a layer_idx and call the attention interface)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def uses_p3_attention(config: P3Config) -> bool:
    return config.quantizes_kv or config.query_format != "none" or config.prob_format != "none"


def replace_linears(model: nn.Module, config: P3Config, names: list[str] | None = None, quantize: bool = True) -> list[str]:
    """Swap the chosen nn.Linear modules for P3Linear (quantizing their weights, or empty for loading)."""
    replaced = []
    wanted = set(names) if names is not None else None
    for name, linear in list(quantizable_linears(model, config)):
        if wanted is not None and name not in wanted:
            continue
        if linear.in_features % config.weight_group_size:
            raise ValueError(
                f"{name}: in_features={linear.in_features} is not a multiple of weight_group_size="
                f"{config.weight_group_size}; choose a group size that divides every decoder in_features "
                "(SmolLM2-135M: 64) or add the module to skip_modules"
            )
        if quantize:
            module = P3Linear.from_linear(linear, config)
        else:
            module = P3Linear(
                linear.in_features, linear.out_features, linear.bias is not None, config.weight_format,
                config.weight_group_size, config.activation_format, config.backend, linear.weight.device, linear.weight.dtype,
            )
        set_submodule(model, name, module)
        replaced.append(name)
    return replaced


def attach_attention(model: nn.Module, config: P3Config) -> None:
    """Route attention through "p3", give each attention module its state, and make the model use a P3Cache."""
    check_architecture(model)
    register_p3_attention()
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"no self-attention modules with a layer_idx found in {type(model).__name__}")
    for module in modules:
        if not hasattr(module, "p3_attention"):
            module.register_forward_pre_hook(capture_rope, with_kwargs=True)
            attach_fused_rope(module)
        module.p3_attention = P3AttentionState(config, config.backend)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
    num_layers = len(modules)
    model.p3_make_cache = lambda batch_size=None, max_length=None: P3Cache(config, num_layers)
    if not getattr(model, "_p3_cache_hook", False):
        model.register_forward_pre_hook(_inject_p3_cache, with_kwargs=True)
        model._p3_cache_hook = True


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: "cache" in recent transformers, else "past_key_values"."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _inject_p3_cache(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: replace a missing or empty non-P3 cache (e.g. generate()'s DynamicCache) by a P3Cache."""
    name = cache_argument(model)
    current = kwargs.get(name, kwargs.get("past_key_values"))
    if isinstance(current, P3Cache):
        return None
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", True)
    if current is None and not use_cache:
        return None
    if current is not None and current.get_seq_length() > 0:
        raise ValueError(
            f"a non-empty {type(current).__name__} was passed to a P3-quantized model; pass a P3Cache "
            "(model.p3_make_cache()) or none"
        )
    kwargs.pop("past_key_values", None)
    kwargs[name] = model.p3_make_cache()
    return args, kwargs


def model_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers, split into P3Linear (packed) and everything else."""
    packed = sum(m.packed_nbytes() for m in model.modules() if isinstance(m, P3Linear))
    total = sum(t.numel() * t.element_size() for t in _unique_tensors(model))
    return {"total_bytes": total, "p3linear_bytes": packed, "other_bytes": total - packed}


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    return out
