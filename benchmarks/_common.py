"""Shared helpers of the GPU benchmarks: environment header, median timing over rotated inputs, copy bandwidth."""

from __future__ import annotations

import datetime
import itertools
import platform
import subprocess
from typing import Callable, Sequence

import torch
import triton

L2_FLUSH_BYTES = 200 * 2**20  # rotate inputs over more than 3x the H100/H200 L2 (50-60 MB)
# Llama-3.1-8B decoder GEMM shapes (N x K; qkv and gate_up fused) and a square one
LLAMA_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMM_SHAPES = {**LLAMA_SHAPES, "sq8192": (8192, 8192)}


def environment() -> str:
    """One line per fact: GPU, driver, versions, date."""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        driver = "unknown"
    props = torch.cuda.get_device_properties(0)
    return "\n".join([
        f"GPU: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), driver {driver}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, python {platform.python_version()}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
    ])


def bitmod_weight_copies(n: int, k: int, copies: int, group: int = 128) -> list:
    """Random BitMoD weights [n, k], quantized once and copied so that timing rotates through distinct memory."""
    from p3quant.formats import BITMOD4

    w = BITMOD4.quantize(torch.randn(n, k, device="cuda"), group)
    return [w] + [type(w)(w.packed.clone(), w.scales.clone(), w.selectors.clone(), w.shape, w.group_size) for _ in range(copies - 1)]


def copies_for(nbytes: int) -> int:
    """How many copies of an input to rotate through so repeated runs miss the L2 cache."""
    return max(1, min(64, -(-L2_FLUSH_BYTES // max(nbytes, 1))))


def bench_rotating(calls: Sequence[Callable[[], object]], rep_ms: int = 60) -> float:
    """Median microseconds of one call, cycling through `calls` (each bound to its own copy of the inputs)."""
    cycle = itertools.cycle(calls)
    return triton.testing.do_bench(lambda: next(cycle)(), warmup=10, rep=rep_ms, return_mode="median") * 1e3


def graph_rotating_us(calls: Sequence[Callable[[], object]], reps: int = 50) -> float:
    """Median us per call of a CUDA graph cycling through `calls` (distinct weight copies: L2 misses)."""
    for c in calls:
        c()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for c in calls:
                c()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=reps, return_mode="median") * 1e3 / len(calls)


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written), 4 GiB buffers."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    us = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median") * 1e3
    return 2 * src.numel() * 4 / us / 1e6


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Markdown table."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
