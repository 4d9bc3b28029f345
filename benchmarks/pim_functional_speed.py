"""Wall time of the bit-exact functional PIM GEMV (4096 x 4096 W4A8) on this CPU, with a golden check.

Usage: python benchmarks/pim_functional_speed.py [--size 4096] [--repeats 5]
Prints the median seconds per GEMV for BitMoD and INT4 weights, on the exact-product fast path (default
PeConfig) and on the truncating gather path (frac_bits=5), and checks the first rows of each result
against the independent numpy golden model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from p3quant.formats import BITMOD4, INT4, BitMoDTensor, quantize_scaled_fp8
from p3quant.pim_emulator import golden
from p3quant.pim_emulator.arith_p3 import PeConfig
from p3quant.pim_emulator.functional import linear_accumulators, pim_linear

CHECK_ROWS = 64


def _golden_rows(x, w, cfg: PeConfig, rows: int) -> np.ndarray:
    g = w.group_size
    if isinstance(w, BitMoDTensor):
        ints = golden.bitmod_integers(w.packed[:rows].numpy(), w.selectors[:rows].numpy(), g)
    else:
        ints = golden.int4_integers(w.packed[:rows].numpy(), w.zeros[:rows].numpy(), g)
    codes = x.codes.numpy().reshape(x.codes.shape[0], 1, -1, g)
    acc, _ = golden.dot(codes, ints.reshape(1, rows, -1, g), "fp8_e4m3", acc_bits=cfg.acc_bits,
                        frac_bits=cfg.frac_bits, truncation=cfg.truncation, on_overflow=cfg.on_overflow)
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    w_float = torch.randn(args.size, args.size)
    x = quantize_scaled_fp8(torch.randn(args.batch, args.size) * torch.exp(torch.randn(args.batch, args.size)))
    for name, w in (("bitmod", BITMOD4.quantize(w_float, args.group)), ("int4", INT4.quantize(w_float, args.group))):
        for label, cfg in (("exact (default)", PeConfig()), ("truncating frac_bits=5", PeConfig(frac_bits=5))):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                pim_linear(x, w, cfg)
                times.append(time.perf_counter() - start)
            acc, _, _ = linear_accumulators(x, w, cfg)
            exact = np.array_equal(acc[:, :CHECK_ROWS].numpy(), _golden_rows(x, w, cfg, CHECK_ROWS))
            print(f"{name:6s} {label:24s} {args.batch}x{args.size}x{args.size}: median {statistics.median(times):.3f} s "
                  f"(min {min(times):.3f}, max {max(times):.3f}); golden match on {CHECK_ROWS} rows: {exact}")


if __name__ == "__main__":
    main()
