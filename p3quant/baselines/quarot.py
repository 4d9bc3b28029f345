"""QuaRot-style W4A8KV4 (Ashkboos et al., 2024) for Llama-family and Gemma3 decoders, on the P3 modules.

What is done (docs/baselines.md gives the full comparison with QuaRot):
1. RMSNorm weights are fused into the following linears (input_layernorm -> q/k/v, post_attention_layernorm ->
   gate/up, final norm -> lm_head; tied embeddings are untied first) and the norms' weights set to 1. With
   norm_gains="online" (for Gemma-3, whose gains break 4-bit weights) the input/MLP norms' gains stay on the
   activation side instead: the norm's output x_hat Q is multiplied online by Q^T diag(g) Q.
2. The residual stream is rotated by a random Hadamard matrix Q: embeddings and the input side of q/k/v/gate/up
   and lm_head become W Q, the output side of o_proj/down_proj becomes Q^T W. Unit-weight RMSNorm commutes with Q.
3. Values are rotated per head by a Hadamard H_hd folded into v_proj (output rows) and o_proj (input columns).
   Gemma3 normalises the attention / MLP outputs (post norms) before the residual add, which does not commute
   with Q: there o_proj/down_proj stay unrotated and the post norms' outputs are rotated online (x Q).
4. Online rotations: down_proj's input is multiplied by a random Hadamard H_ff (folded into down_proj's weight;
   applied to the activation by a forward pre-hook), and queries/keys are rotated per head by H_hd after RoPE
   (q.k unchanged) before the key is quantized, through the attention function "p3_quarot".
5. Weights INT4 (RTN, or GPTQ on the rotated float weights: weights="gptq"), activations INT8 per token, KV INT4
   per token (the config: preset "int4-w4a8kv4").
In float (before step 5) the model's logits are unchanged (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import P3Config
from ..nn.attention import p3_attention_forward, register_attention
from .hadamard import random_hadamard

ATTENTION_NAME = "p3_quarot"
NORM_GAINS = ("fuse", "online")


def _sandwich(layer: nn.Module) -> bool:
    """Gemma3-style layers also normalise the attention / MLP outputs before the residual add."""
    return hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm")


def _decoder(model: nn.Module):
    base = model.get_decoder()
    for layer in base.layers:
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            raise ValueError(f"QuaRot-style rotation supports Llama- and Gemma3-style decoder layers, not {type(layer).__name__}")
    return base


@torch.no_grad()
def _fuse_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Fold the norm's gain (w, or 1 + w for Gemma) into the linears and make the gain 1."""
    from ..calibration.awq import norm_offset

    offset = norm_offset(norm)
    gain = offset + norm.weight.float()
    for linear in linears:
        linear.weight.mul_(gain.view(1, -1).to(linear.weight.dtype))
    norm.weight.fill_(1.0 - offset)


@torch.no_grad()
def _gain_online(norm: nn.Module, q: torch.Tensor) -> None:
    """Keep the norm's gain g on the activation side in the rotated basis: make the gain 1 and multiply the
    norm's output (x_hat Q) by Q^T diag(g) Q, giving (x_hat * g) Q (two online Hadamards and a diagonal)."""
    from ..calibration.awq import norm_offset

    offset = norm_offset(norm)
    gain = offset + norm.weight.double()
    norm.register_buffer("quarot_gain", (q.T @ (gain.view(-1, 1) * q)).float(), persistent=False)
    norm.register_forward_hook(_gain_norm_output)
    norm.weight.fill_(1.0 - offset)


@torch.no_grad()
def _rotate_input(linear: nn.Module, q: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.double() @ q).to(linear.weight.dtype))


