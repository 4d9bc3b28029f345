"""KV-cache append on the GPU: INT4-asymmetric quantization + packing of new tokens straight into cache
storage, and the prefill key-smoothing factor.

Bit-exact with p3quant.quantizers.quantize_keys / quantize_values / key_smoothing_factor: the same fp32
operations in the same order (IEEE division via div_rn, round-half-even, fp16 scale clamped to its normal
range), so codes, scales and zero points are identical to the reference on the CPU and on CUDA (the reference
divides by a same-device tensor, formats.grouping.scale_from, so it too is an IEEE division on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, fp16_scale, next_power_of_2, on_input_device, pdl_begin, pdl_launch, require_device, rne


@triton.jit
def _int4_rows(
    x_ptr, div_ptr, p_ptr, s_ptr, z_ptr, pos_ptr, ring_ptr, T, H, R, t_block,
    s_xb, s_xh, s_xt, s_db, s_dh, s_pb, s_ph, s_pt, s_sb, s_sh, s_st, s_zb, s_zh, s_zt, s_rb, s_rh, s_rt,
    HALF_D: tl.constexpr, DH: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DIV: tl.constexpr, AT_DEVICE_POS: tl.constexpr,
):
    """Rows (b, h) = divmod(program_id(0), H), tokens t_block * BLOCK_T .. + BLOCK_T - 1. AT_DEVICE_POS: row t
    goes to storage slot pos + t (pos read from pos_ptr, so the launch does not depend on it and can be captured
    in a CUDA graph), and x itself also to the 16-bit ring slot (pos + t) % R."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DH)
    t_mask = offs_t < T
    d_mask = offs_d < HALF_D
    mask = t_mask[:, None] & d_mask[None, :]
    base = x_ptr + b * s_xb + h * s_xh + offs_t[:, None] * s_xt + 2 * offs_d[None, :]
    x_raw_even = tl.load(base, mask=mask, other=0.0)
    x_raw_odd = tl.load(base + 1, mask=mask, other=0.0)
    x_even = x_raw_even.to(tl.float32)
    x_odd = x_raw_odd.to(tl.float32)
    out_t = offs_t
    if AT_DEVICE_POS:
        out_t = tl.load(pos_ptr).to(tl.int32) + offs_t
        ring = ring_ptr + b * s_rb + h * s_rh + (out_t % R)[:, None] * s_rt + 2 * offs_d[None, :]
        tl.store(ring, x_raw_even, mask=mask)
        tl.store(ring + 1, x_raw_odd, mask=mask)
    if HAS_DIV:
        d_base = div_ptr + b * s_db + h * s_dh + 2 * offs_d
        x_even = tl.math.div_rn(x_even, tl.load(d_base, mask=d_mask, other=1.0)[None, :])
        x_odd = tl.math.div_rn(x_odd, tl.load(d_base + 1, mask=d_mask, other=1.0)[None, :])
    lo = tl.minimum(tl.minimum(tl.min(x_even, axis=1), tl.min(x_odd, axis=1)), 0.0)  # padded lanes hold 0
    hi = tl.maximum(tl.maximum(tl.max(x_even, axis=1), tl.max(x_odd, axis=1)), 0.0)
    scale = tl.math.div_rn(hi - lo, 15.0)
    sf = fp16_scale(scale)
    scale = sf.to(tl.float16)  # exact
    zero = tl.minimum(tl.maximum(rne(tl.math.div_rn(-lo, sf)), 0.0), 15.0)
    q_even = tl.minimum(tl.maximum(rne(tl.math.div_rn(x_even, sf[:, None])) + zero[:, None], 0.0), 15.0).to(tl.int32)
    q_odd = tl.minimum(tl.maximum(rne(tl.math.div_rn(x_odd, sf[:, None])) + zero[:, None], 0.0), 15.0).to(tl.int32)
    packed = (q_even | (q_odd << 4)).to(tl.uint8)
    tl.store(p_ptr + b * s_pb + h * s_ph + out_t[:, None] * s_pt + offs_d[None, :], packed, mask=mask)
    tl.store(s_ptr + b * s_sb + h * s_sh + out_t * s_st, scale, mask=t_mask)
    tl.store(z_ptr + b * s_zb + h * s_zh + out_t * s_zt, zero.to(tl.uint8), mask=t_mask)


