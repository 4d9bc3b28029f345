"""Tensor-core decode GEMV (kernels/gemv_mma.py) on one GPU: correctness, then CUDA-graph times on the
Llama-3.1-8B shapes against the previous paths and bf16 cuBLAS, all in the same run.

Correctness: the new kernel against the float64 product of the same quantized operands over tokens, groups,
formats, ragged N and K and every warp split; the inline-PTX fragments against the tensor-op emulation compiled
on the GPU; then gpu_check's GEMM cases and CUDA-graph generation (which now run through the new kernel).
Timing: M in {1, 4, 8, 16}, the new kernel with its default warp split, a sweep of the split at M = 1, the
previous paths (CUDA-core GEMV at M = 1, small-M tensor-core kernel above), bf16; each W4A8 call includes its
activation-quantization launch, and "kernel alone" times the new kernel with pre-quantized activations.

Run (repo root): PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python benchmarks/bench_gemv_mma.py [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_check  # noqa: E402
from _common import LLAMA_SHAPES, bitmod_weight_copies, copies_for, copy_bandwidth_tbs, environment, graph_rotating_us, table  # noqa: E402

from p3quant.formats import BITMOD4, INT4, quantize_scaled_fp8  # noqa: E402
from p3quant.kernels import act_quant, gemm_w4, gemv_mma  # noqa: E402

act_quant.ACTIVATION_REUSE = False  # each timed call quantizes its own activations


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_kernel(quick: bool) -> list[str]:
    out = []
    cases = [(fmt, group, afmt, m, n, k) for fmt, group in (("bitmod", 128), ("int4", 64), ("int4", 128), ("bitmod", 64))
             for afmt in ("fp8_e4m3", "none") for m, n, k in ((1, 4099, 4096), (5, 777, 1408), (9, 333, 14336), (16, 64, 384))]
    if quick:
        cases = [("bitmod", 128, "fp8_e4m3", 1, 4099, 4096), ("int4", 64, "fp8_e4m3", 9, 333, 14336)]
    for fmt, group, afmt, m, n, k in cases:
        w = torch.randn(n, k, device="cuda") * (1 + torch.rand(n, 1, device="cuda"))
        wq = (BITMOD4 if fmt == "bitmod" else INT4).quantize(w, group)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        xq = quantize_scaled_fp8(x).dequantize().double() if afmt == "fp8_e4m3" else x.double()
        exact = xq @ wq.dequantize().double().t() + bias.double()
        for warps in ((None, 8) if quick else (None, 1, 2, 4, 8)):
            gemv_mma.WARPS_OVERRIDE = warps
            y = torch.full((m, n), float("nan"), device="cuda")
            gemm_w4.w4_matmul(x, wq, bias, afmt, out_dtype=torch.float32, out=y)
            err = _rel(y, exact)
            ok = torch.isfinite(y).all().item() and err < 1e-5
            if not ok or warps is None:
                print(f"{'PASS' if ok else 'FAIL'} gemv_mma {fmt} g{group} {afmt} M={m} warps={warps} rel_err={err:.2e}", flush=True)
                out.append(f"{'PASS' if ok else 'FAIL'} gemv_mma {fmt} g{group} {afmt} M={m} N={n} K={k} warps={warps} rel_err={err:.2e}")
        gemv_mma.WARPS_OVERRIDE = None
        if quick:
            continue
        gemm_w4.GEMV_USE_ASM = False  # the emulated fragments, compiled for the GPU
        y_emulated = gemm_w4.w4_matmul(x, wq, bias, afmt, out_dtype=torch.float32)
        gemm_w4.GEMV_USE_ASM = True
        y_asm = gemm_w4.w4_matmul(x, wq, bias, afmt, out_dtype=torch.float32)
        diff = _rel(y_asm, y_emulated)
        out.append(f"{'PASS' if diff < 1e-6 else 'FAIL'} gemv_mma PTX fragments vs emulation {fmt} g{group} {afmt} M={m} rel diff {diff:.1e}")
        print(out[-1], flush=True)
    for dtype in (torch.float16, torch.bfloat16):  # W4A16 in both 16-bit types
        wq = BITMOD4.quantize(torch.randn(500, 2048, device="cuda"), 128)
        x = torch.randn(3, 2048, device="cuda", dtype=dtype)
        y = gemm_w4.w4_matmul(x, wq, None, "none", out_dtype=torch.float32)
        err = _rel(y, x.double() @ wq.dequantize().double().t())
        out.append(f"{'PASS' if err < 1e-5 else 'FAIL'} gemv_mma W4A16 {dtype} rel_err={err:.2e}")
    return out


def _time_rows(copy_bw: float, tokens: tuple[int, ...]) -> list[tuple]:
    rows = []
    for name, (n, k) in LLAMA_SHAPES.items():
        wbytes = n * k // 2 + n * (k // 128) * 3
        ws = bitmod_weight_copies(n, k, min(copies_for(wbytes), 16))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(copies_for(n * k * 2), 16))]
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf = graph_rotating_us([lambda d=d: x @ d.t() for d in dense])
            gemm_w4.GEMV_MMA = True
            new = graph_rotating_us([lambda w=w: gemm_w4.w4_matmul(x, w, None, "fp8_e4m3") for w in ws])
            a16 = graph_rotating_us([lambda w=w: gemm_w4.w4_matmul(x, w, None, "none") for w in ws])
            pairs = torch.empty(m, k, device="cuda", dtype=torch.float16)
            xs = torch.empty(m, device="cuda")
            act_quant.quantize_activation_fp8_pairs(x, pairs, xs)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def alone(w):
                p = gemm_w4._prepared(w, "bench")
                gemv_mma.gemv_mma(pairs, xs, p.words, p.scales, p.aux, None, y, 128, True, True)

            kern = graph_rotating_us([lambda w=w: alone(w) for w in ws])
            gemm_w4.GEMV_MMA = False
            old = graph_rotating_us([lambda w=w: gemm_w4.w4_matmul(x, w, None, "fp8_e4m3") for w in ws])
            gemm_w4.GEMV_MMA = True
            rows.append((f"{name} {n}x{k}", m, gemv_mma.warps_for(n, k, 128, x.device), new, kern,
                         wbytes / kern / 1e6 / copy_bw * 100, old, bf, bf / new, bf / kern, bf / old, a16, bf / a16))
            print(rows[-1], flush=True)
    return rows


def _sweep_rows() -> list[tuple]:
    rows = []
    for name, (n, k) in LLAMA_SHAPES.items():
        ws = bitmod_weight_copies(n, k, min(copies_for(n * k // 2), 16))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for warps in (1, 2, 4, 8):
            gemv_mma.WARPS_OVERRIDE = warps
            rows.append((name, warps, graph_rotating_us([lambda w=w: gemm_w4.w4_matmul(x, w, None, "fp8_e4m3") for w in ws])))
            print(rows[-1], flush=True)
        gemv_mma.WARPS_OVERRIDE = None
    return rows


def main() -> None:
    quick = "--quick" in sys.argv  # two correctness cases, M in {1, 8}
    print(environment(), flush=True)
    lines = check_kernel(quick)
    if not quick:
        lines += gpu_check.check_gemm() + gpu_check.check_static_generate()
    print("\n".join(lines), flush=True)
    print(f"correctness: {sum(l.startswith('PASS') for l in lines)} PASS, {sum(l.startswith('FAIL') for l in lines)} FAIL", flush=True)
    sweep = _sweep_rows()
    print("\n## warps per program, W4A8 M = 1, graph us incl. act-quant launch\n" + table(["shape", "warps", "graph us"], sweep), flush=True)
    copy_bw = copy_bandwidth_tbs()
    tokens = (1, 8) if quick else (1, 4, 8, 16)
    rows = _time_rows(copy_bw, tokens)
    hdr = ["shape NxK", "M", "warps", "W4A8 new us", "new kernel alone us", "kernel % copy BW", "W4A8 previous us", "bf16 us",
           "new x bf16", "kernel alone x bf16", "previous x bf16", "W4A16 new us", "W4A16 x bf16"]
    print(f"\n## decode GEMM, BitMoD g128, CUDA-graph times (copy BW {copy_bw:.2f} TB/s)\n" + table(hdr, rows))
    for m in tokens:
        sel = [r for r in rows if r[1] == m]
        print(f"M={m}: mean over the 4 Llama shapes: new {sum(r[8] for r in sel) / 4:.2f}x bf16 (kernel alone "
              f"{sum(r[9] for r in sel) / 4:.2f}x), previous {sum(r[10] for r in sel) / 4:.2f}x, W4A16 {sum(r[12] for r in sel) / 4:.2f}x")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
