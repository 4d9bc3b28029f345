"""Bit-accurate P3-LLM PE: 4-way dot products of an 8-bit minifloat with a 4-bit integer operand.

Operands (P3LLM.md 4.2). The 8-bit input is FP8-E4M3 (activation, query) or unsigned E4M4 (attention
probability). It is split into a signed significand and an exponent:

    value = sig * 2^(shift + lsb_exp),   sig = +-(hidden bit, mantissa)   (0 for a zero or subnormal 0)
    shift = max(E, 1) - 1 in [0, 14],    lsb_exp = (1 - bias) - man_bits  (-9 for E4M3, -18 for E4M4)

so |sig| <= 15 (E4M3) or 31 (E4M4) fits a 6-bit signed multiplier operand. The 4-bit operand arrives as
an integer w in [-16, 16] (BitMoD grid x 2, or INT4 code - zero point in [-15, 15]), also 6-bit signed.

Alignment. The accumulator is a two's-complement fixed-point register of `acc_bits` bits whose LSB
weighs 2^-frac_bits (in units of the 4-bit operand's integer view). Each product sig * w (exact,
<= 11 bits) is shifted by d = shift + lsb_exp + frac_bits: left when d >= 0 (exact), right when d < 0,
dropping bits by `truncation`: "floor" (arithmetic shift, toward -inf) or "zero" (toward zero, on the
magnitude). The four aligned products of one PE step are summed exactly (the adder tree is wide
enough) and added to the accumulator. frac_bits = -lsb_exp (9 for E4M3, 18 for E4M4, the defaults)
never drops a bit: the PE is then exact and only overflow can go wrong.

Overflow. After every step the accumulator must lie in [-2^(acc_bits-1), 2^(acc_bits-1) - 1].
`on_overflow="raise"` raises AccumulatorOverflow; "saturate" clamps at each step (a saturating
register) and counts the saturated accumulators in OverflowReport. Values never wrap silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from p3quant.formats import FP8_E4M3, UE4M4, MiniFloat

TRUNCATIONS = ("floor", "zero")
OVERFLOW_POLICIES = ("raise", "saturate")
INPUT_FORMATS: dict[str, MiniFloat] = {"fp8_e4m3": FP8_E4M3, "ue4m4": UE4M4}
WEIGHT_MIN, WEIGHT_MAX = -16, 16  # the 4-bit operand's integer view (6-bit signed multiplier input)
DOT_WIDTH = 4  # products per PE step
MULTIPLIER_BITS = 6


class AccumulatorOverflow(ArithmeticError):
    """A PE accumulator left its `acc_bits` range (raised under on_overflow="raise")."""

    def __init__(self, count: int, acc_bits: int) -> None:
        super().__init__(f"{count} PE accumulator(s) overflowed {acc_bits} bits; widen acc_bits, lower frac_bits, "
                         f"or use on_overflow='saturate'")
        self.count = count


@dataclass(frozen=True)
class PeConfig:
    """Arithmetic parameters of the P3 PE (the paper states only a 32-bit accumulator)."""

    acc_bits: int = 32
    frac_bits: int | None = None  # None: the input format's exact LSB (-lsb_exp)
    truncation: str = "floor"
    on_overflow: str = "raise"

    def __post_init__(self) -> None:
        if not 8 <= self.acc_bits <= 62:
            raise ValueError(f"acc_bits must be in [8, 62] (int64 emulation), got {self.acc_bits}")
        if self.frac_bits is not None and not 0 <= self.frac_bits <= 40:
            raise ValueError(f"frac_bits must be in [0, 40], got {self.frac_bits}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {self.truncation!r}; use one of {TRUNCATIONS}")
        if self.on_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"unknown overflow policy {self.on_overflow!r}; use one of {OVERFLOW_POLICIES}")

    def frac_bits_for(self, fmt: MiniFloat) -> int:
        return -lsb_exponent(fmt) if self.frac_bits is None else self.frac_bits

    @property
    def acc_min(self) -> int:
        return -(1 << (self.acc_bits - 1))

    @property
    def acc_max(self) -> int:
        return (1 << (self.acc_bits - 1)) - 1


@dataclass
class OverflowReport:
    """Accumulators that left the register's range (saturated under on_overflow="saturate")."""

    saturated: int = 0
    accumulators: int = 0

    def merge(self, other: "OverflowReport") -> None:
        self.saturated += other.saturated
        self.accumulators += other.accumulators