@triton.jit
def _int4_rows_kernel(
    x_ptr, div_ptr, p_ptr, s_ptr, z_ptr, T, H,
    s_xb, s_xh, s_xt, s_db, s_dh, s_pb, s_ph, s_pt, s_sb, s_sh, s_st, s_zb, s_zh, s_zt,
    HALF_D: tl.constexpr, DH: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DIV: tl.constexpr,
):
    """Rows at their own token positions (prefill, dynamic cache): no ring, no device position."""
    _int4_rows(x_ptr, div_ptr, p_ptr, s_ptr, z_ptr, x_ptr, x_ptr, T, H, 1, tl.program_id(1),
               s_xb, s_xh, s_xt, s_db, s_dh, s_pb, s_ph, s_pt, s_sb, s_sh, s_st, s_zb, s_zh, s_zt, 0, 0, 0,
               HALF_D, DH, BLOCK_T, HAS_DIV, False)


@triton.jit
def _int4_kv_at_kernel(
    k_ptr, div_ptr, kp_ptr, ks_ptr, kz_ptr, rk_ptr, v_ptr, vp_ptr, vs_ptr, vz_ptr, rv_ptr, pos_ptr, H, R,
    s_kb, s_kh, s_db, s_dh, s_kpb, s_kph, s_kpt, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt, s_rkb, s_rkh, s_rkt,
    s_vb, s_vh, s_vpb, s_vph, s_vpt, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt, s_rvb, s_rvh, s_rvt,
    HALF_D: tl.constexpr, DH: tl.constexpr, HAS_DIV: tl.constexpr, PDL: tl.constexpr = False,
):
    """The decode token's key (axis 1 = 0, divided by the smoothing factor) and value (axis 1 = 1) rows."""
    pdl_begin(PDL)
    if tl.program_id(1) == 0:
        _int4_rows(k_ptr, div_ptr, kp_ptr, ks_ptr, kz_ptr, pos_ptr, rk_ptr, 1, H, R, 0,
                   s_kb, s_kh, 0, s_db, s_dh, s_kpb, s_kph, s_kpt, s_ksb, s_ksh, s_kst, s_kzb, s_kzh, s_kzt, s_rkb, s_rkh, s_rkt,
                   HALF_D, DH, 1, HAS_DIV, True)
    else:
        _int4_rows(v_ptr, div_ptr, vp_ptr, vs_ptr, vz_ptr, pos_ptr, rv_ptr, 1, H, R, 0,
                   s_vb, s_vh, 0, s_db, s_dh, s_vpb, s_vph, s_vpt, s_vsb, s_vsh, s_vst, s_vzb, s_vzh, s_vzt, s_rvb, s_rvh, s_rvt,
                   HALF_D, DH, 1, False, True)


@triton.jit
def _smoothing_kernel(
    k_ptr, m_ptr, o_ptr, T, H, s_kb, s_kh, s_kt, s_mb, s_ob, s_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    amax = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        if HAS_MASK:
            t_mask = t_mask & (tl.load(m_ptr + b * s_mb + offs_t, mask=offs_t < T, other=0) != 0)
        k = tl.load(k_ptr + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_d[None, :],
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(k), axis=0))
    amax = tl.where(amax > 0, amax, 1.0)
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_d, amax, mask=d_mask)


