"""End-to-end decode benchmark: a Llama-3.1-8B-shaped LlamaForCausalLM with random weights, bf16 transformers
vs p3quant W4A8KV4P8 on the triton backend, batch {1, 8}, 4K-token prompts.

Per-token latency of the transformers rows = (time of generate(new=1+N) - time of generate(new=1)) / N, so that
prefill cancels. bf16 runs twice: eagerly with transformers' default (dynamic) cache, and with its best setting, a StaticCache
(generate then compiles the decode step with torch.compile, CUDA graphs included). p3quant runs twice: eagerly
with its P3 cache through transformers' generate, and with p3quant.GreedyDecoder (what p3quant.generate runs)
over a P3StaticCache, the decode step replayed as a CUDA graph and timed step by step after the prefill; that row
runs again with programmatic dependent launch switched on ("PDL"), which measures what it gains (every other row
launches without it, whatever P3QUANT_PDL says). The bf16 and p3quant rows use two models built alike (same seed),
so their order is free: --rounds R runs them R times in turn.
Run: python benchmarks/bench_e2e.py [--layers L] [--new-tokens N] [--rounds R].
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


def _timed_generate(model, ids: torch.Tensor, new: int, cache=None) -> float:
    extra = {}
    if cache is not None:
        cache.reset()
        from p3quant.nn.patching import cache_argument

        extra[cache_argument(model)] = cache
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=0, **extra)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_latency(model, batch: int, context: int, new_tokens: int, static: bool = False) -> float:
    """Seconds per decoded token (the better of 2 differences), prefill excluded."""
    ids = torch.randint(0, 128000, (batch, context), device="cuda")
    cache = None
    if static:  # one cache size for every call, so the compiled decode step is reused
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens + 8)
    for _ in range(2 if static else 1):  # warm-up (Triton autotuning, allocator; compilation and graph capture)
        _timed_generate(model, ids, 3, cache)
    diffs = [(_timed_generate(model, ids, 1 + new_tokens, cache) - _timed_generate(model, ids, 1, cache)) / new_tokens for _ in range(2)]
    return sorted(diffs)[0]


def static_graph_latency(model, batch: int, context: int, new_tokens: int) -> float:
    """Seconds per decoded token of p3quant's greedy decoding over a P3StaticCache with CUDA-graph replay.

    Timed directly: after the prefill, one eager step and the captured step, three windows of `new_tokens`
    replayed steps each (host launch of the replay and the token copy included, as in p3quant.generate); the
    median window is kept.
    """
    import p3quant

    ids = torch.randint(0, 128000, (batch, context), device="cuda")
    decoder = p3quant.GreedyDecoder(model, ids, 3 + 3 * new_tokens, cuda_graph=True)
    decoder.step()  # eager: kernels for the static shapes, workspaces
    decoder.step()  # captured, then replayed
    windows = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(new_tokens):
            decoder.step()
        torch.cuda.synchronize()
        windows.append((time.perf_counter() - start) / new_tokens)
    decoder.finish()
    return sorted(windows)[1]


def host_profile(model, context: int, tokens: int = 8, top: int = 30) -> str:
    """cProfile of a batch-1 generate (prefill + `tokens` decode steps): where the host time goes."""
    import cProfile
    import io
    import pstats

    ids = torch.randint(0, 128000, (1, context), device="cuda")
    profiler = cProfile.Profile()
    profiler.enable()
    _timed_generate(model, ids, tokens)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _gib(model) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**30


LABELS = ("bf16 transformers", "bf16 transformers static+compile", "p3quant W4A8KV4P8 triton", "p3quant W4A8KV4P8 triton static+graph",
          "p3quant W4A8KV4P8 triton static+graph PDL")


def run(layers: int = 32, context: int = 4096, new_tokens: int = 32, batches=(1, 8), profile: bool = False,
        labels=LABELS, rounds: int = 1, p3_first: bool = False) -> str:
    """The table of every label and batch; with rounds > 1 the labels run again in turn (bf16, p3quant, bf16, ...;
    p3quant first with p3_first), each round's speedups from its own rows, so that drift over the run (clocks,
    allocator) shows instead of favouring whichever side runs first. Models are built when first needed and
    then stay on the GPU."""
    import p3quant
    from p3quant.kernels import common

    models = {}

    def model_for(label: str):
        """bf16 rows share one model; p3quant rows a second one built alike (same seed) and quantized once."""
        kind = "bf16" if label.startswith("bf16") else "p3quant"
        if kind not in models:
            models[kind] = build_model(layers)
            if kind == "p3quant":
                start = time.perf_counter()
                p3quant.quantize(models[kind], p3quant.P3Config.preset("w4a8kv4p8", backend="triton"))
                torch.cuda.synchronize()
                print(f"quantized {layers} layers in {time.perf_counter() - start:.1f} s", flush=True)
        return models[kind]

    rows = []
    for round_ in range(1, rounds + 1):
        results: dict[tuple[str, int], tuple[float, float]] = {}
        for label in sorted((name for name in LABELS if name in labels), key=lambda name: p3_first == name.startswith("bf16")):
            model = model_for(label)
            torch.cuda.empty_cache()
            weights = _gib(model)
            others = sum(_gib(m) for m in models.values() if m is not model)
            for batch in batches:
                torch.cuda.reset_peak_memory_stats()
                pdl = label.endswith(" PDL")  # only that row launches with programmatic dependent launch
                note = ""
                if pdl and not common.pdl_supported(torch.empty(0, device="cuda")):
                    note = "PDL unsupported here: ordinary launches"
                try:
                    with common.pdl_mode(pdl):
                        if "static+graph" in label:
                            latency = static_graph_latency(model, batch, context, new_tokens)
                        else:
                            latency = decode_latency(model, batch, context, new_tokens, static=label.endswith("compile"))
                except torch.OutOfMemoryError as err:
                    rows.append((round_, label, batch, "OOM", "", "", f"{weights:.1f}", str(err)[:60]))
                    continue
                except Exception as err:  # a baseline that cannot run here is reported, not fatal
                    rows.append((round_, label, batch, "error", "", "", f"{weights:.1f}",
                                 f"{type(err).__name__}: {str(err)[:80]}"))
                    continue
                peak = torch.cuda.max_memory_allocated() / 2**30 - others
                results[(label, batch)] = (latency, peak)
                rows.append((round_, label, batch, latency * 1e3, batch / latency, peak, f"{weights:.1f}", note))
                print(f"round {round_}: {label} batch {batch}: {latency * 1e3:.2f} ms / token", flush=True)
        for batch in batches:
            for p3_label in ("p3quant W4A8KV4P8 triton", "p3quant W4A8KV4P8 triton static+graph",
                             "p3quant W4A8KV4P8 triton static+graph PDL"):
                p3 = results.get((p3_label, batch))
                for base_label in ("bf16 transformers", "bf16 transformers static+compile"):
                    base = results.get((base_label, batch))
                    if base and p3:
                        rows.append((round_, f"speedup {p3_label} / {base_label}", batch, base[0] / p3[0], "", "", "", ""))
    headers = ["round", "model", "batch", "ms / token", "tokens / s", "peak GiB (other model subtracted)",
               "weights+buffers GiB", "note"]
    text = f"Llama-3.1-8B shape, {layers} layers, context {context}, {new_tokens} timed decode tokens\n" + table(headers, rows)
    if profile:
        text += "\n\nHost profile of p3quant (batch 1, 8 new tokens):\n" + host_profile(model_for("p3quant"), context)
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--profile", action="store_true", help="append a cProfile of the p3quant decode (host time)")
    parser.add_argument("--labels", nargs="+", choices=LABELS, default=list(LABELS), help="which rows to run")
    parser.add_argument("--rounds", type=int, default=1, help="run the labels this many times in turn")
    parser.add_argument("--p3-first", action="store_true", help="run the p3quant labels before the bf16 ones in each round")
    parser.add_argument("--gemv-config", help="the M = 1 GEMV's BLOCK_N,BLOCK_K,warps,stages instead of its default")
    parser.add_argument("--attention-launch", help="the decode attention's BLOCK_T,warps,programs per SM instead of its "
                                                   "defaults")
    parser.add_argument("--mma-variant", help="the small-M GEMM kernel's operands (gemm_w4.MMA_VARIANT) instead of its "
                                              "default")
    args = parser.parse_args()
    print(environment())
    if args.gemv_config:
        from p3quant.kernels import gemm_w4

        gemm_w4.GEMV_OVERRIDE = tuple(int(v) for v in args.gemv_config.split(","))
        print(f"GEMV config {gemm_w4.GEMV_OVERRIDE}")
    if args.attention_launch:
        from p3quant.kernels import decode_attention

        block_t, warps, per_sm = (int(v) for v in args.attention_launch.split(","))
        decode_attention.BLOCK_T = decode_attention.LONG_BLOCK_T = block_t
        decode_attention.NUM_WARPS, decode_attention.PROGRAMS_PER_SM = warps, per_sm
        print(f"decode attention BLOCK_T {block_t}, {warps} warps, {per_sm} programs per SM")
    if args.mma_variant:
        from p3quant.kernels import gemm_w4

        if args.mma_variant not in gemm_w4.MMA_VARIANTS:
            parser.error(f"--mma-variant must be one of {gemm_w4.MMA_VARIANTS}")
        gemm_w4.MMA_VARIANT = args.mma_variant
        print(f"small-M GEMM variant {args.mma_variant}")
    print(run(args.layers, args.context, args.new_tokens, tuple(args.batches), args.profile, tuple(args.labels),
              args.rounds, args.p3_first))


if __name__ == "__main__":
    main()