def input_format(name: str) -> MiniFloat:
    if name not in INPUT_FORMATS:
        raise ValueError(f"the P3 PE takes {sorted(INPUT_FORMATS)} inputs, not {name!r}")
    return INPUT_FORMATS[name]


def lsb_exponent(fmt: MiniFloat) -> int:
    """Exponent of the significand LSB at the smallest binade (subnormals share it)."""
    return fmt.min_normal_exponent - fmt.man_bits


def decompose(codes: torch.Tensor, fmt: MiniFloat) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes -> (signed significand, shift) as int64, with value = sig * 2^(shift + lsb_exp)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"PE inputs are uint8 {fmt.name} codes, got {codes.dtype}")
    c = codes.long()
    mag_bits = fmt.exp_bits + fmt.man_bits
    magnitude = c & ((1 << mag_bits) - 1)
    if fmt.nan_code_is_all_ones and bool((magnitude == (1 << mag_bits) - 1).any()):
        raise ValueError(f"{fmt.name} NaN code reached the PE (inputs must be finite)")
    exp_field = magnitude >> fmt.man_bits
    man_field = magnitude & ((1 << fmt.man_bits) - 1)
    sig = torch.where(exp_field > 0, man_field | (1 << fmt.man_bits), man_field)
    if fmt.signed:
        sig = torch.where((c >> mag_bits) & 1 == 1, -sig, sig)
    return sig, torch.clamp(exp_field, min=1) - 1


def align(product: torch.Tensor, shift: torch.Tensor, truncation: str) -> torch.Tensor:
    """product * 2^shift as int64, dropping fraction bits by `truncation` where shift < 0."""
    left = product << shift.clamp(min=0)
    right_by = (-shift).clamp(min=0, max=62)
    if truncation == "floor":
        right = product >> right_by
    elif truncation == "zero":
        right = torch.sign(product) * (product.abs() >> right_by)
    else:
        raise ValueError(f"unknown truncation {truncation!r}; use one of {TRUNCATIONS}")
    return torch.where(shift >= 0, left, right)


def aligned_products(codes: torch.Tensor, weights: torch.Tensor, fmt: MiniFloat, cfg: PeConfig) -> torch.Tensor:
    """The multipliers' outputs aligned to the accumulator LSB (broadcasting codes against weights)."""
    if weights.dtype.is_floating_point or weights.dtype == torch.bool:
        raise TypeError(f"the 4-bit operand must be an integer tensor, got {weights.dtype}")
    w = weights.long()
    if w.numel() and (int(w.min()) < WEIGHT_MIN or int(w.max()) > WEIGHT_MAX):
        raise ValueError(f"4-bit operand integer view must lie in [{WEIGHT_MIN}, {WEIGHT_MAX}]")
    sig, shift = decompose(codes, fmt)
    return align(sig * w, shift + lsb_exponent(fmt) + cfg.frac_bits_for(fmt), cfg.truncation)


@lru_cache(maxsize=32)
def product_table(fmt_name: str, cfg: PeConfig) -> torch.Tensor:
    """[256, 33] int64: aligned product of every input code with every w in [-16, 16] (NaN rows 0).

    The functional GEMV gathers from this table, so it uses exactly the products defined above.
    """
    fmt = input_format(fmt_name)
    codes = torch.arange(256, dtype=torch.uint8)
    if fmt.nan_code_is_all_ones:
        mag_bits = fmt.exp_bits + fmt.man_bits
        codes = torch.where((codes.long() & ((1 << mag_bits) - 1)) == (1 << mag_bits) - 1, torch.zeros_like(codes), codes)
    w = torch.arange(WEIGHT_MIN, WEIGHT_MAX + 1)
    return aligned_products(codes[:, None], w[None, :], fmt, cfg)


