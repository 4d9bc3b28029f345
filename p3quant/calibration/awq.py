"""AWQ (Lin et al., 2024) with the config's 4-bit weight quantizer (BitMoD or INT4) in the loop.

Layer by layer, on the inputs the calibration text produces at that layer:
1. Scale search. For each group of linears sharing an input x (q/k/v after input_layernorm, o after v, gate/up
   after the MLP norm, down after up) try s = mean|x|^alpha per input channel (alpha on a grid in [0, 1),
   normalised as AWQ does), quantize W * s, and keep the alpha whose outputs x/s @ Q(W s)^T are closest (MSE)
   to the float outputs. The chosen s is folded into the preceding op so the float model is unchanged:
   RMSNorm weight / s (Gemma's (1 + w) norm: 1 + w' = (1 + w) / s), or the preceding linear's output rows / s
   (v_proj -> o_proj only when their shapes match, i.e. no GQA, AWQ's rule; up_proj -> down_proj always).
2. Clipping search. For every linear except q/k (AWQ skips them: attention scores are sensitive), try
   clamping each group to a fraction of its max |w| and keep, per (output channel, group), the ratio whose
   group output on sampled tokens is closest to the float one. Clamping is written into the weights.
Simplification (documented): the scale loss is the MSE of the linears' own outputs (AWQ inspects the whole
attention / MLP block for q/k/v and gate/up); it is what makes the search fit a 2-core CPU.

Next-layer inputs come from the layer's float forward before its search, as in AWQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import P3Config
from .fakequant import fake_quantize_weight


@dataclass(frozen=True)
class AWQSettings:
    """Search sizes, smaller than AWQ's so that SmolLM2-135M calibrates in minutes on a 2-core CPU (docs/calibration.md)."""

    scale_grid: int = 10  # alpha in {0, 1/n, ..., (n-1)/n} (AWQ: n_grid 20)
    clip_grid: int = 5  # ratios 1, 1 - 0.5/n, ..., 0.5 + 0.5/n (AWQ: 20 steps down to max_shrink 0.5)
    clip_max_shrink: float = 0.5
    search_tokens: int = 512  # tokens (sampled) on which candidate outputs are compared in the scale search
    clip_tokens: int = 256  # tokens (sampled) for the clipping search (AWQ: 512)
    seed: int = 0


# ----------------------------------------------------------------------------------------------- data
def calibration_batch(calibration, tokenizer, samples: int, seqlen: int) -> torch.Tensor:
    """[samples, seqlen] token ids from texts (tokenized, concatenated, cut into windows) or token tensors."""
    items = list(calibration) if not isinstance(calibration, (str, torch.Tensor)) else [calibration]
    if not items:
        raise ValueError("calibration data is empty")
    if all(isinstance(x, str) for x in items):
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer: quantize(model, config, calibration=texts, tokenizer=tok)")
        ids = tokenizer("\n\n".join(items), return_tensors="pt")["input_ids"][0]
    elif all(isinstance(x, torch.Tensor) for x in items):
        ids = torch.cat([x.reshape(-1) for x in items])
    else:
        raise TypeError("calibration must be texts (str) or token-id tensors, not a mix")
    windows = min(samples, ids.numel() // seqlen)
    if windows < 1:
        raise ValueError(f"calibration data has {ids.numel()} tokens, fewer than one window of calibration_seqlen={seqlen}")
    return ids[: windows * seqlen].view(windows, seqlen).long()


# ------------------------------------------------------------------------------------ model structure
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (model.model.layers for Llama/Mistral/Qwen/Gemma3 causal LMs)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"AWQ: cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return layers


@dataclass
class ScaleGroup:
    """Linears sharing one input, and the op whose output feeds them (where the scale is folded)."""

    prev: nn.Module
    linears: list[tuple[str, nn.Linear]]


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """AWQ's groups for a Llama-/Gemma-style decoder layer (see the module docstring)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"), (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
    if attn is None or mlp is None or any(not isinstance(getattr(m, n, None), nn.Linear) for m, n in needed):
        raise ValueError(
            f"AWQ supports Llama-style decoder layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj as nn.Linear); "
            f"got {type(layer).__name__}"
        )
    mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm  # Gemma: pre_ff
    groups = [
        ScaleGroup(layer.input_layernorm, [("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj)]),
    ]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup(attn.v_proj, [("o_proj", attn.o_proj)]))
    groups.append(ScaleGroup(mlp_norm, [("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)]))
    groups.append(ScaleGroup(mlp.up_proj, [("down_proj", mlp.down_proj)]))
    return groups


def norm_offset(norm: nn.Module) -> float:
    """1.0 for norms computing x_hat * (1 + w) (Gemma), 0.0 for x_hat * w (Llama); checked numerically."""
    w = getattr(norm, "weight", None)
    if w is None:
        raise ValueError(f"cannot fold AWQ scales into {type(norm).__name__}: it has no weight")
    x = torch.linspace(-1.0, 2.0, w.numel(), device=w.device, dtype=w.dtype).unsqueeze(0)
    with torch.no_grad():
        y = norm(x).float()
    xhat = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    for offset in (0.0, 1.0):
        if torch.allclose(y, xhat * (offset + w.float()), rtol=1e-3, atol=1e-4):
            return offset
    raise ValueError(f"cannot fold AWQ scales into {type(norm).__name__}: it is neither x_hat*w nor x_hat*(1+w)")


@torch.no_grad()
def fold_scales(group: ScaleGroup, s: torch.Tensor) -> None:
    """Scale the linears' input channels by s and divide the preceding op's output by s (function unchanged)."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        offset = norm_offset(prev)
        w = prev.weight.float()
        prev.weight.copy_(((offset + w) / s - offset).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for _, linear in group.linears:
        linear.weight.mul_(s.view(1, -1).to(linear.weight.dtype))


# ------------------------------------------------------------------------------------------- searches
def _sample_rows(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)]


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Linear], config: P3Config, settings: AWQSettings, gen: torch.Generator) -> torch.Tensor:
    """Best per-input-channel scale s for linears sharing input x [tokens, in] (s = 1 if nothing beats it)."""
    x_mean = x.abs().mean(0).float()
    xs = _sample_rows(x, settings.search_tokens, gen).float()
    weights = [lin.weight.float() for lin in linears]
    reference = torch.cat([xs @ w.t() for w in weights], dim=-1)
    best_err, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(settings.scale_grid):
        alpha = i / settings.scale_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = torch.cat([xs @ (fake_quantize_weight(w * s, config.weight_format, config.weight_group_size) / s).t() for w in weights], -1)
        err = (out - reference).pow(2).mean().item()
        if err < best_err:
            best_err, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(x: torch.Tensor, linear: nn.Linear, config: P3Config, settings: AWQSettings, gen: torch.Generator) -> torch.Tensor:
    """Per (output channel, group) max |w| after the best clipping ratio, shaped [out, groups, 1]."""
    gs = config.weight_group_size
    w = linear.weight.float()
    out_features, groups = w.shape[0], w.shape[1] // gs
    xg = _sample_rows(x, settings.clip_tokens, gen).float().reshape(-1, groups, gs).transpose(0, 1)  # [G, T, gs]
    wg = w.reshape(out_features, groups, gs)
    org_max = wg.abs().amax(-1, keepdim=True)
    best_max = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    reference = torch.bmm(xg, wg.permute(1, 2, 0))  # [G, T, out]
    for i in range(settings.clip_grid):
        max_val = org_max * (1 - settings.clip_max_shrink * i / settings.clip_grid)
        clipped = torch.maximum(torch.minimum(wg, max_val), -max_val).reshape(w.shape)
        q = fake_quantize_weight(clipped, config.weight_format, gs).reshape(out_features, groups, gs)
        err = (torch.bmm(xg, q.permute(1, 2, 0)) - reference).pow(2).mean(1).t().unsqueeze(-1)  # [out, G, 1]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = linear.weight.data
    wg = w.reshape(w.shape[0], -1, group_size)
    wg.copy_(torch.maximum(torch.minimum(wg, max_val.to(w.dtype)), -max_val.to(w.dtype)))


