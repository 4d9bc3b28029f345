"""Fused decode attention and the GPU KV append vs the torch reference, in the Triton interpreter."""

import pytest
import torch
import triton
from poison import poisoned_empty

from p3quant.attention_math import AttentionFormats, QuantizedKV, p3_attention_reference
from p3quant.formats import Int4Tensor
from p3quant.kernels import decode_attention
from p3quant.kernels.decode_attention import p3_decode_attention
from p3quant.kernels.kv_append import append_kv, key_smoothing_factor_gpu, quantize_int4_rows_into
from p3quant.nn.backends import get_backend
from p3quant.quantizers import key_smoothing_factor, quantize_keys, quantize_values

# The kernel performs the reference's operations on the same quantized operands (exact FP8 x INT4 and
# UE4M4 x INT4 products); only fp32 summation order differs, so outputs agree to ~1e-7 relative. A UE4M4
# code could flip where an fp32 probability sits on a rounding boundary (about 2**-20 per element).
TOL = 1e-5


def _cache(b, hkv, n, r, d, gen, smooth=True, capacity_pad=5, dtype=torch.bfloat16):
    """Quantized cache whose INT4 tensors are [:, :, :n] views of larger storage, as the P3 cache hands them."""
    k = torch.randn(b, hkv, n, d, generator=gen) * (0.5 + 4 * torch.rand(d, generator=gen))
    v = torch.randn(b, hkv, n, d, generator=gen) * (0.5 + torch.rand(b, hkv, n, 1, generator=gen))
    s = key_smoothing_factor(k) if smooth and n else None

    def stored(q: Int4Tensor) -> Int4Tensor:
        def grow(t):
            big = torch.zeros(b, hkv, n + capacity_pad, t.shape[-1], dtype=t.dtype)
            big[:, :, :n] = t
            return big[:, :, :n]
        return Int4Tensor(grow(q.packed), grow(q.scales), grow(q.zeros), q.shape, q.group_size)

    keys = stored(quantize_keys(k, s)) if n else None
    values = stored(quantize_values(v)) if n else None
    rk = torch.randn(b, hkv, r, d, generator=gen).to(dtype) * 2
    rv = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    return QuantizedKV(keys, values, s if n else None, rk, rv)


CASES = [  # B, H, H_kv, D, quantized tokens, residual, smoothing, softcap, splits, rounding
    (2, 8, 2, 64, 150, 3, True, None, 3, "nearest_even"),
    (1, 4, 4, 40, 77, 1, True, 30.0, None, "half_up"),
    (3, 6, 2, 32, 64, 0, False, None, 2, "nearest_even"),
    (2, 4, 1, 64, 0, 5, True, None, None, "nearest_even"),
    (1, 2, 1, 128, 300, 16, True, None, 4, "half_up"),
    (1, 2, 1, 16, 40, 2, True, None, None, "nearest_even"),  # fewer words per token than the padded half-plane
    (1, 16, 1, 32, 50, 1, True, None, 2, "half_up"),  # a GQA group that fills the 16-row dots (no repeated rows)
]


