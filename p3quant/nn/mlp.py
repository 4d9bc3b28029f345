"""Gated (SwiGLU) MLPs feeding a W4A8 down projection: SiLU, product and FP8 quantization fused in Triton."""

from __future__ import annotations

import torch
from torch import nn

from .backends import get_backend
from .linear import P3Linear

# MLP classes computing down_proj(act_fn(gate_proj(x)) * up_proj(x)), fused by P3GatedMLP when act_fn is SiLU
LLAMA_STYLE_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
_SILU = frozenset({"SiLU", "SiLUActivation"})


class P3GatedMLP(nn.Module):
    """A Llama-style MLP whose gate, up and down projections are P3Linear (the same submodules, so the state dict
    keeps its keys). When the down projection runs on the triton backend, SiLU(gate) * up and the FP8 codes the
    down projection would compute come from kernels/silu_mul.py (two launches spread over the GPU, replacing two
    PyTorch launches and a one-program-per-row quantization per decode step); otherwise it computes what the
    wrapped MLP does."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        gate, up = self.gate_proj(x), self.up_proj(x)
        k = gate.shape[-1]
        if (get_backend(down.backend, x.device).name != "triton" or gate.dtype not in (torch.bfloat16, torch.float16)
                or up.dtype != gate.dtype or k % 8):
            return down(self.act_fn(gate) * up)
        from ..kernels.gemm_w4 import activation_layout
        from ..kernels.silu_mul import silu_mul

        layout = activation_layout(gate.numel() // k, down.activation_format, down.group_size, x.device)
        return down(silu_mul(gate, up, layout))


def fuse_mlps(model: nn.Module) -> int:
    """Replace the Llama-style SiLU MLPs whose three projections are P3Linear by P3GatedMLP; returns how many.
    MLPs carrying an accelerate hook (device placement of a dispatched model) are left as they are: replacing
    the module would drop the hook."""
    count = 0
    for parent in list(model.modules()):
        mlp = getattr(parent, "mlp", None)
        if (type(mlp).__name__ in LLAMA_STYLE_MLPS and not hasattr(mlp, "_hf_hook")
                and type(getattr(mlp, "act_fn", None)).__name__ in _SILU
                and all(isinstance(getattr(mlp, name, None), P3Linear) for name in ("gate_proj", "up_proj", "down_proj"))):
            parent.mlp = P3GatedMLP(mlp)
            count += 1
    return count


__all__ = ["P3GatedMLP", "fuse_mlps", "LLAMA_STYLE_MLPS"]