# -------------------------------------------------------------------------------------- layer driver
class _Catcher(nn.Module):
    """Stands in for a decoder layer while capturing: records its call and passes hidden states through."""

    def __init__(self, layer: nn.Module, store: list) -> None:
        super().__init__()
        self.layer, self.store = layer, store
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


def _capture_layer_calls(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> list[tuple]:
    """(hidden_states, args, kwargs) each layer is called with; hidden_states is only valid for layer 0."""
    store: list[tuple] = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, store)
    try:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model
        base(input_ids=ids, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return store


def _run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _linear_inputs(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Float inputs [tokens, in] of every linear of the layer, and the layer's output."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            short = name.rsplit(".", 1)[-1]
            handles.append(module.register_forward_pre_hook(
                lambda m, a, short=short: inputs.__setitem__(short, a[0].detach().reshape(-1, a[0].shape[-1]))
            ))
    try:
        out = _run_layer(layer, hidden, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return inputs, out


@torch.no_grad()
def apply_awq(model: nn.Module, config: P3Config, calibration, tokenizer=None, settings: AWQSettings | None = None) -> None:
    """Run AWQ in place on the float weights of `model` (before P3Linear packing), with config's quantizer.

    Uses config.calibration_samples windows of config.calibration_seqlen tokens of `calibration`.
    """
    if not config.quantizes_weights:
        raise ValueError("AWQ needs a weight format: the config does not quantize weights")
    settings = settings or AWQSettings()
    gen = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    ids = calibration_batch(calibration, tokenizer, config.calibration_samples, config.calibration_seqlen).to(device)
    layers = decoder_layers(model)
    calls = _capture_layer_calls(model, layers, ids)
    hidden = calls[0][0]
    gs = config.weight_group_size
    for index, layer in enumerate(tqdm(layers, desc="AWQ", unit="layer")):
        _, args, kwargs = calls[index]
        inputs, next_hidden = _linear_inputs(layer, hidden, args, kwargs)
        for group in scale_groups(layer):
            if any(lin.in_features % gs for _, lin in group.linears):
                raise ValueError(f"AWQ: weight_group_size={gs} does not divide in_features of layer {index}'s {group.linears[0][0]}")
            x = inputs[group.linears[0][0]]
            s = search_scale(x, [lin for _, lin in group.linears], config, settings, gen)
            fold_scales(group, s)
            for name, _ in group.linears:
                inputs[name] = inputs[name] / s.to(inputs[name].dtype)
        for name, module in layer.named_modules():
            short = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and short not in ("q_proj", "k_proj") and short in inputs:
                apply_clip(module, search_clip(inputs[short], module, config, settings, gen), gs)
        hidden = next_hidden