@torch.no_grad()
def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, norm_gains: str = "fuse") -> None:
    """Steps 1-4 on the float weights, in place; the online parts are installed by install_online_rotations.

    norm_gains="fuse" folds the input/MLP norms' gains into q/k/v and gate/up (QuaRot); "online" keeps them on
    the activation side (_gain_online), for models whose gains are too large for 4-bit weights (Gemma-3).
    The final norm's gain is always fused into lm_head (16-bit).
    """
    if norm_gains not in NORM_GAINS:
        raise ValueError(f"rotate_model: norm_gains={norm_gains!r}; choose one of {list(NORM_GAINS)}")
    base = _decoder(model)
    config = model.config
    hidden, head_dim = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lm_head = model.get_output_embeddings()
    if lm_head.weight is base.embed_tokens.weight:  # tied: the norm fusion must not change the embeddings
        lm_head.weight = nn.Parameter(lm_head.weight.detach().clone())
        config.tie_word_embeddings = False
    q = random_hadamard(hidden, seed)
    h_hd = random_hadamard(head_dim, seed + 1)
    h_ff = random_hadamard(config.intermediate_size, seed + 2)
    _fuse_norm(base.norm, [lm_head])
    _rotate_input(lm_head, q)
    base.embed_tokens.weight.copy_((base.embed_tokens.weight.double() @ q).to(base.embed_tokens.weight.dtype))
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        sandwich = _sandwich(layer)
        mlp_norm = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
        for norm, linears in ((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]), (mlp_norm, [mlp.gate_proj, mlp.up_proj])):
            if norm_gains == "fuse":
                _fuse_norm(norm, linears)
            else:
                _gain_online(norm, q)
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_input(linear, q)
        if sandwich:  # the output norms sit between o/down and the residual: rotate their outputs online
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.register_buffer("quarot_residual", q.float().to(norm.weight.device), persistent=False)
                norm.register_forward_hook(_rotate_norm_output)
        else:
            for linear in (attn.o_proj, mlp.down_proj):
                _rotate_output(linear, q)
        # Values per head: v' = v H_hd (rows of v_proj), o_proj's input columns per head: W_o blockdiag(H_hd).
        v_heads = attn.v_proj.out_features // head_dim
        _rotate_output(attn.v_proj, torch.block_diag(*[h_hd] * v_heads))
        _rotate_input(attn.o_proj, torch.block_diag(*[h_hd] * (attn.o_proj.in_features // head_dim)))
        _rotate_input(mlp.down_proj, h_ff)  # down(u) = (u H_ff) (W H_ff)^T: the u H_ff part is online
    model.quarot_rotations = {"head": h_hd.float(), "ffn": h_ff.float()}


def _gain_norm_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output @ module.quarot_gain.to(output.dtype)


def _rotate_norm_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output @ module.quarot_residual.to(output.dtype)


def _rotate_down_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x @ module.quarot_ffn.to(x.dtype),) + args[1:]


def quarot_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Rotate queries and keys per head by H_hd after RoPE (scores unchanged), then P3 attention."""
    h = module.quarot_head.to(query.dtype)
    layer = getattr(key, "_p3_layer", None)
    rotated = key @ h
    if layer is not None:
        layer.pending = (layer.pending[0] @ h, layer.pending[1])
        rotated._p3_layer = layer
    return p3_attention_forward(module, query @ h, rotated, value, attention_mask, **kwargs)


def register_quarot_attention() -> None:
    register_attention(ATTENTION_NAME, quarot_attention_forward)


def install_online_rotations(model: nn.Module) -> None:
    """The online Hadamard before every down_proj, and the query/key rotation when P3 attention is used."""
    rotations = getattr(model, "quarot_rotations", None)
    if rotations is None:
        raise ValueError("run rotate_model(model) first")
    base = model.get_decoder()
    for layer in base.layers:
        down = layer.mlp.down_proj
        device = layer.input_layernorm.weight.device
        down.register_buffer("quarot_ffn", rotations["ffn"].to(device), persistent=False)
        down.register_forward_pre_hook(_rotate_down_input)
        if hasattr(layer.self_attn, "p3_attention"):
            layer.self_attn.register_buffer("quarot_head", rotations["head"].to(device), persistent=False)
    if any(hasattr(layer.self_attn, "p3_attention") for layer in base.layers):
        register_quarot_attention()
        model.set_attn_implementation(ATTENTION_NAME)


WEIGHT_METHODS = ("rtn", "gptq")


def _down_rotation_hooks(model: nn.Module) -> list:
    """The online H_ff before every down_proj as removable hooks (for calibrating the rotated float model)."""
    rotations = getattr(model, "quarot_rotations", None)
    if rotations is None:
        raise ValueError("run rotate_model(model) first")
    handles = []
    for layer in model.get_decoder().layers:
        down = layer.mlp.down_proj
        down.register_buffer("quarot_ffn", rotations["ffn"].to(down.weight.device), persistent=False)
        handles.append(down.register_forward_pre_hook(_rotate_down_input))
    return handles


def quarot_quantize(model: nn.Module, config: P3Config | None = None, seed: int = 0, weights: str = "rtn",
                    calibration=None, tokenizer=None, gptq_settings=None, norm_gains: str = "fuse") -> nn.Module:
    """QuaRot-style W4A8KV4: rotate, quantize with `config` (default preset "int4-w4a8kv4"), add online rotations.

    weights="rtn": INT4 round-to-nearest of the rotated weights. weights="gptq": GPTQ (p3quant.calibration.gptq)
    on the rotated float weights first, calibrated on `calibration` (texts with `tokenizer`, or token ids;
    config.calibration_samples x config.calibration_seqlen tokens); GPTQ's weights lie on the INT4 grid, so the
    packing that follows keeps GPTQ's codes. norm_gains: see rotate_model.
    """
    from ..quantize import quantize

    config = config or P3Config.preset("int4-w4a8kv4")
    if config.key_smoothing:
        raise ValueError("the QuaRot baseline rotates keys instead of smoothing them: use key_smoothing=False")
    if weights not in WEIGHT_METHODS:
        raise ValueError(f"quarot_quantize: weights={weights!r}; choose one of {list(WEIGHT_METHODS)}")
    if weights == "gptq":
        if calibration is None:
            raise ValueError("weights='gptq' needs calibration data, e.g. p3quant.calibration.texts.calibration_texts() "
                             "with the model's tokenizer")
        if config.weight_format != "int4":
            raise ValueError(f"QuaRot+GPTQ uses INT4 weights (weight_format='int4'), not {config.weight_format!r}")
    rotate_model(model, seed, norm_gains)
    if weights == "gptq":
        from ..calibration.gptq import apply_gptq

        handles = _down_rotation_hooks(model)
        try:
            apply_gptq(model, config, calibration, tokenizer, gptq_settings)
        finally:
            for handle in handles:
                handle.remove()
    quantize(model, config)
    install_online_rotations(model)
    return model
