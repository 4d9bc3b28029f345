"""4-bit packing, BitMoD selection against a brute-force search, INT4/INT8 bounds, containers and serialization."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p3quant.formats import (
    BITMOD4, INT4, INT8, BitMoDTensor, Int4Tensor, Int8Tensor, QuantizedTensor, ScaledFp8Tensor, pack_int4,
    quantize_scaled_fp8, unpack_int4,
)
from p3quant.formats.bitmod import code_integers, code_values

GRID_MAX = {0: 6.0, 1: 6.0, 2: 8.0, 3: 8.0}
NEAR_TIE = 1e-5  # relative MSE gap below which float32 (implementation) and float64 (oracle) may disagree


# ------------------------------------------------------------------------------------------------ packing


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), st.integers(1, 40))
def test_pack_unpack_round_trip(lead: list[int], half_width: int) -> None:
    codes = torch.randint(0, 16, (*lead, 2 * half_width), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, half_width)
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_nibble_order_is_low_then_high() -> None:
    """packing.py: element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble."""
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x0, 0xA]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F, 0xA0]]
    assert unpack_int4(torch.tensor([0xC3], dtype=torch.uint8)).tolist() == [0x3, 0xC]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(4, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        pack_int4(torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.tensor([3, 1], dtype=torch.int16))


# ------------------------------------------------------------------------------------ BitMoD brute force


def brute_force_bitmod(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group [N, G] (float64 search): the MSE of each of the 4 variants [N, 4], their scales, their codes.

    scale = fp16(amax / 6 or / 8), kept in FP16's normal range as formats.grouping.store_scale does (a group with
    amax below ~3.7e-4 therefore gets the scale 2^-14, not a subnormal one); each element takes the nearest of the
    16 code values (weight domain), ties to the smaller magnitude.
    """
    w = w.double()
    amax = w.abs().amax(-1)
    table = code_values().double()
    mses, scales, codes = [], [], []
    for sel in range(4):
        scale = (amax / GRID_MAX[sel]).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16).double()
        cand = table[sel] * scale[:, None]  # [N, 16]
        dist = (w[:, :, None] - cand[:, None, :]).abs()  # [N, G, 16]
        nearest = dist == dist.amin(-1, keepdim=True)
        magnitude = torch.where(nearest, cand.abs()[:, None, :], torch.inf)
        code = magnitude.argmin(-1)  # among the nearest, the smaller magnitude
        err = dist.gather(-1, code[..., None]).squeeze(-1)
        mses.append((err**2).mean(-1))
        scales.append(scale)
        codes.append(code)
    return torch.stack(mses, -1), torch.stack(scales, -1), torch.stack(codes, 1).to(torch.uint8)


def assert_matches_brute_force(w: torch.Tensor, q: BitMoDTensor) -> None:
    """Selector = lowest-MSE variant (exact ties: the lower selector); scale and codes = that variant's."""
    mse, scales, codes = brute_force_bitmod(w)
    sel = q.selectors.long().reshape(-1)
    best = mse.amin(-1)
    exact_first = (mse == best[:, None]).int().argmax(-1)
    chosen_mse = mse.gather(-1, sel[:, None]).squeeze(-1)
    near_tie = (chosen_mse - best) <= NEAR_TIE * best
    ok = (sel == exact_first) | (near_tie & (best > 0) & (chosen_mse != best))
    bad = (~ok).nonzero().flatten()
    assert bad.numel() == 0, f"groups {bad[:5].tolist()}: selector {sel[bad[:5]].tolist()}, MSEs {mse[bad[:5]].tolist()}"
    assert torch.equal(q.scales.double().reshape(-1), scales.gather(-1, sel[:, None]).squeeze(-1))
    want = codes[torch.arange(len(sel)), sel]
    got = q.codes().view(want.shape)
    bad = (got != want).any(-1).nonzero().flatten()
    assert bad.numel() == 0, f"codes differ in groups {bad[:5].tolist()} (selectors {sel[bad[:5]].tolist()})"


