"""The fused RMSNorm (+ FP8 codes in the GEMV's split layout) at decode sizes: CUDA-graph time by warps per
program, against PyTorch's LlamaRMSNorm followed by the separate activation-quantization launch.

Run: python benchmarks/bench_rmsnorm.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, graph_rotating_us, table  # noqa: E402

from p3quant.kernels import act_quant, rmsnorm  # noqa: E402


def main() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    print(environment(), flush=True)
    act_quant.ACTIVATION_REUSE = False
    rows = []
    for m, k in ((1, 4096), (8, 4096), (1, 8192)):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        norm = LlamaRMSNorm(k, eps=1e-5).to("cuda", torch.bfloat16)
        norm.weight.data.uniform_(0.5, 1.5)
        want = rmsnorm.rms_norm(xs[0], norm.weight, 1e-5, "split")
        layout = "split" if m == 1 else "halves"

        def reference(x, norm=norm, layout=layout):
            act_quant.quantize_activation_once(x, x.view(-1, x.shape[-1]), layout)
            return norm(x)

        base = graph_rotating_us([lambda x=x: reference(x) for x in xs])
        try:
            for warps in (4, 8, 16, 32):
                rmsnorm.WARPS_OVERRIDE = warps
                assert torch.equal(rmsnorm.rms_norm(xs[0], norm.weight, 1e-5, "split"), want)
                us = graph_rotating_us([lambda x=x: rmsnorm.rms_norm(x, norm.weight, 1e-5, layout) for x in xs])
                rows.append((m, k, warps, us, base, base / us))
        finally:
            rmsnorm.WARPS_OVERRIDE = None
    print(table(["M", "K", "warps", "fused us", "LlamaRMSNorm + act quant us", "speedup"], rows))


if __name__ == "__main__":
    main()
