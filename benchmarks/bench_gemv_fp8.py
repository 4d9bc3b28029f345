"""FP8 tensor-core decode GEMV (kernels/gemv_fp8.py) on one GPU: correctness, then CUDA-graph times on the
Llama-3.1-8B shapes against the previous paths and bf16 cuBLAS, all in the same run.

Correctness: the kernel against the float64 product of the same quantized operands over tokens, groups, formats,
ragged N and K and launch configs; the inline-PTX fragments against the tensor-op emulation compiled on the GPU.
Timing: a (tiles, warps) sweep at M = 1, then M in {1, 4, 8}: the new kernel with its default config, the
previous paths (CUDA-core GEMV at M = 1, small-M tensor-core kernel above), bf16; each W4A8 call includes its
activation-quantization launch, and "kernel alone" times the new kernel with pre-quantized activations.

Run (repo root): PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/bench_gemv_fp8.py [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import LLAMA_SHAPES, bitmod_weight_copies, copies_for, copy_bandwidth_tbs, environment, graph_rotating_us, table  # noqa: E402

from p3quant.formats import BITMOD4, INT4, quantize_scaled_fp8  # noqa: E402
from p3quant.kernels import act_quant, gemm_w4, gemv_fp8  # noqa: E402

act_quant.ACTIVATION_REUSE = False  # each timed call quantizes its own activations
CONFIGS = ((1, 2), (1, 4), (2, 2), (2, 4), (2, 8), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_kernel(quick: bool) -> list[str]:
    out = []
    cases = [(fmt, group, m, n, k) for fmt, group in (("bitmod", 128), ("int4", 64), ("int4", 128), ("bitmod", 64))
             for m, n, k in ((1, 4099, 4096), (5, 777, 1408), (8, 333, 14336), (3, 64, 384))]
    if quick:
        cases = cases[:2]
    for fmt, group, m, n, k in cases:
        w = torch.randn(n, k, device="cuda") * (1 + torch.rand(n, 1, device="cuda"))
        wq = (BITMOD4 if fmt == "bitmod" else INT4).quantize(w, group)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        exact = quantize_scaled_fp8(x).dequantize().double() @ wq.dequantize().double().t() + bias.double()
        for config in (None,) + (() if quick else ((1, 1), (4, 8), (8, 2))):
            gemv_fp8.CONFIG_OVERRIDE = config
            y = torch.full((m, n), float("nan"), device="cuda")
            gemm_w4.w4_matmul(x, wq, bias, "fp8_e4m3", out_dtype=torch.float32, out=y)
            err = _rel(y, exact)
            ok = torch.isfinite(y).all().item() and err < 1e-5
            out.append(f"{'PASS' if ok else 'FAIL'} gemv_fp8 {fmt} g{group} M={m} N={n} K={k} config={config} rel_err={err:.2e}")
            print(out[-1], flush=True)
        gemv_fp8.CONFIG_OVERRIDE = None
        gemm_w4.GEMV_USE_ASM = False  # the emulated fragments, compiled for the GPU
        y_emulated = gemm_w4.w4_matmul(x, wq, bias, "fp8_e4m3", out_dtype=torch.float32)
        gemm_w4.GEMV_USE_ASM = True
        y_asm = gemm_w4.w4_matmul(x, wq, bias, "fp8_e4m3", out_dtype=torch.float32)
        diff = _rel(y_asm, y_emulated)
        out.append(f"{'PASS' if diff < 1e-6 else 'FAIL'} gemv_fp8 PTX fragments vs emulation {fmt} g{group} M={m} rel diff {diff:.1e}")
        print(out[-1], flush=True)
    return out


def _w4a8(x, ws):
    return [lambda w=w: gemm_w4.w4_matmul(x, w, None, "fp8_e4m3") for w in ws]


def _sweep_rows() -> list[tuple]:
    rows = []
    for name, (n, k) in LLAMA_SHAPES.items():
        ws = bitmod_weight_copies(n, k, min(copies_for(n * k // 2), 16))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        times = []
        for config in CONFIGS:
            gemv_fp8.CONFIG_OVERRIDE = config
            times.append(graph_rotating_us(_w4a8(x, ws)))
        gemv_fp8.CONFIG_OVERRIDE = None
        rows.append((name, *times))
        print(rows[-1], flush=True)
    return rows


def _time_rows(copy_bw: float, tokens: tuple[int, ...]) -> list[tuple]:
    rows = []
    for name, (n, k) in LLAMA_SHAPES.items():
        wbytes = n * k // 2 + n * (k // 128) * 3
        ws = bitmod_weight_copies(n, k, min(copies_for(wbytes), 16))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(copies_for(n * k * 2), 16))]
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf = graph_rotating_us([lambda d=d: x @ d.t() for d in dense])
            gemm_w4.GEMV_FP8 = True
            new = graph_rotating_us(_w4a8(x, ws))
            codes = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
            xs = torch.empty(m, device="cuda")
            act_quant.quantize_activation_fp8_halves_e4m3(x, codes, xs)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def alone(w):
                p = gemm_w4._prepared(w, "bench")
                gemv_fp8.gemv_fp8(codes, xs, p.words, p.scales, p.aux, None, y, 128, True, True)

            kern = graph_rotating_us([lambda w=w: alone(w) for w in ws])
            gemm_w4.GEMV_FP8 = False
            old = graph_rotating_us(_w4a8(x, ws))
            gemm_w4.GEMV_FP8 = True
            rows.append((f"{name} {n}x{k}", m, str(gemv_fp8.launch_config(n, k, 128, x.device)), new, kern,
                         wbytes / kern / 1e6 / copy_bw * 100, old, bf, bf / new, bf / kern, bf / old))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    print(environment(), flush=True)
    lines = check_kernel(quick)
    print("\n".join(lines), flush=True)
    print(f"correctness: {sum(l.startswith('PASS') for l in lines)} PASS, {sum(l.startswith('FAIL') for l in lines)} FAIL", flush=True)
    sweep = _sweep_rows()
    print("\n## (tiles, warps) per program, W4A8 M = 1, graph us incl. act-quant launch\n"
          + table(["shape"] + [str(c) for c in CONFIGS], sweep), flush=True)
    copy_bw = copy_bandwidth_tbs()
    tokens = (1, 8) if quick else (1, 4, 8)
    rows = _time_rows(copy_bw, tokens)
    hdr = ["shape NxK", "M", "config", "W4A8 new us", "new kernel alone us", "kernel % copy BW", "W4A8 previous us", "bf16 us",
           "new x bf16", "kernel alone x bf16", "previous x bf16"]
    print(f"\n## decode GEMM, BitMoD g128, CUDA-graph times (copy BW {copy_bw:.2f} TB/s)\n" + table(hdr, rows))
    for m in tokens:
        sel = [r for r in rows if r[1] == m]
        print(f"M={m}: mean over the 4 Llama shapes: new {sum(r[8] for r in sel) / 4:.2f}x bf16 (kernel alone "
              f"{sum(r[9] for r in sel) / 4:.2f}x), previous {sum(r[10] for r in sel) / 4:.2f}x")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
