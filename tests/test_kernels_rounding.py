"""common.round_minifloat, the arithmetic rounding the kernels use where a cast would not do, against torch's
fp32 -> bf16 / fp16 casts, bit for bit (signed zeros, subnormals and values far below 1 included)."""

import pytest
import torch
import triton
import triton.language as tl

from p3quant.kernels.common import BF16_MAX, FP16_MAX, round_minifloat


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if BF16:
        y = round_minifloat(x, 7, -126, BF16_MAX, False)
    else:
        y = round_minifloat(x, 10, -14, FP16_MAX, False)
    tl.store(y_ptr + offs, y, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_minifloat_equals_the_cast_bit_for_bit(dtype):
    finfo = torch.finfo(dtype)
    lowest = -149 if dtype == torch.bfloat16 else -27  # below the smallest subnormal, so some round to zero
    exps = torch.randint(lowest, int(torch.log2(torch.tensor(finfo.max)).item()), (1 << 16,))
    x = torch.randn(1 << 16).sign() * (1 + torch.rand(1 << 16)) * torch.pow(2.0, exps.float())
    x = x.clamp(-finfo.max, finfo.max)
    # exact ties: midpoints between a 16-bit value and its upper neighbour (exact in fp32)
    v = (torch.rand(512) * torch.pow(2.0, torch.randint(lowest + 3, 14, (512,)).float())).to(dtype) * torch.randn(512).sign().to(dtype)
    ties = ((v.double() + torch.nextafter(v, torch.tensor(float("inf"), dtype=dtype)).double()) / 2).float()
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, -finfo.tiny])])
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BF16=dtype == torch.bfloat16, BLOCK=4096)
    want = x.to(dtype).float()
    assert torch.equal(y.view(torch.int32), want.view(torch.int32))
