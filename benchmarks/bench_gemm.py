"""GEMM benchmark: p3quant's fused W4A8 / W4A16 BitMoD dequant-GEMM vs 16-bit (bf16 or fp16) cuBLAS, torch's int4 tinygemm
and FP8 torch._scaled_mm (and, with --gemlite, GemLite's 4-bit W4A16 / W4A8 layers), on Llama-3.1-8B decoder
shapes (and 8192x8192) over M = 1..4096.

W4A8 runs the tensor-core small-M kernel at gemm_w4.MMA_MIN_M <= M <= MMA_MAX_M and dequantizes the weight once
and multiplies with cuBLAS at M >= DEQUANT_MIN_M (FP8 with block scales, or an fp16 copy); the "small-M" columns
(one per operand variant, gemm_w4.MMA_VARIANT), the "fused" column (the tiled kernel, used only where those bounds
leave a gap) and the "dequant" columns time each W4A8 path at every M > 1 (small-M up to MMA_MAX_M) so the
thresholds can be read off the table; the small-M columns also at M = 1, against the GEMV. W4A16 ("W4A16" column)
takes the same small-M kernel and, from DEQUANT_MIN_M, a 16-bit dequantized copy and cuBLAS.

At M >= DEQUANT_MIN_M the "dequant" column times the fp16 copy of the weight and the "FP8 block-scaled" column
the FP8 values with cuBLAS's 1x128 block scales (the default with groups of 128 on Hopper).

Eager timing (the default) includes each call's host time, which dominates small M on a slow host CPU; --graph
times every column by CUDA-graph replay instead (GPU time alone, the figure that a captured decode step sees), and a
column whose calls cannot be captured reads nan, with the reason under the table.

Run: python benchmarks/bench_gemm.py [--quick] [--graph] [--dtype bf16|fp16] [--gemlite [--gemlite-autotune fast|default|max]
[--gemlite-config NAME]] [--ms M ...] [--shapes NAME ...] [--skip-fused]. Prints each row as it is measured (so that a run cut short still
reports), then the markdown table.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Sequence

import torch

from p3quant.kernels import gemm_w4
from p3quant.kernels.gemm_w4 import w4_matmul

from p3quant.kernels import act_quant  # noqa: E402

act_quant.ACTIVATION_REUSE = False  # each call times one linear layer, its own activation quantization included

try:
    from ._common import (GEMM_SHAPES, bench_rotating, bitmod_weight_copies, copies_for, copy_bandwidth_tbs, environment,
                          graph_rotating_us, table)
except ImportError:
    from _common import (GEMM_SHAPES, bench_rotating, bitmod_weight_copies, copies_for, copy_bandwidth_tbs, environment,
                         graph_rotating_us, table)

SHAPES = GEMM_SHAPES
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
GROUP = 128


def _tinygemm(n: int, k: int, copies: int):
    """torch's int4 tinygemm operands (None where this torch build lacks the op)."""
    try:
        out = []
        for _ in range(copies):
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
            sz = torch.randn(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
            out.append((packed, sz))
        return out
    except (RuntimeError, AttributeError):
        return None


def _gemlite(n: int, k: int, copies: int, dtype: torch.dtype) -> tuple[list, list] | tuple[None, str]:
    """GemLite's 4-bit asymmetric group-128 layers (W4A16, and W4A8 with dynamic per-token FP8 activations) on random
    codes, one per weight copy; (None, reason) where gemlite is missing or cannot build them."""
    try:
        from gemlite.helper import A8W4_HQQ_INT_dynamic, A16W4_HQQ_INT
    except Exception as err:  # noqa: BLE001  (missing, or failing to import against this torch / Triton)
        return None, f"not run: {type(err).__name__}: {str(err)[:120]} (benchmarks/fetch_baseline_wheels.sh fetches it)"
    a16, a8 = [], []
    try:
        for _ in range(copies):
            codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
            scales = torch.rand(n, k // GROUP, device="cuda", dtype=dtype) * 0.01 + 0.001
            zeros = torch.full((n, k // GROUP), 8.0, device="cuda", dtype=dtype)
            a16.append(A16W4_HQQ_INT(device="cuda", dtype=dtype).from_weights(codes, scales, zeros))
            a8.append(A8W4_HQQ_INT_dynamic(device="cuda", dtype=dtype).from_weights(codes, scales, zeros))
    except Exception as err:  # noqa: BLE001  (a baseline that cannot run here is reported, not fatal)
        return None, f"failed: {type(err).__name__}: {str(err)[:120]}"
    return a16, a8


def _forced(path: str, fn):
    """Time fn with the W4A8 path forced to "mma_halves", "mma_quarters" or "mma_fp8" (the small-M kernel's
    variants), "fused" (tiled), "dequant" (fp16 copy of the weight + cuBLAS) or "blockwise" (FP8 values + cuBLAS
    with block scales, where it applies)."""
    def call():
        saved = gemm_w4.DEQUANT_MIN_M, gemm_w4.MMA_MIN_M, gemm_w4.MMA_MAX_M, gemm_w4.FP8_BLOCKWISE, gemm_w4.MMA_VARIANT
        gemm_w4.DEQUANT_MIN_M = 2 if path in ("dequant", "blockwise") else 1 << 30
        gemm_w4.MMA_MIN_M, gemm_w4.MMA_MAX_M = (1, saved[2]) if path.startswith("mma") else (1 << 30, 0)
        gemm_w4.FP8_BLOCKWISE = path == "blockwise"
        gemm_w4.MMA_VARIANT = path[4:] if path.startswith("mma_") else saved[4]
        try:
            return fn()
        finally:
            gemm_w4.DEQUANT_MIN_M, gemm_w4.MMA_MIN_M, gemm_w4.MMA_MAX_M, gemm_w4.FP8_BLOCKWISE, gemm_w4.MMA_VARIANT = saved
    return call


def _graph_timer(failures: dict[str, str]) -> Callable[[Sequence[Callable[[], object]], str], float]:
    """A timer of rotated calls by CUDA-graph replay; a column that cannot be captured reads nan and its first
    error is kept in `failures` (column name -> reason)."""
    def time_calls(calls: Sequence[Callable[[], object]], column: str) -> float:
        try:
            return graph_rotating_us(calls)
        except Exception as err:  # noqa: BLE001  (a baseline that cannot be captured is reported, not fatal)
            torch.cuda.synchronize()
            failures.setdefault(column, f"{type(err).__name__}: {str(err)[:160]}")
            return float("nan")
    return time_calls


def run(quick: bool = False, gemlite: bool = False, ms: tuple[int, ...] | None = None,
        skip_fused: bool = False, shapes: tuple[str, ...] | None = None, graph: bool = False,
        dtype: torch.dtype = torch.bfloat16) -> tuple[str, list[dict]]:
    """Benchmark every shape and M (with GemLite's W4A16 / W4A8 layers if `gemlite`); returns the markdown table
    and the raw rows. `ms` replaces the list of M, `shapes` the shapes (names of GEMM_SHAPES); `skip_fused`
    leaves out the tiled kernel's column; `graph` times CUDA-graph replays instead of eager calls; `dtype` (bf16 or
    fp16) is the activations', the 16-bit baseline's and GemLite's (tinygemm runs in bf16 only)."""
    base = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    unknown = set(shapes or ()) - set(SHAPES)
    if unknown:
        raise ValueError(f"bench_gemm: unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    copy_bw = copy_bandwidth_tbs()
    rows, raw = [], []
    gemlite_notes = []
    graph_failures: dict[str, str] = {}
    timed = _graph_timer(graph_failures) if graph else (lambda calls, column: bench_rotating(calls))
    ms = ms or ((1, 16, 64, 256, 1024, 4096) if quick else MS)
    for name, (n, k) in SHAPES.items():
        if shapes and name not in shapes:
            continue
        wbytes = n * k // 2 + n * (k // GROUP) * 3
        ncopy = copies_for(wbytes)
        weights = bitmod_weight_copies(n, k, ncopy, GROUP)
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies_for(n * k * 2))]
        tiny = _tinygemm(n, k, copies_for(n * k // 2)) if dtype == torch.bfloat16 else None
        fp8w = [d.to(torch.float8_e4m3fn) for d in dense]
        scale_b = torch.ones(1, n, device="cuda")
        gl16 = gl8 = None
        if gemlite:
            gl16, gl8 = _gemlite(n, k, copies_for(wbytes), dtype)
            if gl16 is None:
                gemlite_notes.append(f"GemLite {name}: {gl8}")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            p3 = timed([lambda w=w: w4_matmul(x, w, None, "fp8_e4m3") for w in weights], "P3 W4A8")
            fused = dq = bw = mma = mma4 = mma8 = float("nan")
            if m <= gemm_w4.MMA_MAX_M:  # at M = 1 too, against the GEMV
                mma, mma4, mma8 = (timed([_forced(f"mma_{variant}", lambda w=w: w4_matmul(x, w, None, "fp8_e4m3")) for w in weights],
                                         f"small-M {variant}") for variant in gemm_w4.MMA_VARIANTS)
            if m > 1 and not skip_fused:
                fused = timed([_forced("fused", lambda w=w: w4_matmul(x, w, None, "fp8_e4m3")) for w in weights], "fused")
            if m > 1:
                dq = timed([_forced("dequant", lambda w=w: w4_matmul(x, w, None, "fp8_e4m3")) for w in weights], "dequant")
                bw = timed([_forced("blockwise", lambda w=w: w4_matmul(x, w, None, "fp8_e4m3")) for w in weights], "block-scaled")
            a16 = timed([lambda w=w: w4_matmul(x, w, None, "none") for w in weights], "W4A16") if m in (1, 16, 64) or not quick else float("nan")
            dense_us = timed([lambda d=d: x @ d.t() for d in dense], base)
            tg = float("nan")
            if tiny is not None:
                tg = timed([lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, s) for p, s in tiny], "tinygemm")
            f8 = float("nan")
            if m % 16 == 0:
                xa = x.to(torch.float8_e4m3fn)
                scale_a = torch.ones(m, 1, device="cuda")
                f8 = timed([lambda d=d: torch._scaled_mm(xa, d.t(), scale_a, scale_b, out_dtype=dtype) for d in fp8w], "fp8 scaled_mm")
            g16 = g8 = float("nan")
            if gl16 is not None:
                g16 = timed([lambda layer=layer: layer(x) for layer in gl16], "GemLite W4A16")
                g8 = timed([lambda layer=layer: layer(x) for layer in gl8], "GemLite W4A8")
            moved = wbytes + m * k * 4 + m * n * 2
            tbs = moved / p3 / 1e6
            raw.append(dict(shape=name, n=n, k=k, m=m, p3_us=p3, mma_us=mma, fused_us=fused, dequant_us=dq, blockwise_us=bw, mma_quarters_us=mma4, mma_fp8_us=mma8, a16_us=a16, dense_us=dense_us,
                            tinygemm_us=tg, fp8_us=f8, gemlite_a16_us=g16, gemlite_a8_us=g8, tbs=tbs))
            rows.append((f"{name} {n}x{k}", m, p3, tbs, 100 * tbs / copy_bw, dense_us, dense_us / p3, mma, mma4, mma8, fused, dq, bw, a16, dense_us / a16, tg,
                         dense_us / tg, f8) + ((g16, dense_us / g16, g8, dense_us / g8) if gemlite else ()))
            print(table([""] * len(rows[-1]), rows[-1:]).splitlines()[-1], flush=True)  # the row, as the table prints it
    headers = ["shape NxK", "M", "P3 W4A8 us", "TB/s", "% copy BW", f"{base} us", f"W4A8 x {base}", "W4A8 small-M halves us", "W4A8 small-M quarters us", "W4A8 small-M FP8 us", "W4A8 fused us",
               "W4A8 dequant+cuBLAS us", "W4A8 FP8 block-scaled cuBLAS us",
               "W4A16 us", f"W4A16 x {base}", "tinygemm us", f"tinygemm x {base}", "fp8 scaled_mm us"]
    if gemlite:
        headers += ["GemLite W4A16 us", f"GemLite W4A16 x {base}", "GemLite W4A8 us", f"GemLite W4A8 x {base}"]
        gemlite_notes.insert(0, f"GemLite: 4-bit asymmetric, groups of 128, {base} layers, its own autotuning; W4A8 = dynamic "
                                "per-token FP8 activations")
    summary = [f"measured copy bandwidth: {copy_bw:.2f} TB/s (read + write); W4A8 small-M kernel for M = {gemm_w4.MMA_MIN_M}.."
               f"{gemm_w4.MMA_MAX_M}, from M = {gemm_w4.DEQUANT_MIN_M} the FP8 block-scaled cuBLAS path (groups of 128; "
               f"refused here: {dict(gemm_w4._blockwise_unsupported) or 'no'}) or else the fp16 dequant path",
               "timing: " + ("CUDA-graph replay (GPU time alone)" if graph else "eager calls (host time included)")]
    summary += gemlite_notes + [f"not capturable in a CUDA graph, {col}: {why}" for col, why in graph_failures.items()]
    for m in ms:
        sel = [r for r in raw if r["m"] == m and r["shape"] != "sq8192"]
        if sel:
            mean = sum(r["dense_us"] / r["p3_us"] for r in sel) / len(sel)
            tg = [r["dense_us"] / r["tinygemm_us"] for r in sel]
            line = f"M={m}: mean speedup over {base} on the 4 Llama shapes: W4A8 {mean:.2f}x, tinygemm {sum(tg) / len(tg):.2f}x"
            if gemlite:
                for label, key in (("W4A16", "gemlite_a16_us"), ("W4A8", "gemlite_a8_us")):
                    gl = [r["dense_us"] / r[key] for r in sel]
                    line += f", GemLite {label} {sum(gl) / len(gl):.2f}x"
            summary.append(line)
    return table(headers, rows) + "\n\n" + "\n".join(summary), raw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--graph", action="store_true", help="time CUDA-graph replays (GPU time alone) instead of eager calls")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                        help="activations, 16-bit baseline and GemLite layers (tinygemm runs in bf16 only)")
    parser.add_argument("--gemlite", action="store_true", help="also time GemLite's W4A16 and W4A8 layers (its autotuning takes minutes)")
    parser.add_argument("--ms", type=int, nargs="+", help="the values of M (default: all, or --quick's six)")
    parser.add_argument("--skip-fused", action="store_true", help="leave out the tiled fused kernel's column (slow at large M)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="the shapes (default: all)")
    parser.add_argument("--gemlite-autotune", choices=["fast", "default", "max"],
                        help="GemLite's autotuning mode (gemlite.set_autotune; its default is 'fast', which took over "
                             "4 minutes for the --quick grid on an H200; 'default' takes its fixed configs)")
    parser.add_argument("--gemlite-config", help="a GemLite tuned-config file to load first: a path, or the name of one "
                                                 "GemLite ships (e.g. h100; it loads one by itself only where the GPU's "
                                                 "name contains the file's)")
    args = parser.parse_args()
    if (args.gemlite_autotune or args.gemlite_config) and not args.gemlite:
        parser.error("--gemlite-autotune and --gemlite-config need --gemlite")
    print(environment(), flush=True)
    if args.gemlite_autotune or args.gemlite_config:
        import gemlite

        if args.gemlite_autotune:
            gemlite.set_autotune(args.gemlite_autotune)
        if args.gemlite_config:
            path = args.gemlite_config
            if not os.path.exists(path):
                path = os.path.join(os.path.dirname(gemlite.__file__), "configs", f"{args.gemlite_config}.json")
            if not os.path.exists(path) or not gemlite.load_config(path):
                parser.error(f"--gemlite-config: cannot load {path}")
            print(f"GemLite configs loaded from {path}", flush=True)
    text, _ = run(args.quick, args.gemlite, tuple(args.ms) if args.ms else None, args.skip_fused,
                  tuple(args.shapes) if args.shapes else None, args.graph,
                  torch.float16 if args.dtype == "fp16" else torch.bfloat16)
    print(text)


if __name__ == "__main__":
    main()