def _check_rows(what: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(f"{what}: input must be floating [B, H, T, D] with even D, got {tuple(x.shape)} {x.dtype}")
    b, h, t, d = x.shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (b, h, t, d // 2):
        raise ValueError(f"{what}: packed must be uint8 [{b}, {h}, {t}, {d // 2}], got {packed.dtype} {tuple(packed.shape)}")
    if scales.dtype != torch.float16 or tuple(scales.shape) != (b, h, t, 1):
        raise ValueError(f"{what}: scales must be float16 [{b}, {h}, {t}, 1], got {scales.dtype} {tuple(scales.shape)}")
    if zeros.dtype != torch.uint8 or tuple(zeros.shape) != (b, h, t, 1):
        raise ValueError(f"{what}: zeros must be uint8 [{b}, {h}, {t}, 1], got {zeros.dtype} {tuple(zeros.shape)}")
    if x.stride(-1) != 1 or packed.stride(-1) != 1:
        raise ValueError(f"{what}: input and packed storage must be contiguous along head_dim")


def _check_divisor(what: str, divisor: torch.Tensor | None, b: int, h: int, d: int) -> None:
    if divisor is not None and (divisor.shape != (b, h, 1, d) or divisor.dtype != torch.float32 or divisor.stride(-1) != 1):
        raise ValueError(f"{what}: divisor must be float32 [{b}, {h}, 1, {d}] contiguous along D, got {tuple(divisor.shape)} {divisor.dtype}")


@on_input_device
def quantize_int4_rows_into(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, divisor: torch.Tensor | None = None
) -> None:
    """Quantize x [B, H, T, D] (divided by `divisor` [B, H, 1, D] float32 first, if given) to INT4 asymmetric
    per (b, h, t) row, writing packed [B, H, T, D/2] uint8, scales [B, H, T, 1] float16, zeros [B, H, T, 1]
    uint8 in place. The outputs may be strided views into preallocated cache storage."""
    what = "quantize_int4_rows_into"
    _check_rows(what, x, packed, scales, zeros)
    b, h, t, d = x.shape
    _check_divisor(what, divisor, b, h, d)
    require_device(what, x, packed, scales, zeros, divisor)
    if x.numel() == 0:
        return
    div = divisor if divisor is not None else x
    block_t = 16
    _int4_rows_kernel[(b * h, cdiv(t, block_t))](
        x, div, packed, scales, zeros, t, h,
        x.stride(0), x.stride(1), x.stride(2), div.stride(0), div.stride(1),
        packed.stride(0), packed.stride(1), packed.stride(2), scales.stride(0), scales.stride(1), scales.stride(2),
        zeros.stride(0), zeros.stride(1), zeros.stride(2),
        HALF_D=d // 2, DH=next_power_of_2(d // 2), BLOCK_T=block_t, HAS_DIV=divisor is not None, num_warps=4,
    )


def _check_append_at(what: str, x: torch.Tensor, position: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, ring: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(f"{what}: input must be floating [B, H, T, D] with even D, got {tuple(x.shape)} {x.dtype}")
    b, h, t, d = x.shape
    if any(s.dim() != 4 for s in (packed, scales, zeros)) or not packed.shape[2] == scales.shape[2] == zeros.shape[2] >= t:
        raise ValueError(f"{what}: storage must hold the same number (>= {t}) of slots in packed, scales and zeros")
    _check_rows(what, x, packed[:, :, :t], scales[:, :, :t], zeros[:, :, :t])
    if ring.dim() != 4 or tuple(ring.shape[:2]) != (b, h) or ring.shape[3] != d or ring.shape[2] < 1 or ring.dtype != x.dtype or ring.stride(-1) != 1:
        raise ValueError(f"{what}: ring must be {x.dtype} [{b}, {h}, R >= 1, {d}] contiguous along D, got {ring.dtype} {tuple(ring.shape)}")
    if position.shape != (1,) or position.dtype != torch.int64:
        raise ValueError(f"{what}: position must be a [1] int64 tensor, got {position.dtype} {tuple(position.shape)}")


@on_input_device
def append_kv_at(
    keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, key_storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    value_storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ring_keys: torch.Tensor, ring_values: torch.Tensor,
    divisor: torch.Tensor | None = None,
) -> None:
    """The static cache's decode append in one launch: one token's keys (divided by `divisor` [B, H, 1, D] float32)
    and values [B, H, 1, D] quantized as quantize_int4_rows_into into storage slot `position` (a [1] int64 device
    tensor, read by the kernel) of key_storage / value_storage = (packed [B, H, capacity, D/2], scales and zeros
    [B, H, capacity, 1]), and the 16-bit tokens themselves into the rings [B, H, R, D] at slot position % R.
    Nothing depends on the position on the host, so the call can be captured in a CUDA graph. The caller keeps
    the position within the storage."""
    what = "append_kv_at"
    if keys.shape != values.shape or keys.dim() != 4 or keys.shape[2] != 1:
        raise ValueError(f"{what}: keys and values must both be [B, H, 1, D], got {tuple(keys.shape)} and {tuple(values.shape)}")
    _check_append_at(what, keys, position, *key_storage, ring_keys)
    _check_append_at(what, values, position, *value_storage, ring_values)
    if ring_keys.shape != ring_values.shape:
        raise ValueError(f"{what}: the key and value rings must have one shape, got {tuple(ring_keys.shape)} and {tuple(ring_values.shape)}")
    b, h, _, d = keys.shape
    _check_divisor(what, divisor, b, h, d)
    require_device(what, keys, values, position, ring_keys, ring_values, divisor, *key_storage, *value_storage)
    if keys.numel() == 0:
        return
    (kp, ks, kz), (vp, vs, vz) = key_storage, value_storage
    div = divisor if divisor is not None else keys
    _int4_kv_at_kernel[(b * h, 2)](
        keys, div, kp, ks, kz, ring_keys, values, vp, vs, vz, ring_values, position, h, ring_keys.shape[2],
        keys.stride(0), keys.stride(1), div.stride(0), div.stride(1), kp.stride(0), kp.stride(1), kp.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), kz.stride(0), kz.stride(1), kz.stride(2),
        ring_keys.stride(0), ring_keys.stride(1), ring_keys.stride(2),
        values.stride(0), values.stride(1), vp.stride(0), vp.stride(1), vp.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), vz.stride(0), vz.stride(1), vz.stride(2),
        ring_values.stride(0), ring_values.stride(1), ring_values.stride(2),
        HALF_D=d // 2, DH=next_power_of_2(d // 2), HAS_DIV=divisor is not None, num_warps=1, **pdl_launch(keys),
    )


@on_input_device
def key_smoothing_factor_gpu(prompt_keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """s [B, H_kv, 1, D] float32 = max over the prompt's real tokens of |K| (mask [B, T] bool), 1 where 0.

    Same result as quantizers.key_smoothing_factor (which also rejects non-finite keys; this kernel does not
    check, to avoid a host sync)."""
    what = "key_smoothing_factor_gpu"
    if prompt_keys.dim() != 4 or not prompt_keys.is_floating_point():
        raise ValueError(f"{what}: keys must be floating [B, H, T, D], got {tuple(prompt_keys.shape)} {prompt_keys.dtype}")
    b, h, t, d = prompt_keys.shape
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, t)):
        raise ValueError(f"{what}: mask must be bool [{b}, {t}], got {mask.dtype} {tuple(mask.shape)}")
    require_device(what, prompt_keys, mask)
    out = torch.empty((b, h, 1, d), dtype=torch.float32, device=prompt_keys.device)
    m = mask.contiguous().view(torch.uint8) if mask is not None else out
    block_d = min(next_power_of_2(d), 128)
    _smoothing_kernel[(b * h, cdiv(d, block_d))](
        prompt_keys, m, out, t, h, prompt_keys.stride(0), prompt_keys.stride(1), prompt_keys.stride(2),
        m.stride(0), out.stride(0), out.stride(1), D=d, BLOCK_D=block_d, BLOCK_T=64, HAS_MASK=mask is not None,
        num_warps=4,
    )
    return out


@on_input_device
def append_kv(
    keys: torch.Tensor, values: torch.Tensor, smoothing: torch.Tensor | None,
    key_packed: torch.Tensor, key_scales: torch.Tensor, key_zeros: torch.Tensor,
    value_packed: torch.Tensor, value_scales: torch.Tensor, value_zeros: torch.Tensor,
) -> None:
    """Quantize new tokens keys/values [B, H_kv, T, D] into the cache storage slices for those T tokens
    (packed [B, H_kv, T, D/2] uint8, scales [B, H_kv, T, 1] fp16, zeros [B, H_kv, T, 1] uint8, views allowed):
    keys as quantize_keys(keys, smoothing) (smoothing None: unsmoothed), values as quantize_values(values)."""
    quantize_int4_rows_into(keys, key_packed, key_scales, key_zeros, smoothing)
    quantize_int4_rows_into(values, value_packed, value_scales, value_zeros)
