"""Decode-attention benchmark: p3quant's fused kernel over the packed INT4 cache (FP8 query, UE4M4 P) vs
torch SDPA on a bf16 cache, Llama-3.1-8B heads (32 q / 8 kv, head_dim 128), residual window R = 1.

Also transformers' QuantizedCache (4-bit, hqq or optimum-quanto backend, whichever is installed; eager, as
transformers runs it), which dequantizes the whole cache to bf16 every step before SDPA.
Run: python benchmarks/bench_decode_attention.py [--quick]. Prints a markdown table last.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from p3quant.attention_math import QuantizedKV
from p3quant.formats import Int4Tensor
from p3quant.kernels.decode_attention import p3_decode_attention
from p3quant.kernels.kv_append import append_kv, key_smoothing_factor_gpu

try:
    from ._common import bench_rotating, copies_for, copy_bandwidth_tbs, environment, graph_rotating_us, table
except ImportError:
    from _common import bench_rotating, copies_for, copy_bandwidth_tbs, environment, graph_rotating_us, table

HEADS, KV_HEADS, HEAD_DIM, RESIDUAL = 32, 8, 128, 1
BATCHES = (1, 4, 16)
CONTEXTS = (1024, 4096, 16384, 32768, 131072)


def build_cache(k: torch.Tensor, v: torch.Tensor) -> QuantizedKV:
    """Quantize bf16 K/V [B, Hkv, T, D] into a P3 cache (all but the last RESIDUAL tokens packed), on the GPU."""
    b, h, t, d = k.shape
    n = t - RESIDUAL
    s = key_smoothing_factor_gpu(k)
    store = lambda last, dt: torch.empty(b, h, n, last, dtype=dt, device=k.device)  # noqa: E731
    kp, ks, kz = store(d // 2, torch.uint8), store(1, torch.float16), store(1, torch.uint8)
    vp, vs, vz = store(d // 2, torch.uint8), store(1, torch.float16), store(1, torch.uint8)
    append_kv(k[:, :, :n], v[:, :, :n], s, kp, ks, kz, vp, vs, vz)
    return QuantizedKV(Int4Tensor(kp, ks, kz, (b, h, n, d), d), Int4Tensor(vp, vs, vz, (b, h, n, d), d), s,
                       k[:, :, n:].contiguous(), v[:, :, n:].contiguous())


QUANTIZED_CACHE_STEPS = 256  # two residual windows: each step's share of the periodic re-quantization is included


def quantized_cache_backends() -> list[str]:
    """transformers' 4-bit QuantizedCache backends whose packages are installed (hqq, optimum-quanto)."""
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    return [name for name, available in (("hqq", is_hqq_available), ("quanto", is_optimum_quanto_available)) if available()]


def quantized_cache_step_us(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> float:
    """Mean us of one decode step's attention over transformers' QuantizedCache (4-bit, its default groups of 64 and
    128-token residual window) holding k / v: the cache update, which dequantizes every stored token to bf16, then
    SDPA, eager as transformers runs it (the cache's shapes change every step: no CUDA graph)."""
    from transformers import LlamaConfig, QuantizedCache

    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, num_hidden_layers=1)
    cache = QuantizedCache(backend=backend, config=config, nbits=4)
    cache.update(k, v, 0)  # the prompt
    new_k, new_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()

    def step():
        keys, values = cache.update(new_k, new_v, 0)
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(QUANTIZED_CACHE_STEPS):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / QUANTIZED_CACHE_STEPS


