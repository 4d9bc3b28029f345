"""P3Linear: a drop-in nn.Linear whose weight is stored packed (4-bit codes + per-group scales + selectors)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import P3Config
from ..formats import BitMoDTensor, Int4Tensor
from ..quantizers import quantize_weight
from .backends import QuantizedWeight, get_backend


class P3Linear(nn.Module):
    """y = Q_act(x) @ dequant(W)^T + b, computed by the selected backend on the packed weight.

    The packed weight lives in buffers (so .to(), state_dict and safetensors see it): `weight_packed`
    (uint8 [out, in/2]), `weight_scales` (FP16 bits held as int16, so that model.to(dtype) cannot
    re-round them), and `weight_selectors` (BitMoD) or `weight_zeros` (INT4).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_format: str,
        group_size: int,
        activation_format: str,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(
                f"P3Linear: group size {group_size} does not divide in_features={in_features}; pick a divisor "
                f"(e.g. weight_group_size={_largest_divisor(in_features)}) or skip this module"
            )
        if weight_format not in ("bitmod", "int4", "int4_sym"):
            raise ValueError(f"P3Linear: unsupported weight format {weight_format!r} (bitmod, int4, int4_sym)")
        self.in_features, self.out_features = in_features, out_features
        self.weight_format, self.group_size = weight_format, group_size
        self.activation_format, self.backend = activation_format, backend
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, groups, dtype=torch.int16, device=device))
        extra = "weight_selectors" if weight_format == "bitmod" else "weight_zeros"
        self.register_buffer(extra, torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32)) if bias else None
        # set by shared_input.group_shared_inputs: siblings fed the same input, computed together
        self.shared_input = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: P3Config, weight: torch.Tensor | None = None) -> "P3Linear":
        """Quantize `linear` (or the given replacement weight, e.g. AWQ-scaled) into a P3Linear."""
        w = linear.weight.detach() if weight is None else weight
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, config.weight_format,
            config.weight_group_size, config.activation_format, config.backend, w.device, linear.weight.dtype,
        )
        module.load_quantized(quantize_weight(w.float(), config.weight_format, config.weight_group_size))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_quantized(self, q: QuantizedWeight) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features) or q.group_size != self.group_size:
            raise ValueError(f"quantized weight {q.shape}/g{q.group_size} does not fit P3Linear {self.out_features}x{self.in_features}/g{self.group_size}")
        self.weight_packed.copy_(q.packed)
        self.weight_scales.copy_(q.scales.to(torch.float16).view(torch.int16))
        if isinstance(q, BitMoDTensor):
            self.weight_selectors.copy_(q.selectors)
        else:
            self.weight_zeros.copy_(q.zeros)

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight as a format dataclass (views of the buffers). The same object while the buffers are
        the same tensors: backends keep per-weight launch metadata on it (kernels.gemm_w4._prepared), which a
        new object per call would rebuild every time."""
        extra = self.weight_selectors if self.weight_format == "bitmod" else self.weight_zeros
        buffers = (self.weight_packed, self.weight_scales, extra)
        cached = self.__dict__.get("_qweight")
        if cached is not None and all(a is b for a, b in zip(cached[0], buffers)):
            return cached[1]
        scales = self.weight_scales.view(torch.float16)
        shape = (self.out_features, self.in_features)
        fmt = BitMoDTensor if self.weight_format == "bitmod" else Int4Tensor
        weight = fmt(self.weight_packed, scales, extra, shape, self.group_size)
        self.__dict__["_qweight"] = (buffers, weight)
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (float32), for inspection and export; forward never uses it."""
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"P3Linear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        if self.shared_input is not None:
            return self.shared_input.output(self, x)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's output alone (forward without its shared-input group)."""
        return get_backend(self.backend, x.device).linear(x, self.qweight, self.bias, self.activation_format)

    def packed_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight_format}/g{self.group_size}, activation={self.activation_format}, backend={self.backend}"
        )


def _largest_divisor(n: int) -> int:
    return next(g for g in (128, 64, 32, 16, 8, 4, 2) if n % g == 0) if n % 2 == 0 else 1
