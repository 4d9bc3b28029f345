"""Shared checks for the fused kernels that hand FP8 codes to the next W4A8 layer (act_quant.remember_quantized)."""

import torch

from p3quant.kernels import act_quant


def ulps_16bit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two 16-bit tensors of one dtype (same signs assumed)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def assert_fused_output(got: torch.Tensor, want: torch.Tensor, layout: str | None, max_ulps: int) -> None:
    """A fused kernel's 16-bit output against PyTorch's unfused ops: same shape and dtype, at most max_ulps apart
    and on few elements (< 5%), and its FP8 hand-off in `layout` exact."""
    assert got.shape == want.shape and got.dtype == want.dtype
    ulps = ulps_16bit(got, want)
    assert ulps.max() <= max_ulps and (ulps > 0).float().mean() < 0.05
    assert_handoff(got, layout)


def assert_handoff(out: torch.Tensor, layout: str | None) -> None:
    """A fused kernel's output `out` [..., K] left exactly act_quant's codes and scales of it in `layout` for the
    next linear layer (and nothing without a layout)."""
    if layout is None:
        assert act_quant._last is None
        return
    k = out.shape[-1]
    x2 = out.view(-1, k)
    assert act_quant._last is not None and act_quant._last[0] is out
    remembered = act_quant._last[2]
    codes, scales = act_quant.quantize_activation_once(out, x2, layout)
    assert codes is remembered[0] and scales is remembered[1], "the next linear layer quantized again (reuse missed)"
    fresh_codes, fresh_scales = torch.empty_like(codes), torch.empty_like(scales)
    act_quant._QUANTIZERS[layout][0](x2, fresh_codes, fresh_scales)
    if codes.dtype == torch.float8_e4m3fn:  # compared as bytes (-0 / +0 would differ)
        codes, fresh_codes = codes.view(torch.uint8), fresh_codes.view(torch.uint8)
    assert torch.equal(codes, fresh_codes) and torch.equal(scales, fresh_scales)
