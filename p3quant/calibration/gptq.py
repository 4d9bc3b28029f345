"""GPTQ (Frantar et al., 2022) for grouped INT4 asymmetric weights, on the library's own INT4 grid.

Per linear layer, on the inputs X [tokens, in] that the calibration text produces at that layer:
H = 2 X^T X / tokens, dampened by percdamp * mean(diag H), inverted through Cholesky (upper Cholesky factor of
H^-1, as in the paper's code). Columns are quantized left to right in blocks with lazy batch updates; each
column's rounding error is spread over the not-yet-quantized columns through H^-1. Dead inputs (diag H = 0) get
diag 1 and a zero weight column.

Grid. Every group's scale and zero point come from INT4.quantize (p3quant.formats.integer, the quantizer P3Linear
uses) applied to the group's *current* (already updated) weights when GPTQ enters the group. Blocks are a multiple
of the group size, so a group never straddles a block and those weights include every earlier update. GPTQ returns
the dequantized weights (q - zp) * scale in float32; re-quantizing them with INT4.quantize gives back exactly
GPTQ's scales, zero points and codes (tested) provided each group keeps its extreme codes: the element that set
the group's minimum (maximum) on entry is given code 0 (15) whenever the zero point (scale) depends on it. That
element's own rounding error is then compensated like any other; this is the one place where the codes can differ
from plain nearest rounding inside GPTQ.

apply_gptq drives it over a decoder like AWQ's driver (calibration batch, layer capture): layer by layer, and
inside a layer "true sequential" (q/k/v, then o, then gate/up, then down), so every linear sees inputs produced
by the already-quantized linears and layers before it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import P3Config
from ..formats.integer import INT4, INT4_MAX_CODE
from .awq import _capture_layer_calls, _run_layer, calibration_batch, decoder_layers

_SCALE_DTYPE = torch.float16  # INT4.quantize's default scale storage (what P3Linear stores)
_SCALE_FLOOR = torch.finfo(_SCALE_DTYPE).tiny  # store_scale's clamp: a group at this scale needs no max anchor


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ's parameters (the paper's defaults) and the calibration batch size of the driver."""

    percdamp: float = 0.01  # dampening, as a fraction of mean(diag H)
    blocksize: int = 128  # columns per lazy-update block (rounded up to a multiple of the group size)
    act_order: bool = False  # quantize columns by decreasing diag(H); only with a single group per row
    true_sequential: bool = True  # inside a layer, q/k/v -> o -> gate/up -> down on already-quantized inputs
    chunk: int = 8  # calibration sequences per forward (bounds memory)

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"GPTQSettings.percdamp must be in [0, 1), got {self.percdamp}")
        if self.blocksize <= 0 or self.chunk <= 0:
            raise ValueError("GPTQSettings.blocksize and chunk must be positive")


