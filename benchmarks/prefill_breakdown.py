"""Where the W4A8 prefill GEMM's time goes on the FP8 block-scaled path (groups of 128): the activations' FP8
quantization, the weight's values to FP8, cuBLAS's block-scaled FP8 GEMM alone, against bf16 cuBLAS and FP8
row-scaled torch._scaled_mm (the floor for an FP8 GEMM), on the Llama-3.1-8B decoder shapes.

Parts are CUDA-graph replays (GPU time alone); "whole eager" is w4_matmul as a model calls it (host time included),
and the last five columns are host times (the wall time of one call, whose launches are asynchronous) of the
parts and of the whole call, to show where the eager call's host time goes.
"weight values" times the weight's FP8 values with the pure-Triton decode and with the inline-PTX one (the default,
dequant_w4.VALUES_FP8_USE_ASM).
Run: python benchmarks/prefill_breakdown.py [--ms M ...]. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Callable
from unittest import mock

import torch

from p3quant.kernels import act_quant, dequant_w4
from p3quant.kernels.act_quant import quantize_activation_fp8
from p3quant.kernels.dequant_w4 import weight_values_fp8
from p3quant.kernels.gemm_w4 import w4_matmul

try:
    from ._common import LLAMA_SHAPES, bench_rotating, bitmod_weight_copies, copies_for, environment, graph_rotating_us, table
except ImportError:
    from _common import LLAMA_SHAPES, bench_rotating, bitmod_weight_copies, copies_for, environment, graph_rotating_us, table

act_quant.ACTIVATION_REUSE = False  # each call quantizes its own activations, as one linear layer does


def _graph_us(calls) -> float:
    """graph_rotating_us, or NaN (with the reason printed) where the call cannot be captured or run here."""
    try:
        return graph_rotating_us(calls)
    except Exception as err:  # noqa: BLE001  (reported, the other columns still run)
        print(f"not timed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return float("nan")


def _host_us(fn: Callable[[], object], reps: int = 60) -> float:
    """Median host time of one call: its launches are asynchronous, so the wall time until it returns is the host's
    (synchronized every few calls, so that the launch queue never fills and blocks)."""
    times = []
    for i in range(reps):
        if i % 4 == 0:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def run(ms: tuple[int, ...]) -> str:
    fn = torch.nn.functional
    block = fn.ScalingType.BlockWise1x128
    rows = []
    for name, (n, k) in LLAMA_SHAPES.items():
        weights = bitmod_weight_copies(n, k, copies_for(n * k // 2))
        operands = [weight_values_fp8(w) for w in weights]
        values, scales_b = [v for v, _ in operands], [sb for _, sb in operands]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
        fp8_dense = [d.to(torch.float8_e4m3fn) for d in dense[: len(values)]]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            codes, scale_a = quantize_activation_fp8(x, scale_blocks=k // 128)  # [m, K / 128] block scales
            row_a, row_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
            act = _graph_us([lambda: quantize_activation_fp8(x, scale_blocks=k // 128)])
            with mock.patch.object(dequant_w4, "VALUES_FP8_USE_ASM", False):
                wval = _graph_us([lambda w=w: weight_values_fp8(w) for w in weights])
            with mock.patch.object(dequant_w4, "VALUES_FP8_USE_ASM", True):
                wval_ptx = _graph_us([lambda w=w: weight_values_fp8(w) for w in weights])
            mm = _graph_us([lambda v=v, sb=sb: fn.scaled_mm(codes, v.t(), scale_a, block, sb, block)
                                    for v, sb in zip(values, scales_b)])
            rowwise = _graph_us([lambda d=d: torch._scaled_mm(codes, d.t(), row_a, row_b, out_dtype=torch.bfloat16)
                                         for d in fp8_dense])
            bf16 = _graph_us([lambda d=d: x @ d.t() for d in dense])
            parts_host = [_host_us(lambda: quantize_activation_fp8(x, rows=m, scale_blocks=k // 128)),
                          _host_us(lambda: weight_values_fp8(weights[0])),
                          _host_us(lambda: fn.scaled_mm(codes, values[0].t(), scale_a, block, scales_b[0], block)),
                          _host_us(lambda: w4_matmul(x, weights[0], None, "fp8_e4m3"))]
            whole_graph = _graph_us([lambda w=w: w4_matmul(x, w, None, "fp8_e4m3") for w in weights])
            whole_eager = bench_rotating([lambda w=w: w4_matmul(x, w, None, "fp8_e4m3") for w in weights])
            wbytes = n * k // 2 + n * k  # packed codes read, FP8 values written
            rows.append((f"{name} {n}x{k}", m, act, wval, wbytes / wval / 1e6, wval_ptx, wbytes / wval_ptx / 1e6, mm, rowwise, mm / rowwise, bf16,
                         whole_graph, whole_eager, bf16 / whole_graph, *parts_host))
    headers = ["shape NxK", "M", "act quant us", "weight values pure-Triton us", "pure-Triton TB/s", "weight values PTX us",
               "weight values PTX TB/s", "block-scaled mm us",
               "row-scaled FP8 mm us", "block / row", "bf16 us", "whole graph us", "whole eager us",
               "whole graph x bf16", "host us: act quant", "weight values", "block-scaled mm",
               "whole w4_matmul"]
    return table(headers, rows)


def host_profile(m: int, calls: int = 200, top: int = 30) -> str:
    """cProfile of `calls` eager w4_matmul calls on the qkv shape at M = m: where the host time goes."""
    n, k = LLAMA_SHAPES["qkv"]
    weight = bitmod_weight_copies(n, k, 1)[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        w4_matmul(x, weight, None, "fp8_e4m3")
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for i in range(calls):
        w4_matmul(x, weight, None, "fp8_e4m3")
        if i % 4 == 3:
            torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return f"host profile, w4_matmul qkv {n}x{k} M={m}, {calls} calls (tottime, s):\n{text.getvalue()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--host-profile", action="store_true", help="print a cProfile of the eager call instead")
    args = parser.parse_args()
    print(environment())
    if args.host_profile:
        for m in args.ms:
            print(host_profile(m))
        return
    print(run(tuple(args.ms)))


if __name__ == "__main__":
    main()