@pytest.mark.parametrize("b,h,hkv,d,n,r,smooth,softcap,splits,rounding", CASES)
def test_decode_attention_matches_reference(monkeypatch, b, h, hkv, d, n, r, smooth, softcap, splits, rounding):
    gen = torch.Generator().manual_seed(n + 31 * d + r)
    kv = _cache(b, hkv, n, r, d, gen, smooth)
    q = torch.randn(b, h, 1, d, generator=gen).to(torch.bfloat16) * 2
    mask = torch.rand(b, n + r, generator=gen) > 0.1
    mask[0, : (n + r) // 3] = False  # left padding of the first sequence
    if b > 2:
        mask[2] = False  # a fully masked row gives zeros, as the reference
    fmt = AttentionFormats(prob_rounding=rounding)
    ref = p3_attention_reference(q, kv, mask[:, None, None, :], 0.11, fmt, softcap)
    poisoned_empty(monkeypatch)
    out = p3_decode_attention(q, kv, mask, 0.11, softcap, rounding, num_splits=splits)
    assert out.shape == (b, h, 1, d) and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < TOL
    # the split sum rounded once to the 16-bit type, as out.to(torch.bfloat16) rounds the float32 result
    out16 = p3_decode_attention(q, kv, mask, 0.11, softcap, rounding, num_splits=splits, out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, out.to(torch.bfloat16))


def test_backend_routes_decode_and_prefill_with_hf_masks():
    gen = torch.Generator().manual_seed(5)
    kv = _cache(2, 2, 70, 2, 32, gen)
    backend = get_backend("triton")
    fmt = AttentionFormats()
    q = torch.randn(2, 4, 1, 32, generator=gen)
    additive = torch.zeros(2, 1, 1, 72)
    additive[1, ..., :9] = float("-inf")
    out = backend.attention(q, kv, additive, 0.2, fmt)
    ref = p3_attention_reference(q, kv, additive, 0.2, fmt)
    assert ((out - ref).norm() / ref.norm()).item() < TOL
    prefill_q = torch.randn(2, 4, 3, 32, generator=gen)
    causal = torch.ones(3, 72, dtype=torch.bool).tril(69)[None, None].expand(2, 1, 3, 72)
    assert torch.equal(backend.attention(prefill_q, kv, causal, 0.2, fmt), p3_attention_reference(prefill_q, kv, causal, 0.2, fmt))
    # a head_dim the kernels cannot read as 32-bit words of 8 codes goes to the reference
    kv36 = _cache(1, 2, 20, 1, 36, gen)
    q36 = torch.randn(1, 4, 1, 36, generator=gen)
    assert torch.equal(backend.attention(q36, kv36, None, 0.2, fmt), p3_attention_reference(q36, kv36, None, 0.2, fmt))
    with pytest.raises(ValueError, match="multiple of 8"):
        p3_decode_attention(q36, kv36, None, 0.2)


def test_decode_attention_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(2)
    kv = _cache(1, 2, 20, 1, 32, gen)
    q = torch.randn(1, 4, 1, 32)
    with pytest.raises(ValueError, match="mask"):
        p3_decode_attention(q, kv, torch.ones(1, 21, dtype=torch.float32), 1.0)
    with pytest.raises(ValueError, match="query"):
        p3_decode_attention(torch.randn(1, 4, 2, 32), kv, None, 1.0)
    with pytest.raises(ValueError, match="multiple of 2 kv heads"):
        p3_decode_attention(torch.randn(1, 3, 1, 32), kv, None, 1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        p3_decode_attention(q, kv, None, 1.0, out_dtype=torch.int8)


@pytest.mark.parametrize("b,h,t,d", [(2, 3, 21, 40), (1, 2, 37, 128)])
def test_kv_append_is_bit_exact(monkeypatch, b, h, t, d):
    gen = torch.Generator().manual_seed(t)
    k = (torch.randn(b, h, t, d, generator=gen) * (1 + 5 * torch.rand(d, generator=gen))).to(torch.bfloat16)
    v = torch.randn(b, h, t, d, generator=gen).to(torch.bfloat16)
    k[0, 0, :, 3] = 0  # an all-zero channel: smoothing factor 1, as the reference
    mask = torch.rand(b, t, generator=gen) > 0.2
    ref_s = key_smoothing_factor(k, mask)
    poisoned_empty(monkeypatch)
    s = key_smoothing_factor_gpu(k, mask)
    assert torch.equal(s, ref_s)
    cap, start = t + 9, 4
    stores = [torch.full((b, h, cap, d // 2), 255, dtype=torch.uint8), torch.full((b, h, cap, 1), float("nan"), dtype=torch.float16),
              torch.full((b, h, cap, 1), 255, dtype=torch.uint8)]
    vstores = [x.clone() for x in stores]
    sl = slice(start, start + t)
    append_kv(k, v, s, *(x[:, :, sl] for x in stores), *(x[:, :, sl] for x in vstores))
    for got, ref in ((stores, quantize_keys(k, ref_s)), (vstores, quantize_values(v))):
        assert torch.equal(got[0][:, :, sl], ref.packed)
        assert torch.equal(got[1][:, :, sl], ref.scales)
        assert torch.equal(got[2][:, :, sl], ref.zeros)
        assert (got[0][:, :, :start] == 255).all() and (got[0][:, :, start + t :] == 255).all()


def test_kv_append_rejects_bad_storage():
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="scales"):
        quantize_int4_rows_into(x, torch.empty(1, 2, 3, 4, dtype=torch.uint8), torch.empty(1, 2, 3, 1), torch.empty(1, 2, 3, 1, dtype=torch.uint8))


def test_split_heuristic_covers_every_token():
    """Split sizes from the launcher's heuristic tile the quantized tokens exactly (no token twice or never)."""
    gen = torch.Generator().manual_seed(9)
    kv = _cache(1, 1, 333, 0, 32, gen)
    q = torch.randn(1, 2, 1, 32, generator=gen)
    ref = p3_attention_reference(q, kv, None, 0.3, AttentionFormats())
    for splits in (None, 1, 2, 5, 100):
        out = decode_attention.p3_decode_attention(q, kv, None, 0.3, num_splits=splits, block_t=32)
        assert ((out - ref).norm() / ref.norm()).item() < TOL


def test_launch_splits_rule():
    """The GPU launch rule: ~PROGRAMS_PER_SM programs per SM, long splits in LONG_BLOCK_T blocks, every token in
    exactly one split of whole blocks."""
    per_sm, long_t = decode_attention.PROGRAMS_PER_SM, decode_attention.LONG_BLOCK_T
    block, chunk, splits = decode_attention.launch_splits(4096, 8, 132)  # batch 1, 8 kv heads, 4K: short splits
    assert block == decode_attention.BLOCK_T and splits == min(4096 // block, per_sm * 132 // 8) and chunk == block
    block, chunk, splits = decode_attention.launch_splits(32768, 8, 132)  # 32K: ~1K tokens per split
    assert block == long_t and chunk % long_t == 0 and chunk * splits >= 32768 > chunk * (splits - 1)
    assert decode_attention.launch_splits(300, 8, 132, block_t=32, num_splits=4) == (32, 96, 4)
    assert decode_attention.launch_splits(0, 8, 132) == (decode_attention.BLOCK_T, decode_attention.BLOCK_T, 0)
    for tokens in (1, 127, 129, 5000, 100_000):
        for rows in (1, 8, 128, 4096):
            block, chunk, splits = decode_attention.launch_splits(tokens, rows, 132)
            assert chunk % block == 0 and chunk * splits >= tokens > chunk * (splits - 1)
            assert splits <= max(1, per_sm * 132 // rows)


@pytest.mark.parametrize("splits,d,dtype", [(37, 40, torch.float32), (16, 128, torch.bfloat16), (3, 64, torch.float16)])
def test_split_combine_sums_every_split(splits, d, dtype):
    """_combine_kernel: sums [rows, splits, D] over the splits (several loads of 16 splits when there are many)
    and rounds once to the output dtype."""
    part = torch.randn(6, splits, d)
    out = torch.full((6, d), float("nan"), dtype=dtype)
    decode_attention._combine_kernel[(6,)](part, out, splits, d, BLOCK_S=16, BLOCK_D=triton.next_power_of_2(d))
    want = part.double().sum(1)
    assert torch.allclose(out.double(), want, rtol=2.0**-7 if dtype != torch.float32 else 1e-6, atol=1e-5)