@dataclass
class GPTQResult:
    """Dequantized weight on the INT4 grid (float32, [out, in]) and GPTQ's loss sum((w - q)^2 / d^2) / 2."""

    weight: torch.Tensor
    loss: float


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise a clear error unless group_size is a positive even divisor of in_features (INT4's grouping)."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"GPTQ: group_size must be a positive even integer (e.g. 64 or 128), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"GPTQ: group_size={group_size} does not divide in_features={in_features}")


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 in float64; raises a clear error if H is not positive definite."""
    h = h.double().clone()
    damp = percdamp * torch.diag(h).mean()
    h.diagonal().add_(damp)
    try:
        low = torch.linalg.cholesky(h)
        inv = torch.cholesky_inverse(low)
        return torch.linalg.cholesky(inv, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"GPTQ: the dampened Hessian is not positive definite (percdamp={percdamp}); "
                         "use more calibration tokens or a larger percdamp") from err


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, settings: GPTQSettings | None = None) -> GPTQResult:
    """GPTQ of weight [out, in] to INT4 asymmetric in groups of group_size along in, given H [in, in].

    The result lies on INT4.quantize's grid: INT4.quantize(result.weight, group_size) reproduces its codes.
    """
    settings = settings or GPTQSettings()
    if weight.dim() != 2:
        raise ValueError(f"GPTQ: expected a 2-d weight [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match in_features={cols}")
    check_group_size(cols, group_size)
    if settings.act_order and group_size != cols:
        raise ValueError("GPTQ: act_order with several groups per row is not supported (a group's columns would be "
                         "quantized out of order); use act_order=False or group_size=in_features")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: weight and Hessian must be finite")

    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if settings.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, settings.percdamp).float()

    out = torch.zeros_like(w)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)
    block = -(-settings.blocksize // group_size) * group_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % group_size == 0:  # entering a group: grid from the current (updated) weights
                g = w1[:, i:i + group_size]
                grid = INT4.quantize(g, group_size, check=False)
                scale = grid.scales.float().reshape(rows)
                zero = grid.zeros.float().reshape(rows)
                anchor_min = g.argmin(1) + i
                anchor_max = g.argmax(1) + i
                need_min = zero > 0
                need_max = (zero < INT4_MAX_CODE) & (grid.scales.reshape(rows) > _SCALE_FLOOR)
            col = w1[:, i]
            d = hinv1[i, i]
            q = torch.clamp(torch.round(col / scale) + zero, 0, INT4_MAX_CODE)
            q = torch.where(need_min & (anchor_min == i), torch.zeros_like(q), q)
            q = torch.where(need_max & (anchor_max == i), torch.full_like(q, INT4_MAX_CODE), q)
            deq = (q - zero) * scale
            q1[:, i] = deq
            losses += ((col - deq) ** 2 / d**2).double() / 2
            err = (col - deq) / d
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        out[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return GPTQResult(out, losses.sum().item())


# -------------------------------------------------------------------------------------- layer driver
class _StopForward(Exception):
    """Raised by a capture hook once a stage's inputs are recorded (the rest of the layer is not needed)."""


class _Hessian:
    """Running H = 2 X^T X / tokens for one linear (float64 sum of float32 batch products)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.sum = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += (x.t() @ x).double()
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("GPTQ: no calibration tokens reached this linear")
        return 2.0 * self.sum / self.tokens


def _collect_stage(layer: nn.Module, pending: dict[str, nn.Linear], chunks: list[tuple], true_sequential: bool) -> dict[str, _Hessian]:
    """Hessians of the next stage: the first pending linear the forward reaches and those sharing its input.

    Without true_sequential every pending linear is one stage (inputs from the float layer).
    """
    stage: list[str] = []
    hessians: dict[str, _Hessian] = {}
    first_input: list[torch.Tensor] = []
    discovering = [True]

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if discovering[0]:
                if not true_sequential:
                    stage.append(name)
                elif not first_input:
                    first_input.append(x)
                    stage.append(name)
                elif x is first_input[0]:
                    stage.append(name)
                else:
                    raise _StopForward
            elif name not in stage:
                return
            hessians.setdefault(name, _Hessian(x.shape[-1], x.device)).add(x)
            if not discovering[0] and true_sequential and name == stage[-1]:
                raise _StopForward
        return fn

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in pending.items()]
    try:
        for index, (hidden, args, kwargs) in enumerate(chunks):
            try:
                _run_layer(layer, hidden, args, kwargs)
            except _StopForward:
                pass
            discovering[0] = False
            if index == 0 and not stage:
                break
    finally:
        for handle in handles:
            handle.remove()
    return {name: hessians[name] for name in stage}


@torch.no_grad()
def apply_gptq(model: nn.Module, config: P3Config, calibration, tokenizer=None, settings: GPTQSettings | None = None) -> dict[str, float]:
    """Run GPTQ in place on the float weights of `model`'s decoder linears (before P3Linear packing).

    config.weight_format must be "int4" (asymmetric); config.weight_group_size is the group. Uses
    config.calibration_samples windows of config.calibration_seqlen tokens of `calibration` (texts with
    `tokenizer`, or token ids). Linears in config.skip_modules are left alone. Returns GPTQ's loss per linear.
    """
    from ..nn.patching import quantizable_linears

    settings = settings or GPTQSettings()
    if config.weight_format != "int4":
        raise ValueError(f"GPTQ here quantizes to INT4 asymmetric (weight_format='int4'), not {config.weight_format!r}")
    gs = config.weight_group_size
    wanted = {id(m): name for name, m in quantizable_linears(model, config)}
    if not wanted:
        raise ValueError("GPTQ: the model has no quantizable nn.Linear modules")
    for name, linear in quantizable_linears(model, config):
        check_group_size(linear.in_features, gs)
    if any(m.weight.dtype != torch.float32 for n, m in quantizable_linears(model, config)):
        warnings.warn("GPTQ: weights are not float32, so storing GPTQ's grid values rounds them and P3Linear's "
                      "re-quantization may not reproduce GPTQ's codes exactly", stacklevel=2)
    device = next(model.parameters()).device
    ids = calibration_batch(calibration, tokenizer, config.calibration_samples, config.calibration_seqlen).to(device)
    layers = decoder_layers(model)
    per_chunk = [_capture_layer_calls(model, layers, part) for part in ids.split(settings.chunk)]
    hidden = [calls[0][0] for calls in per_chunk]
    losses: dict[str, float] = {}
    for index, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer")):
        chunk_calls = [(hidden[c], *per_chunk[c][index][1:]) for c in range(len(per_chunk))]
        pending = {name: m for name, m in layer.named_modules() if id(m) in wanted}
        while pending:
            stage = _collect_stage(layer, pending, chunk_calls, settings.true_sequential)
            if not stage:
                raise RuntimeError(f"GPTQ: layer {index}'s linears {sorted(pending)} were never called in its forward")
            for name, hess in stage.items():
                linear = pending.pop(name)
                result = gptq_quantize(linear.weight, hess.value(), gs, settings)
                linear.weight.copy_(result.weight.to(linear.weight.dtype))
                losses[wanted[id(linear)]] = result.loss
                del hess
        hidden = [_run_layer(layer, h, args, kwargs) for h, args, kwargs in chunk_calls]
    return losses