def random_weight_groups(n: int, group: int) -> torch.Tensor:
    """FP16-valued groups (as in real checkpoints) of assorted shapes: gaussian, heavy-tailed, one-sided, spiky.

    FP16 values keep ties exact and keep every non-tie at least ~2^-15 (relative) from a rounding midpoint, far
    beyond the float32 error of the implementation's w / scale, so codes must match the float64 oracle exactly.
    """
    base = torch.randn(n, group) * torch.exp2(torch.empty(n, 1).uniform_(-8, 4))
    kind = torch.randint(0, 4, (n, 1))
    heavy = base * torch.exp(torch.randn(n, group))
    one_sided = base.abs() * torch.where(torch.rand(n, 1) < 0.5, -1.0, 1.0)
    sparse = base * torch.where(torch.rand(n, group) < 0.2, 1.0, 1e-3)
    w = torch.where(kind == 0, base, torch.where(kind == 1, heavy, torch.where(kind == 2, one_sided, sparse)))
    boost = torch.rand(n) < 0.5  # half the groups get one clear maximum, on either side
    w[boost, 0] += base[boost, 0].sign() * base[boost].abs().amax(-1) * 3
    return w.half().float()


@pytest.mark.parametrize("group", [128, 32])
def test_bitmod_selection_matches_brute_force_on_random_groups(group: int) -> None:
    w = random_weight_groups(1200, group)
    q = BITMOD4.quantize(w.view(-1, 4 * group), group)  # several groups per row
    flat = BitMoDTensor(q.packed.view(-1, group // 2), q.scales.reshape(-1), q.selectors.reshape(-1), tuple(w.shape), group)
    assert_matches_brute_force(w, flat)
    assert set(q.selectors.unique().tolist()) == {0, 1, 2, 3}  # the random mix exercises every variant


def crafted_groups() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Groups of 64 (in units of a random power of two `step`) with exact ties or a max the special value misses."""
    g = 64

    def row(values: list[float], fill: float) -> torch.Tensor:
        return torch.tensor(values + [fill] * (g - len(values)))

    rows, want = [], []
    # Everything exact on the +-5 grid (scale 1), nothing near 5: the two +-5 variants tie -> the lower, 0.
    rows.append(row([6, -3, 1.5, 0.5, -2, 4, 1], 1.0)); want.append(0)
    # Max +8, the rest exact on the x1 grid: only SV +8 reaches the max (3); SV -8 leaves it clipped to 6.
    rows.append(row([8, 4, 1, 0.5, 3, 6, 2], 1.5)); want.append(3)
    # One-sided negative group with max -8: the +8 variant (3) would clip its max, the -8 variant (2) is exact.
    rows.append(row([-8, -4, -1, -0.5, -3, -6, -2], -1.5)); want.append(2)
    # Max +6 and many +5 (scale 1): SV +5 is exact -> 1; the negated group -> 0. 5.5 ties 5/6 and 4.5 ties 4/5:
    # both go to the smaller magnitude.
    rows.append(row(SV5_TIES, 1.0)); want.append(1)
    rows.append(-row(SV5_TIES, 1.0)); want.append(0)
    # Max +8 (scale 1) with a 7, which ties 6/8 and takes 6.
    rows.append(row([8, 7, 4, 1], 1.5)); want.append(3)
    # +8 and -8 in one group, the rest 1 and 3 (poor on the 4/3-spaced +-5 grid): the +-8 variants tie -> 2.
    rows.append(row([8, -8], 1.0) + torch.tensor([0, 0] + [0.0, 2.0] * 31)); want.append(2)
    # Elements halfway between grid values (scale 1): each rounds to the smaller magnitude; 0 wins the 0/1 tie.
    rows.append(row(TIES, 2.0)); want.append(0)
    step = torch.exp2(torch.randint(-10, 3, (len(rows), 1)).float())
    return torch.stack(rows) * step, step, want


TIES = [6, 2.5, -2.5, 3.5, -3.5, 0.25, -0.75, 1.25, 1.75]
TIES_ROUNDED = [6, 2, -2, 3, -3, 0, -0.5, 1, 1.5]
SV5_TIES = [6, 5.5, 4.5] + [5] * 20
SV5_TIES_ROUNDED = [6, 5, 4] + [5] * 20


def test_bitmod_crafted_ties_and_uncovered_maxima() -> None:
    w, step, want = crafted_groups()
    q = BITMOD4.quantize(w, w.shape[-1])
    assert_matches_brute_force(w, q)
    assert q.selectors.flatten().tolist() == want
    d = q.dequantize() / step  # every crafted group has scale 1 step
    assert d[3, : len(SV5_TIES)].tolist() == SV5_TIES_ROUNDED
    assert d[4, : len(SV5_TIES)].tolist() == [-v for v in SV5_TIES_ROUNDED]
    assert d[5, :4].tolist() == [8, 6, 4, 1]
    assert d[-1, : len(TIES)].tolist() == TIES_ROUNDED


def test_bitmod_dequantize_error_within_half_grid_step() -> None:
    """|w - w_hat| <= half the gap between the two grid values around w/scale (x scale), except clipped ones."""
    w = torch.randn(256, 512) * torch.exp2(torch.empty(256, 1).uniform_(-6, 6))
    q = BITMOD4.quantize(w, 128)
    sel = q.selectors.long().view(-1)
    grid = code_values()[sel].sort(-1).values  # [N, 16] distinct values in scale units
    y = w.view(-1, 128) / q.scales.float().view(-1, 1)
    hi_idx = torch.searchsorted(grid, y.contiguous()).clamp(1, 15)
    gap = grid.gather(-1, hi_idx) - grid.gather(-1, hi_idx - 1)
    lo, hi = grid[:, :1], grid[:, -1:]
    clipped = (y < lo) | (y > hi)
    bound = torch.where(clipped, torch.maximum(lo - y, y - hi), gap / 2) * q.scales.float().view(-1, 1)
    err = (q.dequantize().view(-1, 128) - w.view(-1, 128)).abs()
    slack = 1e-6 * w.view(-1, 128).abs()  # float32 rounding of w - w_hat (a clipped element may clip by ~0)
    assert bool((err <= bound + slack).all()), f"worst excess {(err - bound - slack).max().item():.3g}"


def test_bitmod_zero_and_constant_groups() -> None:
    w = torch.randn(6, 64)
    w[1] = 0.0  # explicit zero groups: whole rows and a half row
    w[3, 32:] = 0.0
    c = torch.empty(1).uniform_(0.5, 100).item()  # 1e-3 c stays above the FP16-normal scale floor (x 6)
    w[4, :32], w[4, 32:], w[5, :32] = c, -c, 1e-3 * c
    q = BITMOD4.quantize(w, 32)
    d = q.dequantize()
    assert torch.isfinite(d).all() and torch.isfinite(q.scales.float()).all() and bool((q.scales > 0).all())
    assert bool((d[1] == 0).all()) and bool((d[3, 32:] == 0).all())
    assert torch.allclose(d[4, :32], torch.full((32,), c), rtol=2**-10)  # fp16 scale: relative 2^-11 per step
    assert torch.allclose(d[4, 32:], torch.full((32,), -c), rtol=2**-10)
    assert torch.allclose(d[5, :32], torch.full((32,), 1e-3 * c), rtol=2**-10)
    alone = BITMOD4.quantize(w[0:1], 32)  # a zero neighbour does not disturb other groups
    assert torch.equal(alone.dequantize(), d[0:1])


def test_bitmod_integer_view_fits_a_6_bit_signed_operand() -> None:
    ints = code_integers()
    assert ints.dtype == torch.int8 and int(ints.abs().max()) == 16
    assert torch.equal(ints.float(), code_values() * 2)
    assert sorted(ints[:, 8].tolist()) == [-16, -10, 10, 16]
    q = BITMOD4.quantize(torch.randn(4, 64), 32)
    deq = q.integer_values().view(4, 2, 32).float() * 0.5 * q.scales.float()[..., None]
    assert torch.equal(deq.view(4, 64), q.dequantize())


@pytest.mark.parametrize("fmt", ["bitmod", "int4"])
def test_group_size_must_divide_in_features(fmt: str) -> None:
    quantize = (lambda w, g: BITMOD4.quantize(w, g)) if fmt == "bitmod" else (lambda w, g: INT4.quantize(w, g))
    with pytest.raises(ValueError, match=r"does not divide .* 96.*\[2, 4, 6, 8, 12, 16, 24, 32, 48, 96\]"):
        quantize(torch.randn(3, 96), 64)
    with pytest.raises(ValueError, match=r"does not divide .* 100.*\[2, 4, 10, 20, 50, 100\]"):
        quantize(torch.randn(3, 100), 64)
    for bad in (0, -8, 7):
        with pytest.raises(ValueError, match="positive even"):
            quantize(torch.randn(3, 96), bad)
    with pytest.raises(ValueError, match="0-d"):
        quantize(torch.tensor(1.0), 2)


@pytest.mark.parametrize("fmt", ["bitmod", "int4", "int8"])
def test_non_finite_weights_are_rejected(fmt: str) -> None:
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    quantize = {"bitmod": lambda: BITMOD4.quantize(w, 32), "int4": lambda: INT4.quantize(w, 32), "int8": lambda: INT8.quantize(w)}
    with pytest.raises(ValueError, match="non-finite"):
        quantize[fmt]()


# ------------------------------------------------------------------------------------------------ INT4/INT8


def test_int4_asymmetric_bounds_and_zero_point() -> None:
    """Codes and zp in [0, 15]; 0 is exact; |x - x_hat| <= 0.51 scale.

    0.5 is the rounding half step; the extra 0.01 covers the clip at code 15: zp is rounded (<= 0.5 step) and the
    FP16 scale may be 2^-11 smaller than range/15 (15 * 2^-11 < 0.008 step).
    """
    x = torch.randn(512, 256) * torch.exp2(torch.empty(512, 1).uniform_(-8, 8))
    x = x + torch.randn(512, 1) * x.abs().amax(-1, keepdim=True) * 0.5 * (torch.rand(512, 1) < 0.5)  # offset rows
    x[:, 7] = 0.0  # the range always includes 0 and 0 is represented exactly
    q = INT4.quantize(x, 64)
    codes, zeros, scales = q.codes(), q.zeros, q.scales.float()
    assert q.shape == (512, 256) and zeros.shape == scales.shape == (512, 4)
    assert int(codes.max()) <= 15 and int(zeros.max()) <= 15 and zeros.dtype == torch.uint8
    d = q.dequantize()
    assert bool((d[:, 7] == 0).all())
    lo, hi = x.view(512, 4, 64).amin(-1).clamp(max=0), x.view(512, 4, 64).amax(-1).clamp(min=0)
    assert torch.allclose(scales, (hi - lo) / 15, rtol=2**-11)
    err = (d - x).abs().view(512, 4, 64)
    assert bool((err <= 0.51 * scales[..., None] + 1e-6 * x.abs().view(512, 4, 64)).all())
    assert q.centered_codes().abs().max() <= 15


def test_int4_symmetric_bounds() -> None:
    x = torch.randn(64, 128) * 3
    q = INT4.quantize(x, 32, symmetric=True)
    assert bool((q.zeros == 8).all())
    c = q.centered_codes()
    assert int(c.min()) >= -8 and int(c.max()) <= 7
    scales = q.scales.float()
    assert torch.allclose(scales, x.view(64, 4, 32).abs().amax(-1) / 7, rtol=2**-11)
    err = (q.dequantize() - x).abs().view(64, 4, 32)
    assert bool((err <= 0.51 * scales[..., None]).all())  # 0.5 rounding + clip of |x|/scale <= 7(1 + 2^-11)


def test_int4_zero_and_constant_groups() -> None:
    x = torch.randn(4, 32)
    x[0] = 0.0
    c = torch.empty(1).uniform_(0.01, 100).item()
    x[1], x[2] = c, -c
    for symmetric in (False, True):
        q = INT4.quantize(x, 32, symmetric=symmetric)
        d = q.dequantize()
        assert torch.isfinite(d).all() and bool((d[0] == 0).all())
        assert torch.allclose(d[1], torch.full((32,), c), rtol=2**-10)
        assert torch.allclose(d[2], torch.full((32,), -c), rtol=2**-10)


def test_int8_per_token_and_grouped() -> None:
    x = torch.randn(32, 96) * torch.exp2(torch.empty(32, 1).uniform_(-4, 4))
    x[5] = 0.0
    for group in (None, 32):
        q = INT8.quantize(x, group)
        g = group or 96
        scales = q.scales.float()
        assert q.values.dtype == torch.int8 and int(q.values.abs().max()) <= 127 and scales.shape == (32, 96 // g)
        live = torch.arange(32) != 5
        assert torch.allclose(scales[live], x.view(32, -1, g)[live].abs().amax(-1) / 127, rtol=2**-11)
        err = (q.dequantize() - x).abs().view(32, -1, g)
        assert bool((err <= 0.51 * scales[..., None]).all()) and bool((q.dequantize()[5] == 0).all())


# --------------------------------------------------------------------------- containers and serialization


def all_containers() -> list[QuantizedTensor]:
    """One container of every kind and layout, from fresh random weights."""
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    return [
        BITMOD4.quantize(w, 32), INT4.quantize(w, 16), INT4.quantize(w, 64, symmetric=True), INT8.quantize(w),
        INT8.quantize(w.float(), 32), quantize_scaled_fp8(w), quantize_scaled_fp8(w.view(2, 4, 64), 16),
    ]


@pytest.mark.parametrize("index", range(7))
def test_safetensors_round_trip_without_pickle(index: int) -> None:
    layers = [all_containers()[index], all_containers()[index]]  # two layers in one file, told apart by prefix
    blob = safetensors.torch.save({k: v for i, q in enumerate(layers) for k, v in q.to_dict(f"layer.{i}.").items()})
    data = safetensors.torch.load(blob)
    for i, q in enumerate(layers):
        back = type(q).from_dict(data, f"layer.{i}.")
        assert back.metadata() == q.metadata()
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(back.tensors().values(), q.tensors().values()))
        assert torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(KeyError, match="missing entry"):
        type(layers[0]).from_dict(data, "layer.2.")


def test_to_moves_every_tensor_and_keeps_metadata() -> None:
    for q in all_containers():
        moved = q.to("meta")
        assert moved.device.type == "meta" and all(t.device.type == "meta" for t in moved.tensors().values())
        assert moved.metadata() == q.metadata() and q.device.type == "cpu"  # the original is untouched
        assert torch.equal(q.to("cpu").dequantize(), q.dequantize())


def test_nbytes_counts_packed_storage() -> None:
    out_f, in_f, g = 16, 256, 64
    w = torch.randn(out_f, in_f)
    groups = out_f * in_f // g
    assert BITMOD4.quantize(w, g).nbytes() == out_f * in_f // 2 + groups * 2 + groups  # codes, fp16 scale, selector
    assert INT4.quantize(w, g).nbytes() == out_f * in_f // 2 + groups * 2 + groups  # codes, fp16 scale, zero point
    assert INT8.quantize(w).nbytes() == out_f * in_f + out_f * 2
    assert quantize_scaled_fp8(w).nbytes() == out_f * in_f + out_f * 2
    assert isinstance(INT4.quantize(w, g), Int4Tensor) and isinstance(INT8.quantize(w), Int8Tensor)
    assert isinstance(quantize_scaled_fp8(w), ScaledFp8Tensor)
