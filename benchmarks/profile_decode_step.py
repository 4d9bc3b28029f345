"""Where a P3 decode step's GPU time goes: kernel time by kernel name (torch.profiler) over the decode steps of
p3quant.generate on the static cache (eager launches: the same kernels a CUDA-graph replay runs, so their GPU
durations match), Llama-3.1-8B shape with random weights. Prints a table of the top kernels, per decode token.
Programmatic dependent launch stays off here (P3QUANT_PDL is ignored): a kernel launched with it starts early and
waits for its predecessor, so its measured duration would include that wait.

Run: python benchmarks/profile_decode_step.py [--layers 32] [--context 4096] [--batch 1] [--tokens 16]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

try:
    from ._common import environment, table
    from .bench_e2e import build_model
except ImportError:
    from _common import environment, table
    from bench_e2e import build_model


def kernel_breakdown(layers: int, context: int, batch: int, tokens: int, top: int = 20) -> str:
    import p3quant
    from p3quant.kernels import common

    common.USE_PDL = False
    model = build_model(layers)
    p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", backend="triton"))
    ids = torch.randint(0, 128000, (batch, context), device="cuda")
    p3quant.generate(model, ids, 2)  # compile every kernel for these shapes
    times = {}
    for new in (1, 1 + tokens):  # the difference of two profiles removes the prefill
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            p3quant.generate(model, ids, new)
            torch.cuda.synchronize()
        times[new] = {e.key: (e.device_time_total, e.count) for e in prof.key_averages()}
    rows = []
    for name, (total, count) in times[1 + tokens].items():
        base, base_count = times[1].get(name, (0.0, 0))
        us, calls = (total - base) / tokens, (count - base_count) / tokens
        if us > 0:
            rows.append((name[:90], us, calls))
    rows.sort(key=lambda r: -r[1])
    step = sum(r[1] for r in rows)
    out = [(name, us, 100 * us / step, calls) for name, us, calls in rows[:top]]
    return (f"decode step kernels, {layers} layers, context {context}, batch {batch} ({tokens} tokens, prefill removed): "
            f"{step:.0f} us of kernel time per token\n" + table(["kernel", "us / token", "% of step", "launches / token"], out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    print(environment())
    print(kernel_breakdown(args.layers, args.context, args.batch, args.tokens))


if __name__ == "__main__":
    main()