def run(quick: bool = False) -> tuple[str, list[dict]]:
    copy_bw = copy_bandwidth_tbs()
    rows, raw, errors = [], [], []
    backends = quantized_cache_backends()
    contexts = (4096, 32768) if quick else CONTEXTS
    for b in BATCHES:
        for t in contexts:
            bf16_bytes = b * KV_HEADS * t * HEAD_DIM * 2 * 2
            if bf16_bytes > 40 * 2**30:
                continue
            ncopy = copies_for(bf16_bytes)
            q = torch.randn(b, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            kvs, caches = [], []
            for _ in range(ncopy):
                k = torch.randn(b, KV_HEADS, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16) * (1 + 3 * torch.rand(HEAD_DIM, device="cuda", dtype=torch.bfloat16))
                v = torch.randn(b, KV_HEADS, t, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                kvs.append((k, v))
                caches.append(build_cache(k, v))
            scaling = HEAD_DIM**-0.5
            sdpa = bench_rotating([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in kvs])
            p3 = bench_rotating([lambda c=c: p3_decode_attention(q, c, None, scaling) for c in caches])
            sdpa_g = graph_rotating_us([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in kvs[:16]])
            p3_g = graph_rotating_us([lambda c=c: p3_decode_attention(q, c, None, scaling) for c in caches[:16]])
            p3_bytes = b * KV_HEADS * t * (HEAD_DIM + 6) + 2 * b * HEADS * t * 4
            qcache = {}
            for backend in backends:
                try:
                    qcache[backend] = quantized_cache_step_us(q, *kvs[0], backend)
                except Exception as err:  # noqa: BLE001  (a baseline that cannot run here is reported, not fatal)
                    errors.append(f"QuantizedCache({backend}) batch {b} context {t}: "
                                  f"{type(err).__name__}: {str(err)[:120]}")
                torch.cuda.empty_cache()
            raw.append(dict(batch=b, context=t, sdpa_us=sdpa, p3_us=p3, sdpa_graph_us=sdpa_g, p3_graph_us=p3_g,
                            **{f"quantized_cache_{name}_us": us for name, us in qcache.items()}))
            rows.append((b, t, sdpa, p3, sdpa / p3, sdpa_g, bf16_bytes / sdpa_g / 1e6, p3_g, p3_bytes / p3_g / 1e6,
                         100 * p3_bytes / p3_g / 1e6 / copy_bw, sdpa_g / p3_g)
                        + tuple(x for name in backends
                                for x in (qcache.get(name, "error"), qcache[name] / p3 if name in qcache else "")))
            del kvs, caches
            torch.cuda.empty_cache()
    headers = ["batch", "context", "SDPA eager us", "P3 eager us", "eager speedup", "SDPA graph us", "SDPA TB/s", "P3 graph us",
               "P3 TB/s", "P3 % copy BW", "graph speedup"]
    headers += [h for name in backends for h in (f"QuantizedCache {name} eager us", f"P3 eager x QuantizedCache {name}")]
    status = (f"4-bit, groups of 64, 128-token residual window, update + SDPA per step, "
              f"mean of {QUANTIZED_CACHE_STEPS} steps; "
              "its time includes appending the new token (and its share of re-quantizing the window), P3's columns time "
              "the attention alone (the append is a separate kernel, kv_append.append_kv_at)"
              if backends else "not run: neither hqq nor optimum-quanto is installed "
                               "(see benchmarks/fetch_baseline_wheels.sh)")
    notes = [f"measured copy bandwidth: {copy_bw:.2f} TB/s; graph = CUDA-graph replay over up to 16 cache copies (GPU time, no host launch cost)",
             f"transformers QuantizedCache ({', '.join(backends) or 'no backend'}): {status}",
             "P3 bytes = packed K and V + scales/zeros (134 B per kv-head token) + fp32 scores written and read (32 B per kv-head token)"]
    return table(headers, rows) + "\n\n" + "\n".join(notes + errors), raw


def sweep_launch(batches=(1, 4), context: int = 32768) -> str:
    """CUDA-graph time of the kernel over (block_t, context splits per (batch, kv-head), warps) at one context
    length; the last line names the fastest (block_t, warps) at the first batch size with the default split rule
    (decode_attention.PROGRAMS_PER_SM)."""
    import p3quant.kernels.decode_attention as attention

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, default_rule = [], {}
    for b in batches:
        q = torch.randn(b, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        caches = []
        for _ in range(copies_for(b * KV_HEADS * context * (HEAD_DIM + 6))):
            k = torch.randn(b, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            caches.append(build_cache(k, torch.randn_like(k)))
        default_warps = attention.NUM_WARPS
        try:
            for warps in (4, 8):
                attention.NUM_WARPS = warps
                for block_t in (64, 128, 256):
                    for programs_per_sm in (1, 2, 4, 8):
                        splits = max(1, programs_per_sm * sms // (b * KV_HEADS))
                        us = graph_rotating_us([lambda c=c: p3_decode_attention(q, c, None, HEAD_DIM**-0.5, block_t=block_t,
                                                                                num_splits=splits) for c in caches[:16]])
                        rows.append((b, context, warps, block_t, programs_per_sm, splits, us))
                    if b == batches[0]:
                        default_rule[(block_t, warps)] = graph_rotating_us(
                            [lambda c=c: p3_decode_attention(q, c, None, HEAD_DIM**-0.5, block_t=block_t) for c in caches[:16]])
        finally:
            attention.NUM_WARPS = default_warps
        del caches
        torch.cuda.empty_cache()
    best = min(default_rule, key=default_rule.get)
    return (table(["batch", "context", "warps", "block_t", "programs / SM", "splits", "P3 graph us"], rows)
            + f"\nbatch {batches[0]}, default splits: " + ", ".join(f"{k}: {v:.1f} us" for k, v in default_rule.items())
            + f"\nBEST block_t warps: {best[0]} {best[1]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time block sizes, context-split counts and warps")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep alone")
    parser.add_argument("--context", type=int, nargs="+", default=[32768], help="the sweep's context lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="the sweep's batch sizes")
    args = parser.parse_args()
    print(environment())
    if args.sweep or args.sweep_only:
        for context in args.context:
            print(sweep_launch(tuple(args.batches), context), flush=True)
    if not args.sweep_only:
        print(run(args.quick)[0])


if __name__ == "__main__":
    main()
