"""RMSNorm feeding W4A8 layers: one Triton launch on the triton backend, which also quantizes the output once."""

from __future__ import annotations

import torch
from torch import nn

from .backends import get_backend
from .linear import P3Linear

# Norm classes computing w * (x * rsqrt(mean(x^2) + eps)).to(dtype) (LlamaRMSNorm's arithmetic), fused by P3RMSNorm
LLAMA_STYLE_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class P3RMSNorm(nn.Module):
    """A Llama-style RMSNorm whose output feeds `consumer` (a P3Linear; its siblings get the same input).

    When the consumer runs on the triton backend, forward is one kernel (kernels/rmsnorm.py) that, for W4A8
    consumers, also writes the FP8 codes the consumer and its siblings (q/k/v, gate/up) would compute, so the
    decode step loses the norm's ~6 PyTorch launches and a quantization launch. Otherwise the wrapped module runs.
    The weight is the wrapped module's parameter (same name in the state dict)."""

    def __init__(self, norm: nn.Module, consumer: P3Linear) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        object.__setattr__(self, "_wrapped", norm)  # not a submodule: its weight is already ours
        object.__setattr__(self, "_consumer", consumer)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        consumer = self._consumer
        if get_backend(consumer.backend, hidden_states.device).name != "triton" or hidden_states.dtype != self.weight.dtype:
            return self._wrapped(hidden_states)
        from ..kernels.gemm_w4 import activation_layout
        from ..kernels.rmsnorm import MAX_FEATURES, rms_norm

        k = hidden_states.shape[-1]
        if hidden_states.dtype not in (torch.bfloat16, torch.float16) or k > MAX_FEATURES or k % 8:
            return self._wrapped(hidden_states)
        layout = activation_layout(hidden_states.numel() // k, consumer.activation_format, consumer.group_size,
                                   hidden_states.device)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, layout)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, one kernel when its consumer runs on triton"


def fuse_norms(model: nn.Module) -> int:
    """Wrap the input and post-attention norms of Llama-style decoder layers whose q_proj / gate_proj are
    P3Linear in P3RMSNorm; returns how many were wrapped. Norms carrying an accelerate hook (device placement of
    a dispatched model) are left as they are: replacing the module would drop the hook."""
    count = 0
    for layer in model.modules():
        for norm_name, consumer in (("input_layernorm", getattr(getattr(layer, "self_attn", None), "q_proj", None)),
                                    ("post_attention_layernorm", getattr(getattr(layer, "mlp", None), "gate_proj", None))):
            norm = getattr(layer, norm_name, None)
            if type(norm).__name__ in LLAMA_STYLE_NORMS and isinstance(consumer, P3Linear) and not hasattr(norm, "_hf_hook"):
                setattr(layer, norm_name, P3RMSNorm(norm, consumer))
                count += 1
    return count


__all__ = ["P3RMSNorm", "fuse_norms", "LLAMA_STYLE_NORMS"]
