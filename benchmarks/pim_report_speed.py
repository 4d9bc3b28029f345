"""Time the PIM emulator itself: the fast-path pim-report grid and one command-level decode token.

Run: python benchmarks/pim_report_speed.py
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy

from p3quant.pim_emulator.command_model import command_gemv
from p3quant.pim_emulator.dram import HBM2
from p3quant.pim_emulator.models import PAPER_MODELS, get_model
from p3quant.pim_emulator.report import run_grid
from p3quant.pim_emulator.system_model import decode_step
from p3quant.pim_emulator.systems import ALL_SYSTEMS, get_system
from p3quant.pim_emulator.timing import pim_gemv


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def command_token_all_layers() -> None:
    """One Llama-3.1-8B decode token with every layer's GEMVs sequenced (no layer aggregation)."""
    m, s = get_model("llama-3.1-8b"), get_system("p3-llm")
    for _ in range(m.layers):
        for cout, cin in m.linear_shapes().values():
            command_gemv(HBM2, s.pcu, cout=cout, cin=cin, n_inputs=1, weight_bits=4, input_bits=8)
    command_gemv(HBM2, s.pcu, cout=m.vocab, cin=m.hidden, n_inputs=1, weight_bits=4, input_bits=8)


def main() -> None:
    print(f"python {platform.python_version()}, numpy {numpy.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {sys.platform}")
    m, s = get_model("llama-3.1-8b"), get_system("p3-llm")
    rows = [
        (f"fast-path report: {len(PAPER_MODELS)} models x 4 batches x {len(ALL_SYSTEMS)} systems",
         best_of(lambda: run_grid(PAPER_MODELS, ALL_SYSTEMS, (1, 2, 4, 8), 4096)), 2.0),
        ("command-level report grid (same 200 steps)",
         best_of(lambda: run_grid(PAPER_MODELS, ALL_SYSTEMS, (1, 2, 4, 8), 4096, pim_model="command"), 1), None),
        ("command-level step, llama-3.1-8b b1 (layers aggregated)",
         best_of(lambda: decode_step(m, s, 1, 4096, gemv=command_gemv)), 60.0),
        ("command-level token, llama-3.1-8b b1, all 32 layers + lm_head sequenced",
         best_of(command_token_all_layers, 1), 60.0),
        ("closed-form step, llama-3.1-8b b1", best_of(lambda: decode_step(m, s, 1, 4096, gemv=pim_gemv)), None),
    ]
    print(f"{'what':<75}{'seconds':>10}{'target':>10}")
    for what, sec, target in rows:
        print(f"{what:<75}{sec:>10.4f}{(f'< {target:g}' if target else '-'):>10}")


if __name__ == "__main__":
    main()
