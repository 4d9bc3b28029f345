"""Host (Python) time of the triton backend's kernel wrappers and of an eager decode step, without a GPU.

Runs in Triton's CPU interpreter with every kernel launch replaced by a no-op, so what is timed is the wrappers'
own work: checks, allocations, grid arithmetic, activation-reuse bookkeeping. On a GPU this is the per-token host
cost of decoding without a CUDA graph (transformers' generate). The model part prefills for real (in the
interpreter: tens of seconds), then stubs the launches and takes the KV append's GPU host path.

Run: python benchmarks/host_overhead_cpu.py
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined

import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(max(5, calls // 40)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def wrapper_times(calls: int = 2000) -> list[tuple[str, float]]:
    """us per call of each decode-step wrapper with its kernels stubbed (small shapes: host cost does not scale)."""
    from p3quant.attention_math import QuantizedKV
    from p3quant.formats import BITMOD4
    from p3quant.kernels import act_quant, decode_attention, gemm_w4, rmsnorm, rope, silu_mul, w4_mma
    from p3quant.quantizers import key_smoothing_factor, quantize_keys, quantize_values

    stubbed = {gemm_w4: ["_w4_gemv_kernel"], act_quant: ["_act_quant_kernel", "_codes_from_chunk_amax_kernel"],
               rmsnorm: ["_rmsnorm_kernel"], decode_attention: ["_scores_kernel", "_pv_kernel", "_combine_kernel"],
               rope: ["_rope_kernel"], silu_mul: ["_silu_mul_kernel"], w4_mma: ["_w4_mma_kernel", "_rows_epilogue_kernel"]}
    saved = {(module, name): getattr(module, name) for module, names in stubbed.items() for name in names}
    reuse = act_quant.ACTIVATION_REUSE
    try:
        for module, name in saved:
            setattr(module, name, _NoLaunch())
        act_quant.ACTIVATION_REUSE = False  # each call does its own quantization's bookkeeping
        gen = torch.Generator().manual_seed(0)
        w = BITMOD4.quantize(torch.randn(512, 256, generator=gen), 128)
        x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
        g = torch.ones(256, dtype=torch.bfloat16)
        k, v = torch.randn(1, 2, 64, 32, generator=gen), torch.randn(1, 2, 64, 32, generator=gen)
        s = key_smoothing_factor(k)
        kv = QuantizedKV(quantize_keys(k[:, :, :-1], s), quantize_values(v[:, :, :-1]), s, k[:, :, -1:], v[:, :, -1:])
        q = torch.randn(1, 8, 1, 32, generator=gen)
        cos, sin = torch.randn(1, 1, 32).to(torch.bfloat16), torch.randn(1, 1, 32).to(torch.bfloat16)
        qq, kk = torch.randn(1, 8, 1, 32).to(torch.bfloat16), torch.randn(1, 2, 1, 32).to(torch.bfloat16)
        calls_by_name = {
            "w4_matmul M=1 (with its activation quantization)": lambda: gemm_w4.w4_matmul(x, w),
            "w4_matmul M=4 (small-M kernel)": lambda: gemm_w4.w4_matmul(x.expand(4, 256), w),
            "p3_decode_attention": lambda: decode_attention.p3_decode_attention(q, kv, None, 0.1),
            "apply_rotary": lambda: rope.apply_rotary(qq, kk, cos, sin),
            "rms_norm with FP8 codes": lambda: rmsnorm.rms_norm(x, g, 1e-5, "split"),
            "silu_mul with FP8 codes": lambda: silu_mul.silu_mul(x, x, "split"),
        }
        return [(name, _per_call_us(fn, calls)) for name, fn in calls_by_name.items()]
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)
        act_quant.ACTIVATION_REUSE = reuse


def eager_step_us_per_layer(layers: int = 4, steps: int = 50) -> float:
    """Host us per layer of an eager decode step (transformers forward, P3 cache) under torch.inference_mode."""
    import p3quant
    import p3quant.nn.kv_cache as kv_cache
    from p3quant.nn.patching import cache_argument
    from transformers import LlamaConfig, LlamaForCausalLM
    from triton.runtime.interpreter import GridExecutor

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", backend="triton"))
    ids = torch.randint(0, 1000, (1, 16))
    launch, use_append_kernel = GridExecutor.__call__, kv_cache._use_append_kernel
    try:
        with torch.inference_mode():
            out = model(ids, use_cache=True)  # a real prefill: the cache holds valid tokens
            cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.2x
            GridExecutor.__call__ = lambda self, *args, **kwargs: None
            kv_cache._use_append_kernel = lambda x: x.stride(-1) == 1  # the GPU's host path for the KV append
            token = ids[:, -1:]
            step_us = _per_call_us(lambda: model(token, use_cache=True, **{cache_argument(model): cache}), steps)
    finally:
        GridExecutor.__call__, kv_cache._use_append_kernel = launch, use_append_kernel
    return step_us / layers


def main() -> None:
    import platform

    import triton

    print(f"CPU host time, kernel launches stubbed: python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {os.cpu_count()} cores")
    for name, us in wrapper_times():
        print(f"{name}: {us:.1f} us per call")
    print(f"eager decode step (4-layer Llama shape, hidden 256, inference_mode): {eager_step_us_per_layer():.0f} us per layer")


if __name__ == "__main__":
    main()
