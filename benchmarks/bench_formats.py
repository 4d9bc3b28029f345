"""Time the format quantizers on decoder-sized tensors: BitMoD and INT4 weights, FP8/INT8 per-token activations.

Usage: python benchmarks/bench_formats.py [--threads N] [--repeats R] [--device cpu|cuda]
Prints the machine, the torch version, the shapes and a markdown table (best and median of R timed runs after
one warm-up run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

from p3quant.formats import BITMOD4, INT4
from p3quant.quantizers import quantize_activation


def cpu_model() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_it(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of `fn` over `repeats` runs, after one warm-up run."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="activation rows (tokens) for the per-token quantizers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    w = torch.randn(args.out_features, args.in_features, device=device) * 0.02
    x = torch.randn(args.tokens, args.in_features, device=device)
    g = args.group_size
    cases: list[tuple[str, str, Callable[[], object]]] = [
        (f"BITMOD4.quantize g{g}", f"{tuple(w.shape)}", lambda: BITMOD4.quantize(w, g)),
        (f"INT4.quantize asym g{g}", f"{tuple(w.shape)}", lambda: INT4.quantize(w, g)),
        (f"INT4.quantize sym g{g}", f"{tuple(w.shape)}", lambda: INT4.quantize(w, g, symmetric=True)),
        ("FP8-E4M3 per-token activation", f"{tuple(x.shape)}", lambda: quantize_activation(x, "fp8_e4m3")),
        ("INT8 per-token activation", f"{tuple(x.shape)}", lambda: quantize_activation(x, "int8")),
    ]

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",) * 3
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {' '.join(f'{v:.2f}' for v in load)}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}, "
          f"intra-op threads {torch.get_num_threads()}, {args.repeats} timed runs after 1 warm-up")
    print()
    print("| operation | shape | best (s) | median (s) | elements/s (best) |")
    print("|---|---|---|---|---|")
    for name, shape, fn in cases:
        times = time_it(fn, args.repeats, device)
        numel = w.numel() if name.startswith(("BITMOD4", "INT4")) else x.numel()
        best = min(times)
        print(f"| {name} | {shape} | {best:.3f} | {statistics.median(times):.3f} | {numel / best:.3g} |")


if __name__ == "__main__":
    main()
