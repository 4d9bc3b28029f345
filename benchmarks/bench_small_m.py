"""Small-M GEMM focus run (decode, M = 1..128): the tensor-core small-M kernel (kernels/w4_mma.py) against the
CUDA-core GEMV (M = 1), the tiled kernel (M > 1) and bf16 cuBLAS, on the Llama-3.1-8B shapes (W4A8; W4A16 in
CUDA-graph time).

Order: correctness (gpu_check GEMM cases, the inline-PTX decode vs the pure-Triton decode compiled on the GPU,
half-plane activation quantization bit-exact), a launch-parameter sweep of the new kernel (CUDA-graph time), then
CUDA-graph and eager times of every path. CUDA-graph times are GPU time alone (what a graph-captured decode step
pays); eager times include the host launch cost. Run: PYTHONUNBUFFERED=1 python benchmarks/bench_small_m.py
[--sweep-only] [--sweep-ms 16 64] [--variant fp8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_check  # noqa: E402
from _common import LLAMA_SHAPES, bench_rotating, bitmod_weight_copies, copies_for, copy_bandwidth_tbs, environment, graph_rotating_us, table  # noqa: E402

import p3quant.kernels.gemm_w4 as g  # noqa: E402
from p3quant.kernels import w4_mma  # noqa: E402
from p3quant.formats import BITMOD4, INT4  # noqa: E402
from p3quant.kernels import dequant_w4  # noqa: E402
from p3quant.kernels.act_quant import quantize_activation_fp8, quantize_activation_fp8_halves  # noqa: E402

from p3quant.kernels import act_quant  # noqa: E402

act_quant.ACTIVATION_REUSE = False  # each call times one linear layer, its own activation quantization included

SHAPES = LLAMA_SHAPES
GROUP = 128
MMA_PROBE_MAX_M = 256


@contextlib.contextmanager
def path(name: str):
    """Route to "mma" (the tensor-core small-M kernel at every M <= MMA_PROBE_MAX_M, beyond the library's
    MMA_MAX_M to see where it stops paying) or "old" (the CUDA-core GEMVs at M = 1, the tiled kernel above)."""
    if name not in ("mma", "old"):
        raise ValueError(f"unknown path {name!r}")
    saved = g.MMA_MIN_M, g.MMA_MAX_M
    g.MMA_MIN_M, g.MMA_MAX_M = (1, MMA_PROBE_MAX_M) if name == "mma" else (1 << 30, 0)
    try:
        yield
    finally:
        g.MMA_MIN_M, g.MMA_MAX_M = saved


def correctness() -> list[str]:
    lines = gpu_check.check_gemm()
    cases = [("bitmod", 128, 1, 1001, 4096, "fp8_e4m3"), ("int4", 64, 3, 513, 1408, "fp8_e4m3"),
             ("bitmod", 32, 16, 300, 2048, "fp8_e4m3"), ("int4", 128, 64, 257, 4096, "fp8_e4m3"),
             ("bitmod", 64, 37, 4096, 14336, "fp8_e4m3"), ("int4", 32, 1, 4099, 4096, "fp8_e4m3"),
             ("bitmod", 128, 5, 1001, 4096, "bf16"), ("int4", 64, 16, 513, 1408, "fp16"), ("bitmod", 32, 64, 300, 2048, "bf16")]
    for fmt, group, m, n, k, act in cases:  # W4A8, then W4A16 with bf16 / fp16 activations
        w = torch.randn(n, k, device="cuda") * (1 + torch.rand(n, 1, device="cuda"))
        wq = BITMOD4.quantize(w, group) if fmt == "bitmod" else INT4.quantize(w, group)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16 if act == "fp16" else torch.bfloat16)
        afmt = "fp8_e4m3" if act == "fp8_e4m3" else "none"
        ys = []
        with path("mma"):
            try:
                for use_asm in (True, False):
                    g.GEMV_USE_ASM = use_asm
                    ys.append(g.w4_matmul(x, wq, None, afmt, out_dtype=torch.float32))
            finally:
                g.GEMV_USE_ASM = True
        xq = gpu_check.quantize_scaled_fp8(x).dequantize() if afmt == "fp8_e4m3" else x
        exact = xq.double() @ wq.dequantize().double().t()
        err = gpu_check._rel(ys[0], exact)
        ok = torch.equal(ys[0], ys[1]) and err < 1e-5
        lines.append(f"{'PASS' if ok else 'FAIL'} mma gemm {fmt} g{group} {act} M={m} N={n} K={k}: asm == pure-Triton "
                     f"decode {torch.equal(ys[0], ys[1])}, rel_err vs float64 {err:.2e}")
    for m, k in ((1, 4096), (7, 14336), (64, 1408)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * torch.logspace(-6, 3, k, device="cuda").to(torch.bfloat16)
        codes, scales = quantize_activation_fp8(x)
        halves, hs = torch.empty(m, k, device="cuda", dtype=torch.float16), torch.empty(m, device="cuda")
        quantize_activation_fp8_halves(x, halves, hs)
        kk = torch.arange(k, device="cuda")
        pos = ((kk // 4) % 2) * (k // 2) + (kk // 8) * 4 + kk % 4
        ok = torch.equal(hs, scales) and torch.equal(halves[:, pos].float(), codes.float())
        lines.append(f"{'PASS' if ok else 'FAIL'} half-plane act quant bit-exact M={m} K={k}")
    for fmt, group, n, k in (("bitmod", 128, 1001, 4096), ("int4", 64, 513, 1408), ("bitmod", 32, 300, 2048), ("int4", 128, 77, 384)):
        w = torch.randn(n, k, device="cuda") * torch.logspace(-3, 2, n, device="cuda")[:, None]
        wq = BITMOD4.quantize(w, group) if fmt == "bitmod" else INT4.quantize(w, group)
        ref = wq.dequantize().to(torch.float16)
        got = []
        try:
            for use_asm in (True, False):
                dequant_w4.DEQUANT_USE_ASM = use_asm
                got.append(dequant_w4.dequantize_w4(wq, torch.float16))
        finally:
            dequant_w4.DEQUANT_USE_ASM = True
        ok = torch.equal(got[0], ref) and torch.equal(got[1], ref)
        lines.append(f"{'PASS' if ok else 'FAIL'} dequant fp16 bit-exact {fmt} g{group} N={n} K={k} (asm and pure-Triton decode)")
    return lines


def sweep(ms: tuple[int, ...] = (1, 16)) -> tuple[str, tuple]:
    """Times each launch config of the small-M kernel (under gemm_w4.MMA_VARIANT) at the rows `ms`."""
    configs = [(64, 4, 4, 4), (64, 4, 3, 8), (64, 4, 4, 2), (128, 4, 3, 4), (128, 8, 4, 4), (32, 4, 4, 4), (128, 4, 4, 8),
               (64, 4, 2, 4)]
    totals = {c: 0.0 for c in configs}
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = bitmod_weight_copies(n, k, min(copies_for(n * k // 2), 16), GROUP)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for cfg in configs:
                w4_mma.MMA_OVERRIDE, w4_mma.MMA_PROGRAMS_PER_SM = cfg[:3], cfg[3]
                try:
                    with path("mma"):
                        us = graph_rotating_us([lambda w=w: g.w4_matmul(x, w, None, "fp8_e4m3") for w in ws])
                except Exception as err:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
                    us = float("inf")
                    print("sweep error", cfg, repr(err)[:300], flush=True)
                totals[cfg] += us
                rows.append((name, m, str(cfg), us))
    w4_mma.MMA_OVERRIDE, w4_mma.MMA_PROGRAMS_PER_SM = None, 4
    best = min(configs, key=lambda c: totals[c])
    text = ("## sweep (BLOCK_N, warps, stages, programs per SM), graph us incl. the act-quant launch\n"
            + table(["shape", "M", "config", "graph us"], rows)
            + "\n\n" + table(["config", f"total us (4 shapes x M {', '.join(map(str, ms))})"], [(str(c), totals[c]) for c in configs])
            + f"\nbest: {best}")
    return text, best


def timings(best: tuple) -> str:
    saved = w4_mma.MMA_OVERRIDE, w4_mma.MMA_PROGRAMS_PER_SM
    w4_mma.MMA_OVERRIDE, w4_mma.MMA_PROGRAMS_PER_SM = best[:3], best[3]
    try:
        return _timings(best)
    finally:
        w4_mma.MMA_OVERRIDE, w4_mma.MMA_PROGRAMS_PER_SM = saved


def _timings(best: tuple) -> str:
    copy_bw = copy_bandwidth_tbs()
    rows, means = [], {}
    for name, (n, k) in SHAPES.items():
        wbytes = n * k // 2 + n * (k // GROUP) * 3
        ws = bitmod_weight_copies(n, k, copies_for(wbytes), GROUP)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
        for m in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = [lambda w=w: g.w4_matmul(x, w, None, "fp8_e4m3") for w in ws]
            bf = [lambda d=d: x @ d.t() for d in dense]
            gbf, ebf = graph_rotating_us(bf[:16]), bench_rotating(bf)
            with path("mma"):
                try:
                    gm = graph_rotating_us(calls[:16])
                    em = bench_rotating(calls)
                except Exception as err:  # noqa: BLE001  (e.g. out of shared memory beyond the library's MMA_MAX_M)
                    gm = em = float("nan")
                    print(f"mma path at M={m}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            with path("old"):
                go, eo = graph_rotating_us(calls[:16]), bench_rotating(calls)
            # W4A16 (bf16 activations) through both paths, GPU time
            calls16 = [lambda w=w: g.w4_matmul(x, w, None, "none") for w in ws[:16]]
            g16 = float("nan")
            if m > 1:
                with path("mma"):
                    try:
                        g16 = graph_rotating_us(calls16)
                    except Exception as err:  # noqa: BLE001
                        print(f"W4A16 mma path at M={m}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            with path("old"):
                g16o = graph_rotating_us(calls16)
            rows.append((f"{name} {n}x{k}", m, gbf, gm, go, gbf / gm, gbf / go, 100 * wbytes / gm / 1e6 / copy_bw,
                         ebf, em, eo, ebf / em, g16, g16o, gbf / g16))
            means.setdefault(m, []).append((gbf / gm, gbf / go, ebf / em, gbf / g16, gbf / g16o))
            print(rows[-1], flush=True)
    hdr = ["shape NxK", "M", "bf16 graph us", "mma graph us", "old graph us", "mma x bf16 (graph)", "old x bf16 (graph)",
           "mma % copy BW", "bf16 eager us", "mma eager us", "old eager us", "mma x bf16 (eager)", "W4A16 mma graph us",
           "W4A16 old graph us", "W4A16 mma x bf16 (graph)"]
    summary = [f"copy bandwidth {copy_bw:.2f} TB/s; config {best}; old = CUDA-core GEMV at M = 1, tiled kernel above"]
    for m, vals in means.items():
        summary.append(f"M={m}: mean over the 4 Llama shapes, graph: mma {sum(v[0] for v in vals) / 4:.2f}x bf16, "
                       f"old {sum(v[1] for v in vals) / 4:.2f}x; eager: mma {sum(v[2] for v in vals) / 4:.2f}x; "
                       f"W4A16 graph: mma {sum(v[3] for v in vals) / 4:.2f}x, old {sum(v[4] for v in vals) / 4:.2f}x")
    return table(hdr, rows) + "\n\n" + "\n".join(summary)


def prefill() -> str:
    """W4A8 at M >= DEQUANT_MIN_M: the fp16 dequant kernel alone (PTX vs pure-Triton decode; the path of groups
    other than 128) and the whole default path (FP8 block-scaled cuBLAS with these groups of 128) vs bf16."""
    rows = []
    for name, (n, k) in SHAPES.items():
        w = bitmod_weight_copies(n, k, 1, GROUP)[0]
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        moved = n * k // 2 + n * (k // GROUP) * 3 + n * k * 2
        times = []
        for use_asm in (True, False):
            dequant_w4.DEQUANT_USE_ASM = use_asm
            times.append(bench_rotating([lambda: dequant_w4.dequantize_w4(w, torch.float16)]))
        dequant_w4.DEQUANT_USE_ASM = True
        for m in (256, 1024, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            p3 = bench_rotating([lambda: g.w4_matmul(x, w, None, "fp8_e4m3")])
            bf = bench_rotating([lambda: x @ dense.t()])
            rows.append((f"{name} {n}x{k}", m, times[0], moved / times[0] / 1e6, times[1], p3, bf, bf / p3))
            print(rows[-1], flush=True)
    hdr = ["shape NxK", "M", "dequant PTX us", "dequant PTX TB/s", "dequant pure-Triton us", "W4A8 prefill path us", "bf16 us", "W4A8 x bf16"]
    means = [f"M={m}: mean W4A8 x bf16 over the 4 Llama shapes {sum(r[7] for r in rows if r[1] == m) / 4:.2f}x" for m in (256, 1024, 4096)]
    return "## prefill (eager; weights L2-cold by size)\n" + table(hdr, rows) + "\n" + "\n".join(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-only", action="store_true", help="only the launch-parameter sweep")
    parser.add_argument("--sweep-ms", type=int, nargs="+", default=[1, 16], help="rows the sweep times (default 1 16)")
    parser.add_argument("--variant", choices=g.MMA_VARIANTS, default=g.MMA_VARIANT,
                        help=f"the small-M kernel's operands (gemm_w4.MMA_VARIANT; default {g.MMA_VARIANT})")
    args = parser.parse_args()
    g.MMA_VARIANT = args.variant
    print(environment(), f"small-M variant: {args.variant}", sep="\n", flush=True)
    if not args.sweep_only:
        lines = correctness()
        print("\n".join(lines), flush=True)
        print(f"correctness: {sum(l.startswith('PASS') for l in lines)} PASS, {sum(l.startswith('FAIL') for l in lines)} FAIL", flush=True)
    text, best = sweep(tuple(args.sweep_ms))
    print(text, flush=True)
    if args.sweep_only:
        return
    print(timings(best), flush=True)
    print(prefill(), flush=True)


if __name__ == "__main__":
    main()
