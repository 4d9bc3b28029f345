"""The decode step's one-program-per-row kernels by warps per program (CUDA-graph time): the fused RMSNorm (+ FP8
codes in the GEMV's split layout) against PyTorch's LlamaRMSNorm followed by the separate activation-quantization
launch, and that activation quantization alone (the o and down projections' inputs).

Run: python benchmarks/bench_rmsnorm.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, graph_rotating_us, table  # noqa: E402

from p3quant.kernels import act_quant, rmsnorm  # noqa: E402

WARPS = (4, 8, 16, 32)


def rmsnorm_rows() -> list[tuple]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

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
            for warps in WARPS:
                rmsnorm.WARPS_OVERRIDE = warps
                assert torch.equal(rmsnorm.rms_norm(xs[0], norm.weight, 1e-5, "split"), want)
                us = graph_rotating_us([lambda x=x: rmsnorm.rms_norm(x, norm.weight, 1e-5, layout) for x in xs])
                rows.append(("fused RMSNorm + codes", m, k, warps, us, base, base / us))
        finally:
            rmsnorm.WARPS_OVERRIDE = None
    return rows


def act_quant_rows() -> list[tuple]:
    rows = []
    for m, k in ((1, 4096), (1, 14336), (8, 4096)):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        codes = torch.empty(m, act_quant.codes_width(act_quant.LAYOUT_CODES["split"], k), device="cuda")
        scales = torch.empty(m, device="cuda")
        default = graph_rotating_us([lambda x=x: act_quant.quantize_activation_fp8_split(x, codes, scales) for x in xs])
        want = codes.clone()
        try:
            for warps in WARPS:
                act_quant.WARPS_OVERRIDE = warps
                act_quant.quantize_activation_fp8_split(xs[-1], codes, scales)
                assert torch.equal(codes, want)
                us = graph_rotating_us([lambda x=x: act_quant.quantize_activation_fp8_split(x, codes, scales) for x in xs])
                rows.append(("act quant (split layout)", m, k, warps, us, default, default / us))
        finally:
            act_quant.WARPS_OVERRIDE = None
    return rows


def main() -> None:
    print(environment(), flush=True)
    act_quant.ACTIVATION_REUSE = False
    rows = rmsnorm_rows() + act_quant_rows()
    print(table(["kernel", "M", "K", "warps", "us", "baseline us (PyTorch + act quant; act quant: default warps)",
                 "speedup"], rows))


if __name__ == "__main__":
    main()
