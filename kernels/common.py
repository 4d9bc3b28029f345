"""Shared Triton helpers: exact minifloat rounding in fp32, BitMoD/INT4 decode, device checks.

Rounding is done arithmetically (exponent bits + magic-number round-to-nearest-even), because it must equal
p3quant.formats.MiniFloat.round_to_grid bit for bit on every backend, including the Triton CPU interpreter
(whose fp32->fp8 cast mis-rounds carries and whose fp32->bf16 cast truncates). Compiled kernels use the GPU's own
conversions where they exist: fp32 -> bf16 outputs by the cast (NATIVE_BF16_CAST), and FP8-E4M3 codes on sm_89+
NVIDIA GPUs (native_e4m3) by cvt.rn.satfinite.e4m3x2.f32, a handful of instructions per pair of values against a
dozen per value. On an H200 both give the arithmetic rounding's value on every non-NaN fp32 input
(benchmarks/gpu_check.py's check_native_rounding compares all 2**32); the one difference is overflow: a bf16 cast
gives +-inf, as PyTorch's does, where the arithmetic rounding saturates.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, TypeVar

import torch
import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be tl.constexpr.
FP16_TINY = tl.constexpr(float(torch.finfo(torch.float16).tiny))
FP16_MAX = tl.constexpr(float(torch.finfo(torch.float16).max))
FP8_MAX = tl.constexpr(448.0)
BF16_MAX = tl.constexpr(float(torch.finfo(torch.bfloat16).max))
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds |x| < 2**22 to the nearest integer, ties to even


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: triton.cdiv's value as a plain function (Triton 3.9 made triton.cdiv a
    ConstexprFunction, ~2 us per host call; an eager decode step makes dozens of these calls)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), triton.next_power_of_2's value as a plain function (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (tests), where CPU tensors are allowed."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


NATIVE_BF16_CAST = tl.constexpr(not interpreting())  # see the module docstring

_F = TypeVar("_F", bound=Callable)


def on_input_device(fn: _F) -> _F:
    """Run a kernel wrapper with its first tensor argument's GPU as the current device.

    Triton launches on the current CUDA device, so a tensor on cuda:1 (a model split by accelerate's
    device_map) would otherwise be read by a kernel running on cuda:0.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_device(what: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless every given tensor is on CUDA (or on the CPU under the interpreter), all on one device."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{what}: tensors on different devices {sorted(map(str, devices))}")
    if not interpreting() and any(not t.is_cuda for t in present):
        raise ValueError(f"{what}: the Triton kernel needs CUDA tensors (got {present[0].device}); use backend='torch' on CPU")