def accumulate(products: torch.Tensor, cfg: PeConfig, bound: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, OverflowReport]:
    """Run PE accumulators over products [..., L] (L a multiple of 4, one 4-way step per 4 products).

    Returns the final accumulators [...] (int64) and the overflow report. Every running sum is at
    most sum |p| in magnitude, so accumulators whose `bound` (default: sum |p|; callers may pass any
    broadcastable upper bound of it) fits the register cannot overflow; only the others are replayed
    step by step.
    """
    if products.shape[-1] % DOT_WIDTH:
        raise ValueError(f"reduction length {products.shape[-1]} is not a multiple of {DOT_WIDTH}; pad with zero products")
    acc = products.sum(-1)
    report = OverflowReport(accumulators=acc.numel())
    if bound is None:
        bound = products.abs().sum(-1)
    suspect = (bound > cfg.acc_max).expand_as(acc)
    if not bool(suspect.any()):
        return acc, report
    steps = products[suspect].reshape(-1, products.shape[-1] // DOT_WIDTH, DOT_WIDTH).sum(-1)
    running = steps.cumsum(-1)
    overflowed = ((running > cfg.acc_max) | (running < cfg.acc_min)).any(-1)
    count = int(overflowed.sum())
    if count == 0:
        return acc, report
    if cfg.on_overflow == "raise":
        raise AccumulatorOverflow(count, cfg.acc_bits)
    flat_acc = acc[suspect]
    flat_acc[overflowed] = _saturating_sum(steps[overflowed], cfg)
    acc = acc.clone()
    acc[suspect] = flat_acc
    report.saturated = count
    return acc, report


def _saturating_sum(steps: torch.Tensor, cfg: PeConfig) -> torch.Tensor:
    """Sequential clamped accumulation (loop over PE steps, vectorized over accumulators)."""
    acc = torch.zeros(steps.shape[0], dtype=torch.int64)
    for j in range(steps.shape[1]):
        acc = torch.clamp(acc + steps[:, j], cfg.acc_min, cfg.acc_max)
    return acc


@dataclass(frozen=True)
class P3Pcu:
    """One P3-LLM PCU step: 16 PEs x 4-way dot products; with TEP one weight slice serves 2 inputs.

    A step consumes one 256-bit weight slice (16 outputs x 4 reduction elements of 4 bits) and
    `inputs_per_fetch` input vectors of 4 codes each (two batch rows or two GQA query heads).
    """

    pe_count: int = 16
    tep: bool = True

    @property
    def inputs_per_fetch(self) -> int:
        return 2 if self.tep else 1

    def step(self, acc: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, input_fmt: str,
             cfg: PeConfig = PeConfig()) -> torch.Tensor:
        """acc [n_in, 16] int64 += inputs [n_in, 4] (uint8 codes) . weights [16, 4] (ints), n_in <= inputs_per_fetch."""
        if inputs.dim() != 2 or inputs.shape[1] != DOT_WIDTH or not 1 <= inputs.shape[0] <= self.inputs_per_fetch:
            raise ValueError(f"inputs must be [n, {DOT_WIDTH}] with n <= {self.inputs_per_fetch}, got {tuple(inputs.shape)}")
        if tuple(weights.shape) != (self.pe_count, DOT_WIDTH):
            raise ValueError(f"a weight slice is [{self.pe_count}, {DOT_WIDTH}], got {tuple(weights.shape)}")
        if tuple(acc.shape) != (inputs.shape[0], self.pe_count) or acc.dtype != torch.int64:
            raise ValueError(f"acc must be int64 [{inputs.shape[0]}, {self.pe_count}], got {acc.dtype} {tuple(acc.shape)}")
        prods = aligned_products(inputs[:, None, :], weights[None, :, :], input_format(input_fmt), cfg)
        new = acc + prods.sum(-1)
        out_of_range = (new > cfg.acc_max) | (new < cfg.acc_min)
        if bool(out_of_range.any()):
            if cfg.on_overflow == "raise":
                raise AccumulatorOverflow(int(out_of_range.sum()), cfg.acc_bits)
            new = new.clamp(cfg.acc_min, cfg.acc_max)
        return new
