"""Scale-out: a P3-quantized Llama-shaped model (random weights) placed over every visible GPU, then generation.

    python benchmarks/scaleout.py --hidden 4096 --layers 32 --tokens 64       # model parallel, device_map="auto"

accelerate's infer_auto_device_map splits the decoder between layers (no_split_module_classes = the model's
_no_split_modules, e.g. LlamaDecoderLayer), so each P3Linear keeps its packed buffers on one device; the P3 cache
creates each layer's storage on the device of that layer's keys. The same script on a CPU-only machine places
everything on "cpu" (tested). Data-parallel lm-eval is a separate command (benchmarks/ACCURACY.md, "Scale-out").
"""

from __future__ import annotations

import argparse
import time

import torch


def llama_shaped(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, seed: int = 0,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A LlamaForCausalLM with random weights of the given shape, created directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def dispatch_quantized(model: torch.nn.Module, max_memory: dict | None = None) -> dict:
    """Place a (P3-quantized) model like device_map="auto" and return the device map."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=list(model._no_split_modules or []))
    if set(device_map.values()) <= {"cpu"}:
        return device_map  # single CPU device: nothing to move, no hooks needed
    dispatch_model(model, device_map=device_map)
    return device_map


def balanced_memory(model: torch.nn.Module) -> dict | None:
    """Max memory per GPU so that the model is spread over all of them (None on CPU-only machines)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    from accelerate.utils import get_balanced_memory

    return get_balanced_memory(model, no_split_module_classes=list(model._no_split_modules or []))


def main() -> None:
    import p3quant

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--preset", default="w4a8kv4p8")
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64, help="new tokens to generate")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    model = llama_shaped(args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab,
                         device="cuda:0" if cuda else "cpu", dtype=torch.float16 if cuda else torch.float32)
    model = p3quant.quantize(model, p3quant.P3Config.preset(args.preset, backend=args.backend))
    device_map = dispatch_quantized(model, balanced_memory(model))
    devices = sorted({str(d) for d in device_map.values()})
    print(f"devices: {devices}; modules per device: { {d: sum(v == d for v in device_map.values()) for d in set(device_map.values())} }")
    if cuda:  # the float model was built on cuda:0; count only what generation needs after placement
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens), device=model.get_input_embeddings().weight.device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.time()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        seconds = time.time() - start
    peaks = {f"cuda:{i}": f"{torch.cuda.max_memory_allocated(i) / 2**30:.1f} GiB" for i in range(torch.cuda.device_count())} if cuda else {}
    print(f"generated {out.shape[1] - ids.shape[1]} tokens x batch {args.batch} in {seconds:.2f} s "
          f"({args.batch * args.tokens / seconds:.1f} tok/s) on {devices}; peak memory during generation {peaks}")


if __name__ == "__main__":
    main()