def require_dtype(what: str, name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{what}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the previous kernel
# in the stream still runs. The decode-step kernels start their successors at once (pdl_launch_dependents),
# issue only what no earlier kernel writes (the weights), then wait (pdl_wait) for the previous kernel to finish
# and its writes to become visible before they read or write anything else. Every kernel launched this way waits
# in all its programs, so the previous kernel's completion implies that of all before it.
# Off by default: on an H200 it gave the same tokens but no end-to-end gain (benchmarks/RESULTS.md, ninth session).
# P3QUANT_PDL=1 switches it on for a process, pdl_mode() for a block of code.
USE_PDL = os.environ.get("P3QUANT_PDL", "0") == "1"


@contextlib.contextmanager
def pdl_mode(on: bool) -> Iterator[None]:
    """Launch the kernels inside the block with (on=True) or without programmatic dependent launch."""
    global USE_PDL
    saved, USE_PDL = USE_PDL, on
    try:
        yield
    finally:
        USE_PDL = saved


@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    """The CUDA device's compute capability, cached (torch asks the driver on every call)."""
    return torch.cuda.get_device_capability(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """The CUDA device's number of SMs (cached)."""
    return _sm_count(_index(device))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on the CUDA device (the opt-in maximum per block; cached)."""
    return _shared_memory_bytes(_index(device))


@functools.cache
def _shared_memory_bytes(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


@functools.cache
def _triton_launches_pdl() -> bool:
    """Whether this Triton's CUDA launcher takes launch_pdl (Triton >= 3.3; the package allows 3.1)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def nvidia_compiled(device: torch.device) -> bool:
    """Whether kernels on `device` are compiled for an NVIDIA GPU (not ROCm, not the interpreter): where inline PTX,
    programmatic dependent launch and NVIDIA-only library paths may be used."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def pdl_supported(t: torch.Tensor) -> bool:
    """Whether kernels reading `t` could launch with programmatic dependent launch: an NVIDIA GPU of compute
    capability >= 9.0 and a Triton that can launch that way."""
    return nvidia_compiled(t.device) and device_capability(t.device.index) >= (9, 0) and _triton_launches_pdl()


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels reading `t` launch with programmatic dependent launch: PDL switched on and supported."""
    return USE_PDL and pdl_supported(t)


def pdl_launch(t: torch.Tensor) -> dict[str, bool]:
    """Launch keywords of a kernel with a PDL constexpr (see pdl_wait): the constexpr, and Triton's launch_pdl
    option where it is on (older Tritons do not know the option)."""
    if pdl_enabled(t):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream be scheduled now (it waits in pdl_wait before touching our outputs)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has finished and its writes are visible (no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """A kernel with nothing to issue before its predecessor finishes: let the successor launch, then wait."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)


def fp8_dot_supported(device: torch.device) -> bool:
    """FP8-E4M3 tensors in Triton kernels and FP8 x FP8 tensor-core dots: NVIDIA GPUs of compute capability >= 8.9
    (Ada, Hopper; not ROCm, whose FP8 formats differ); the interpreter emulates them."""
    return interpreting() or device.type != "cuda" or native_e4m3(device)


@triton.jit
def rne(x):
    """Round fp32 |x| < 2**22 to the nearest integer, ties to even (torch.round)."""
    return (x + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def round_minifloat(x, MAN_BITS: tl.constexpr, MIN_EXP: tl.constexpr, MAX_VALUE: tl.constexpr, HALF_UP: tl.constexpr):
    """Value of fp32 `x` rounded to a minifloat grid (MiniFloat.round_to_grid), saturating at +-MAX_VALUE.

    The quantum of x's binade is 2**(max(floor(log2|x|), MIN_EXP) - MAN_BITS); scaling by it is exact. A grid whose
    smallest quantum lies below fp32's normal range (bf16: 2**-133) rounds |x| < 1 on |x| * 2**64 and scales the
    result back, both exact. The sign is x's sign bit, set by a bitwise or, so -0.0 and negative values that round
    to zero keep it as in a cast (a negation lost it in compiled kernels: gpu_check.check_native_rounding).
    """
    SHIFT: tl.constexpr = MIN_EXP - MAN_BITS < -126
    mag = tl.abs(x)
    lowest = MIN_EXP
    if SHIFT:  # |x| < 1 is rounded as |x| * 2**64 (no overflow), its grid's exponents raised by 64
        small = mag < 1.0
        mag = mag * tl.where(small, 18446744073709551616.0, 1.0)
        lowest = tl.where(small, MIN_EXP + 64, MIN_EXP)
    exp = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, lowest)
    quantum = ((exp - MAN_BITS + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - exp + MAN_BITS) << 23).to(tl.float32, bitcast=True)
    steps = mag * inv_quantum
    if HALF_UP:
        steps = (steps + 0.5).to(tl.int32).to(tl.float32)
    else:
        steps = rne(steps)
    rounded = steps * quantum
    if SHIFT:
        rounded = rounded * tl.where(small, 5.421010862427522e-20, 1.0)  # 2**-64
    rounded = tl.minimum(rounded, MAX_VALUE)
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31  # x's sign bit, set on the (non-negative) result
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


# fp32 pairs to E4M3 (nearest even, saturating at +-448) and back: cvt packs a into the upper byte, b the lower;
# the widening keeps each byte's half in place (the same order as the PTX manual gives for both).
_E4M3_PAIR = tl.constexpr("""{
.reg .b16 q, lo, hi;
.reg .b32 h;
cvt.rn.satfinite.e4m3x2.f32 q, $3, $2;
cvt.rn.f16x2.e4m3x2 h, q;
mov.b32 {lo, hi}, h;
cvt.f32.f16 $0, lo;
cvt.f32.f16 $1, hi;
}""")


@triton.jit
def round_e4m3_native(x):
    """fp32 x rounded to FP8-E4M3 by the GPU's conversion (nearest even, saturating at +-448), as fp32."""
    return tl.inline_asm_elementwise(_E4M3_PAIR, "=f,=f,f,f", [x], dtype=tl.float32, is_pure=True, pack=2)


def native_e4m3(device: torch.device) -> bool:
    """Whether kernels on `device` may round to E4M3 with the GPU's conversion (an NVIDIA GPU of compute
    capability 8.9 or newer; not the interpreter, not ROCm): the NATIVE argument of round_e4m3."""
    return nvidia_compiled(device) and device_capability(device.index) >= (8, 9)


@triton.jit
def round_e4m3(x, NATIVE: tl.constexpr):
    """fp32 x rounded to FP8-E4M3 (nearest even, saturating at +-448), as fp32: MiniFloat E4M3's grid. NATIVE
    (see native_e4m3) by the GPU's conversion, else arithmetically; the same value for every non-NaN x."""
    if NATIVE:
        return round_e4m3_native(x)
    else:
        return round_minifloat(x, 3, -6, FP8_MAX, False)


@triton.jit
def round_like_output(x, y_ptr):
    """fp32 x rounded (nearest even) to the 16-bit element type of y_ptr, kept as fp32 (arithmetic, not a cast)."""
    if y_ptr.dtype.element_ty == tl.bfloat16:
        return round_minifloat(x, 7, -126, BF16_MAX, False)
    else:
        return round_minifloat(x, 10, -14, FP16_MAX, False)


@triton.jit
def round_to_output(x, y_ptr):
    """fp32 -> the 16-bit element type of y_ptr, round to nearest even. Under the interpreter bf16 is rounded
    arithmetically first: its fp32 -> bf16 cast truncates (the GPU's rounds; both then agree, but for overflow,
    which the cast turns into +-inf as PyTorch does and the arithmetic rounding saturates)."""
    if y_ptr.dtype.element_ty == tl.bfloat16 and not NATIVE_BF16_CAST:
        x = round_like_output(x, y_ptr)
    return x.to(y_ptr.dtype.element_ty)


@triton.jit
def fp16_scale(x):
    """fp32 scale -> the float16 value formats.grouping.store_scale stores (clamp, then round to nearest even),
    as fp32. Rounded arithmetically: the compiled fp32->fp16 cast was seen to break ties differently on an H200."""
    x = tl.minimum(tl.maximum(x, FP16_TINY), FP16_MAX)
    return round_minifloat(x, 10, -14, FP16_MAX, False)


@triton.jit
def fp8_token_scale(amax):
    """The per-token (or per-head) FP8 scale of a row whose max |x| is amax: fp16(amax / 448), as quantize_scaled_fp8."""
    return fp16_scale(tl.math.div_rn(amax, FP8_MAX))


@triton.jit
def clamped_rows(pid, BLOCK: tl.constexpr, N):
    """A program's block of output rows: offsets, their mask, and the rows clamped into range (so weight loads
    need no mask; the results of clamped rows are never stored)."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    return offs, mask, tl.where(mask, offs, 0)


@triton.jit
def bitmod_special2(selectors):
    """Special value x2 of each group from its selector (0:-5, 1:+5, 2:-8, 3:+8), as int32."""
    sel = selectors.to(tl.int32)
    return (10 + 6 * (sel >> 1)) * ((sel & 1) * 2 - 1)


@triton.jit
def decode_w4(codes, aux, IS_BITMOD: tl.constexpr):
    """Integer weights of 4-bit codes (int32 in [0, 15]).

    BitMoD: grid x 2 in [-16, 16] (aux = the group's special value x2, see bitmod_special2); the caller
    multiplies by scale / 2. INT4 asymmetric: code - zero point (aux = zp), times scale.
    """
    if IS_BITMOD:
        # nibble i of 0xC8643210 (as int32) = E2M1 magnitude x2 of magnitude index i
        mag = (-932957680 >> ((codes & 7) * 4)) & 15
        val = tl.where(codes >= 8, -mag, mag)
        return tl.where(codes == 8, aux, val)
    else:
        return codes - aux


def decode_half_ptx(word: str, negated: str, outs: tuple[str, str], tables: tuple[str, ...], m64: str, bias: str,
                    one: str | None = None) -> str:
    """PTX: codes 0..3 of `word` (its low 16 bits) into the 16-bit pairs outs[0] = (c0, c1), outs[1] = (c2, c3):
    fp16 by sub.f16x2 of `bias`, or (with `one`, the bf16 pair (1, 1)) bf16 by fma.bf16x2 with `bias` = -offset."""
    tp0, tp1, tn0, tn1 = tables
    finish = "\n".join(f"sub.rn.f16x2 {out}, {out}, {bias};" if one is None else f"fma.rn.bf16x2 {out}, {out}, {one}, {bias};"
                       for out in outs)
    return f"""prmt.b32 P, {tp0}, {tp1}, {word};
prmt.b32 N, {tn0}, {tn1}, {negated};
or.b32 R, P, N;
prmt.b32 {outs[0]}, R, {m64}, 0x5140;
prmt.b32 {outs[1]}, R, {m64}, 0x7362;
{finish}
"""


def decode_word_ptx(outs: tuple[str, ...], word: str, tables: tuple[str, ...], m64: str, bias: str,
                    scale: str | None = None, one: str | None = None) -> str:
    """Inline PTX decoding one 32-bit word of 8 codes (code i = nibble i) into four fp16 pairs in code order.

    prmt looks each code up in byte tables of (value + 16) in [0, 32] (decode_tables: codes 0..7 in tp0/tp1, codes
    8..15 in tn0/tn1). The code's sign bit (nibble bit 3) is prmt's sign-replicate flag: a negative code gives the
    byte 0x00 in the positive lookup P (every table byte is < 0x80), and a positive code, flagged in the lookup of
    code ^ 8, gives 0x00 in N, so P | N holds each code's byte. Each byte goes under 0x64 (m64 = 0x64646464: fp16
    1024 + byte) and subtracts bias = fp16x2 (1040, 1040): exact for integers of magnitude
    <= 16. With `scale` (an fp32 register), each pair is widened, multiplied by it in fp32 and rounded to fp16
    once (the dequantized weight, as formats' dequantize() then .half()). Four `outs` receive the pairs (32-bit);
    eight receive the codes one by one (16-bit registers). bf16 instead of fp16: m64 = 0x43434343 (bf16 128 +
    byte), `one` = bf16x2 (1, 1) and bias = bf16x2 (-144, -144), applied by fma.bf16x2 (exact, as above).
    """
    if len(outs) not in (4, 8) or (scale is not None and (len(outs) != 4 or one is not None)):
        raise ValueError("decode_word_ptx: 4 fp16 pair outputs (optionally scaled) or 8 unscaled 16-bit outputs")
    body = """{
.reg .b32 wn, wh, wnh, P, N, R;
.reg .b16 l, h;
.reg .f32 f0, f1;
xor.b32 wn, WORD, 0x88888888;
shr.u32 wh, WORD, 16;
shr.u32 wnh, wn, 16;
""".replace("WORD", word)
    pairs = outs if len(outs) == 4 else ("q0", "q1", "q2", "q3")
    if len(outs) == 8:
        body += ".reg .b32 q0, q1, q2, q3;\n"
    body += decode_half_ptx(word, "wn", pairs[:2], tables, m64, bias, one)
    body += decode_half_ptx("wh", "wnh", pairs[2:], tables, m64, bias, one)
    if len(outs) == 8:
        for i, pair in enumerate(pairs):
            body += f"mov.b32 {{{outs[2 * i]}, {outs[2 * i + 1]}}}, {pair};\n"
    if scale is not None:
        for out in pairs:
            body += f"""mov.b32 {{l, h}}, {out};
cvt.f32.f16 f0, l;
cvt.f32.f16 f1, h;
mul.rn.f32 f0, f0, {scale};
mul.rn.f32 f1, f1, {scale};
cvt.rn.f16x2.f32 {out}, f1, f0;
"""
    return body + "}"


# decode_word16's PTX, operands (pack=1): $0..$7 codes 0..7 of the word as 16-bit values, $8 the word, $9..$12 the
# tables, $13 m64, $14 bias, bf16 also $15 one (constants as inputs, so that they are loop-invariant registers).
# One word per invocation: a pack over bytes would let the compiler group bytes of different rows (seen in the PTX).
_DECODE16 = tl.constexpr(decode_word_ptx(tuple(f"${i}" for i in range(8)), "$8", ("$9", "$10", "$11", "$12"), "$13", "$14"))
_DECODE16_BF16 = tl.constexpr(decode_word_ptx(tuple(f"${i}" for i in range(8)), "$8", ("$9", "$10", "$11", "$12"), "$13", "$14",
                                              one="$15"))


# INT4's fp16 decode (code - zero point) without tables: byte p of the word holds codes 2p and 2p + 1; prmt copies
# it into both halves, lop3 keeps the low nibble in the low half and the high nibble (x 16) in the high half under
# fp16 1024 (0x6400), and one fma.f16x2 by (1, 1/16) plus bias = (-(1024 + zp), -(64 + zp)) leaves each code minus
# the zero point, exactly (integers of magnitude <= 15). 3 instructions per pair against the tables' ~4.
# Operands (pack=1): $0..$7 codes 0..7 as fp16, $8 the word, $9 the row's bias pair (int4_pair_bias), $10 the
# multiplier pair, $11 the nibble mask, $12 the 1024 pair.
_DECODE_INT4 = tl.constexpr("{\n.reg .b32 d;\n" + "".join(
    f"prmt.b32 d, $8, $8, {0x1111 * p:#06x};\nlop3.b32 d, d, $11, $12, 0xEA;\nfma.rn.f16x2 d, d, $10, $9;\n"
    f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, d;\n" for p in range(4)) + "}")
INT4_PAIR_BIAS = tl.constexpr(0xD400E400 - (1 << 32))  # fp16 -64 (high half), -1024 (low half) as a signed int32


@triton.jit
def int4_pair_bias(zeros):
    """fp16x2 bits of (-(64 + zp), -(1024 + zp)) per zero point zp in [0, 15] (16 zp in the high half: its
    fp16 step at 64 is 1/16)."""
    return zeros.to(tl.int32) * 0x00100001 + INT4_PAIR_BIAS


@triton.jit
def decode_int4_word16(words, bias):
    """Codes 0..7 of each int32 word minus the row's zero point as exact fp16 (_DECODE_INT4's PTX; bias from
    int4_pair_bias, broadcast to the words' shape)."""
    operands = [words, bias, tl.full(words.shape, 0x2C003C00, tl.int32), tl.full(words.shape, 0x00F0000F, tl.int32),
                tl.full(words.shape, 0x64006400, tl.int32)]
    return tl.inline_asm_elementwise(_DECODE_INT4, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", operands,
                                     dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def decode_word16(words, tp0, tp1, tn0, tn1, BF16: tl.constexpr):
    """Codes 0..7 (nibble i) of each int32 word as exact fp16 (bf16) values, by decode_word_ptx's inline PTX; the
    tables (decode_tables, computed once per group) broadcast to the words' shape."""
    operands = [words, tp0, tp1, tn0, tn1]
    if BF16:
        # m64 0x43434343 (bf16 128 + byte), bias 0xC310C310 = bf16x2 (-144, -144), one = bf16x2 (1, 1)
        operands = operands + [tl.full(words.shape, 0x43434343, tl.int32), tl.full(words.shape, -1022311664, tl.int32),
                               tl.full(words.shape, 0x3F803F80, tl.int32)]
        return tl.inline_asm_elementwise(_DECODE16_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r", operands,
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        operands = operands + [tl.full(words.shape, 0x64646464, tl.int32), tl.full(words.shape, 0x64106410, tl.int32)]
        return tl.inline_asm_elementwise(_DECODE16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r", operands,
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _decode_codes(words, aux, IS_BITMOD: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """Codes 0..7 of int32 words [R, W] as 8 exact [R, W] tensors (see decode_halves)."""
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    if USE_ASM and not IS_BITMOD and not BF16:
        bias = tl.broadcast_to(int4_pair_bias(aux)[:, None], (R, W))
        c0, c1, c2, c3, c4, c5, c6, c7 = decode_int4_word16(words, bias)
    elif USE_ASM:
        tp0, tp1, tn0, tn1 = decode_tables(aux, IS_BITMOD)
        c0, c1, c2, c3, c4, c5, c6, c7 = decode_word16(
            words, tl.broadcast_to(tp0[:, None], (R, W)), tl.broadcast_to(tp1[:, None], (R, W)),
            tl.broadcast_to(tn0[:, None], (R, W)), tl.broadcast_to(tn1[:, None], (R, W)), BF16)
    else:
        a = aux.to(tl.int32)
        if IS_BITMOD:
            a = bitmod_special2(a)
        a = a[:, None]
        ty = tl.float32 if BF16 else tl.float16
        c0 = decode_w4(words & 15, a, IS_BITMOD).to(ty)
        c1 = decode_w4((words >> 4) & 15, a, IS_BITMOD).to(ty)
        c2 = decode_w4((words >> 8) & 15, a, IS_BITMOD).to(ty)
        c3 = decode_w4((words >> 12) & 15, a, IS_BITMOD).to(ty)
        c4 = decode_w4((words >> 16) & 15, a, IS_BITMOD).to(ty)
        c5 = decode_w4((words >> 20) & 15, a, IS_BITMOD).to(ty)
        c6 = decode_w4((words >> 24) & 15, a, IS_BITMOD).to(ty)
        c7 = decode_w4((words >> 28) & 15, a, IS_BITMOD).to(ty)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def decode_halves(words, aux, IS_BITMOD: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """Exact 16-bit values of int32 words [R, W] of 8 codes each (code i of word j = element 8j + i) with one
    selector / zero point per row (aux [R]), as half-planes lo [R, 4W] (elements 8j + i, i < 4, in that order) and
    hi (elements 8j + 4 + i): BitMoD grid x 2 or INT4 code - zero point. USE_ASM: inline PTX (decode_int4_word16
    for INT4 in fp16, else decode_word16's tables, bf16 with BF16); else decode_w4 in fp16 (fp32 with BF16: the
    interpreter has no usable bf16)."""
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    c0, c1, c2, c3, c4, c5, c6, c7 = _decode_codes(words, aux, IS_BITMOD, USE_ASM, BF16)
    # join(join(a, c), join(b, d)) lays out a, b, c, d along the new last axis
    lo = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [R, 4 * W])
    hi = tl.reshape(tl.join(tl.join(c4, c6), tl.join(c5, c7)), [R, 4 * W])
    return lo, hi


@triton.jit
def decode_quarters(words, aux, IS_BITMOD: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """decode_halves as four quarter-planes [R, 2W]: plane p holds elements 8j + 2p and 8j + 2p + 1 (each thread's
    consecutive pairs are what a 16-bit MMA takes from registers, with no shared-memory relayout on sm_90)."""
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    c0, c1, c2, c3, c4, c5, c6, c7 = _decode_codes(words, aux, IS_BITMOD, USE_ASM, BF16)
    return (tl.reshape(tl.join(c0, c1), [R, 2 * W]), tl.reshape(tl.join(c2, c3), [R, 2 * W]),
            tl.reshape(tl.join(c4, c5), [R, 2 * W]), tl.reshape(tl.join(c6, c7), [R, 2 * W]))


@triton.jit
def decode_tables(aux, IS_BITMOD: tl.constexpr):
    """Byte tables (value + 16) of codes 0..7 (tp0, tp1) and 8..15 (tn0, tn1) for decode_word_ptx, per group:
    BitMoD's grid x 2 with the group's special value in the slot of code 8 (aux = selector), INT4's code - zp
    (aux = zero point)."""
    if IS_BITMOD:
        tp0 = tl.full(aux.shape, 0x13121110, tl.int32)  # 0, 1, 2, 3
        tp1 = tl.full(aux.shape, 0x1C181614, tl.int32)  # 4, 6, 8, 12
        tn0 = 0x0D0E0F00 | (16 + bitmod_special2(aux))  # special, -1, -2, -3
        tn1 = tl.full(aux.shape, 0x04080A0C, tl.int32)  # -4, -6, -8, -12
    else:
        zp = aux.to(tl.int32) * 0x01010101  # every byte 16 + c - zp stays in [1, 31]: no borrow between bytes
        tp0 = 0x13121110 - zp
        tp1 = 0x17161514 - zp
        tn0 = 0x1B1A1918 - zp
        tn1 = 0x1F1E1D1C - zp
    return tp0, tp1, tn0, tn1


@triton.jit
def dot16(a, b, NATIVE_BF16: tl.constexpr):
    """tl.dot with fp32 accumulation; NATIVE_BF16=False (interpreter) runs bf16 operands as exact fp32,
    since the CPU interpreter mis-evaluates bf16 dots."""
    if NATIVE_BF16:
        return tl.dot(a, b)
    else:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            return tl.dot(a, b)
