"""GPTQ (Frantar et al., 2022) for grouped INT4 asymmetric or BitMoD weights, on the library's own grids.

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

BitMoD grid (weight_format="bitmod"). When GPTQ enters a group, BITMOD4.quantize (p3quant.formats.bitmod, the
quantizer P3Linear uses) applied to the group's current weights picks the group's variant (special-value
selector, lowest MSE, ties to the lower selector) and scale; every column of the group is then rounded on that
fixed grid with the format's own rounding (bitmod._fit_family: nearest value, ties to the smaller magnitude, the
special value on its side when strictly closer). Re-quantizing GPTQ's output with BITMOD4.quantize gives back the
same scales, codes and values provided the group keeps the element that sets its scale: for the +-5 variants the
largest-|w| element on entry is given magnitude 6 (with its entry sign), for the +-8 variants the largest element
on the special value's side is given the special value (one always takes it on entry when such a variant wins),
unless the scale sits at the fp16 floor. The chosen variant then reproduces the group exactly (MSE 0) and every
lower selector cannot (tested), except that a group whose special value went unused is equally well described by
selector 0, which BITMOD4.quantize then reports (same codes and values); GPTQResult.selectors already says so.

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
from ..formats.bitmod import BITMOD4, GRID_MAX, SPECIAL_CODE, SPECIAL_VALUES, _fit_family
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
    """Dequantized weight on the INT4 / BitMoD grid (float32, [out, in]) and GPTQ's loss sum((w - q)^2 / d^2) / 2.

    For BitMoD also the grid GPTQ used, [out, in // group_size]: fp16 scales and uint8 selectors (canonical: 0 for
    a group whose special value went unused), which BITMOD4.quantize(weight) reproduces.
    """

    weight: torch.Tensor
    loss: float
    scales: torch.Tensor | None = None
    selectors: torch.Tensor | None = None

GPTQ_FORMATS = ("int4", "bitmod")


class _OneThread:
    """torch.bucketize (inside BitMoD's rounding) on a few thousand elements runs ~50x slower on 2 threads than on
    one (measured on the 2-core CPU: 15 ms vs 0.24 ms per column); the rounding runs single-threaded."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.threads != 1:
            torch.set_num_threads(self.threads)


def _bitmod_enter(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid of groups g [rows, group] as BITMOD4.quantize picks it: (scale fp16, selector long, anchor, anchor code).

    anchor: the column (in g) whose code is pinned so that the group's max |value| stays grid_max * scale; -1 when
    no anchor is needed (scale at the fp16 floor). The anchor code is magnitude 6 with the element's sign for the
    +-5 variants, the special value for the +-8 variants.
    """
    grid = BITMOD4.quantize(g, g.shape[1], check=False)
    scale = grid.scales.reshape(-1)
    sel = grid.selectors.reshape(-1).long()
    wide = sel >= 2
    side_positive = sel % 2 == 1
    # +-5: largest |w|; +-8: largest element on the special value's side (argmax of w or of -w).
    anchor = torch.where(wide, torch.where(side_positive, g.argmax(1), g.argmin(1)), g.abs().argmax(1))
    at = g.gather(1, anchor.unsqueeze(1)).squeeze(1)
    six = torch.where(at < 0, 0b1111, 0b0111)  # magnitude index 7 (= 6) with the sign bit
    code = torch.where(wide, torch.full_like(six, SPECIAL_CODE), six)
    anchor = torch.where(scale > _SCALE_FLOOR, anchor, torch.full_like(anchor, -1))
    return scale, sel, anchor, code


def _bitmod_round(col: torch.Tensor, scale: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """uint8 codes of col [rows] on the fixed BitMoD grid (scale [rows] fp16, selector [rows]), the library's rounding."""
    mag = col.abs().unsqueeze(1)
    negative, positive = (col < 0).unsqueeze(1), (col > 0).unsqueeze(1)
    fits = []
    for family in (0, 1):  # selectors 2 * family + side, as in bitmod._quantize_groups
        top = GRID_MAX[2 * family]
        # _fit_family derives the scale as store_scale(amax / grid_max): amax = scale * grid_max gives it back exactly
        amax = scale.float() * top
        fits.append(_fit_family(mag, negative, amax, abs(SPECIAL_VALUES[2 * family]), top, scale.dtype))
    wide = (sel >= 2).unsqueeze(1)
    on_side = torch.where((sel % 2 == 1).unsqueeze(1), positive, negative)
    take_sv = torch.where(wide, fits[1].take_sv, fits[0].take_sv) & on_side
    codes = torch.where(take_sv, SPECIAL_CODE, torch.where(wide, fits[1].base_codes, fits[0].base_codes))
    return codes.squeeze(1)


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
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, settings: GPTQSettings | None = None,
                  weight_format: str = "int4") -> GPTQResult:
    """GPTQ of weight [out, in] to INT4 asymmetric ("int4") or BitMoD ("bitmod") in groups of group_size along in,
    given H [in, in].

    The result lies on the library quantizer's grid: INT4.quantize(result.weight, group_size) (or BITMOD4.quantize)
    reproduces its codes (and for BitMoD result.scales and result.selectors).
    """
    settings = settings or GPTQSettings()
    if weight_format not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ: weight_format must be one of {list(GPTQ_FORMATS)}, got {weight_format!r}")
    bitmod = weight_format == "bitmod"
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
    if bitmod:
        n_groups = cols // group_size
        scales = torch.empty(rows, n_groups, dtype=_SCALE_DTYPE, device=w.device)
        selectors = torch.empty(rows, n_groups, dtype=torch.uint8, device=w.device)
        used_sv = torch.zeros(rows, dtype=torch.bool, device=w.device)
    block = -(-settings.blocksize // group_size) * group_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if bitmod:
                if i % group_size == 0:  # entering a group: BitMoD's variant and scale from the current weights
                    with _OneThread():
                        bm_scale, bm_sel, bm_anchor, bm_code = _bitmod_enter(w1[:, i:i + group_size])
                    bm_anchor = torch.where(bm_anchor >= 0, bm_anchor + i, bm_anchor)
                    used_sv.zero_()
                col = w1[:, i]
                d = hinv1[i, i]
                with _OneThread():
                    codes = _bitmod_round(col, bm_scale, bm_sel)
                codes = torch.where(bm_anchor == i, bm_code.to(codes.dtype), codes)
                used_sv |= codes == SPECIAL_CODE
                deq = BITMOD4.decode(codes, bm_sel) * bm_scale.float()
                q1[:, i] = deq
                losses += ((col - deq) ** 2 / d**2).double() / 2
                err = (col - deq) / d
                w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                err1[:, i] = err
                if (i + 1) % group_size == 0:  # group done: canonical selector 0 if the special value went unused
                    group = (i1 + i) // group_size
                    scales[:, group] = bm_scale
                    selectors[:, group] = torch.where(used_sv, bm_sel, torch.zeros_like(bm_sel)).to(torch.uint8)
                continue
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
    if bitmod:  # one group per row with act_order, so the permutation does not move groups
        check = BITMOD4.quantize(out, group_size, check=False)
        bad = ~(check.dequantize() == out).reshape(rows, -1, group_size).all(-1)
        bad |= (check.scales != scales) | (check.selectors != selectors)
        if bad.any():  # never seen (tested on random and edge-case groups); would mean packing changes GPTQ's values
            warnings.warn(f"GPTQ: {int(bad.sum())} BitMoD groups do not re-quantize to GPTQ's grid; P3Linear's "
                          "packing will round them again", stacklevel=2)
        return GPTQResult(out, losses.sum().item(), scales, selectors)
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

    config.weight_format must be "int4" (asymmetric) or "bitmod"; config.weight_group_size is the group. Uses
    config.calibration_samples windows of config.calibration_seqlen tokens of `calibration` (texts with
    `tokenizer`, or token ids). Linears in config.skip_modules are left alone. Returns GPTQ's loss per linear.
    """
    from ..nn.patching import quantizable_linears

    settings = settings or GPTQSettings()
    if config.weight_format not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ here quantizes to INT4 asymmetric (weight_format='int4') or BitMoD ('bitmod'), "
                         f"not {config.weight_format!r}")
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
                result = gptq_quantize(linear.weight, hess.value(), gs, settings, config.weight_format)
                linear.weight.copy_(result.weight.to(linear.weight.dtype))
                losses[wanted[id(linear)]] = result.loss
                del hess
        hidden = [_run_layer(layer, h, args, kwargs) for h, args, kwargs in chunk_calls]
    return losses
