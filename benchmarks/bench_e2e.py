"""End-to-end decode benchmark: a Llama-3.1-8B-shaped LlamaForCausalLM with random weights, bf16 transformers
vs p3quant W4A8KV4P8 on the triton backend, batch {1, 8}, 4K-token prompts.

Per-token latency = (time of generate(new=1+N) - time of generate(new=1)) / N, so prefill cancels out.
Both run eagerly with transformers' default (dynamic) cache: static cache + torch.compile were not used
(see RESULTS.md). Run: python benchmarks/bench_e2e.py [--layers L] [--new-tokens N].
"""

from __future__ import annotations

import argparse
import time

import torch

try:
    from ._common import environment, table
except ImportError:
    from _common import environment, table


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=16384, rope_theta=500000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)  # HF init: normal(0, 0.02) weights, never zeros
        torch.set_default_dtype(torch.float32)
    return model.eval()


def _timed_generate(model, ids: torch.Tensor, new: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_latency(model, batch: int, context: int, new_tokens: int) -> float:
    """Seconds per decoded token (median of 2 differences), prefill excluded."""
    ids = torch.randint(0, 128000, (batch, context), device="cuda")
    _timed_generate(model, ids, 2)  # warm-up (Triton autotuning, allocator)
    diffs = [(_timed_generate(model, ids, 1 + new_tokens) - _timed_generate(model, ids, 1)) / new_tokens for _ in range(2)]
    return sorted(diffs)[0]


def run(layers: int = 32, context: int = 4096, new_tokens: int = 32, batches=(1, 8)) -> str:
    import p3quant

    model = build_model(layers)
    rows = []
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for label in ("bf16 transformers", "p3quant W4A8KV4P8 triton"):
        if label.startswith("p3quant"):
            start = time.perf_counter()
            p3quant.quantize(model, p3quant.P3Config.preset("w4a8kv4p8", backend="triton"))
            torch.cuda.synchronize()
            print(f"quantized {layers} layers in {time.perf_counter() - start:.1f} s", flush=True)
        torch.cuda.empty_cache()
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**30
        for batch in batches:
            torch.cuda.reset_peak_memory_stats()
            try:
                latency = decode_latency(model, batch, context, new_tokens)
            except torch.OutOfMemoryError as err:
                rows.append((label, batch, "OOM", "", "", f"{weights:.1f}", str(err)[:60]))
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            results[(label, batch)] = (latency, peak)
            rows.append((label, batch, latency * 1e3, batch / latency, peak, f"{weights:.1f}", ""))
    for batch in batches:
        base, p3 = results.get(("bf16 transformers", batch)), results.get(("p3quant W4A8KV4P8 triton", batch))
        if base and p3:
            rows.append(("speedup p3/bf16", batch, base[0] / p3[0], "", "", "", ""))
    headers = ["model", "batch", "ms / token", "tokens / s", "peak GiB", "weights+buffers GiB", "note"]
    return f"Llama-3.1-8B shape, {layers} layers, context {context}, {new_tokens} timed decode tokens\n" + table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(environment())
    print(run(args.layers, args.context, args.new_tokens))


if __name__ == "__main__":
    main()
