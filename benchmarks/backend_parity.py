"""Greedy text of one model on two backends ("torch" vs "triton" by default), and where they first differ.

    python benchmarks/backend_parity.py --model smollm2-135m --tokens 12

Meant for a GPU. On a machine without CUDA the triton backend runs its kernels in Triton's CPU interpreter
(set here before Triton is imported): the same kernel code, but for SmolLM2-135M about 2.5 minutes per
generated token on 2 cores (0.7 s per decode GEMV call, 210 calls a token), so use a GPU or a tiny model.
Prints one line per prompt and a summary.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]


def greedy(model, tokenizer, prompt: str, tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def main() -> None:
    import p3quant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="w4a8kv4p8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--backends", nargs=2, default=["torch", "triton"])
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The interpreter pays per program and per op: wider GEMV tiles (same kernel code), and short prompts through
        # the tiled kernel, since the small-M kernel's per-group loop costs minutes per linear layer there (it is
        # checked against float64 in tests/test_kernels_w4_mma.py and on the GPU by gpu_check.py).
        from p3quant.kernels import gemm_w4

        gemm_w4.GEMV_OVERRIDE = (64, 1024, 4, 1)
        gemm_w4.MMA_MAX_M = 0
    base, tokenizer = p3quant.models.load(args.model, device=device)
    models = {name: p3quant.quantize(copy.deepcopy(base), p3quant.P3Config.preset(args.preset, backend=name, weight_group_size=args.group_size))
              for name in args.backends}
    print(f"{args.model} {args.preset} g{args.group_size} on {device} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}), "
          f"torch {torch.__version__}, {args.tokens} greedy tokens")
    same = 0
    for prompt in PROMPTS:
        runs = {}
        for name, model in models.items():
            start = time.perf_counter()
            runs[name] = greedy(model, tokenizer, prompt, args.tokens)
            print(f"  {name:>7} ({time.perf_counter() - start:6.1f} s): {tokenizer.decode(runs[name])!r}", flush=True)
        a, b = runs.values()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        same += first is None
        print(f"{prompt!r}: " + ("identical" if first is None else f"first difference at token {first}"), flush=True)
    print(f"identical greedy text for {same} of {len(PROMPTS)} prompts")


if __name__ == "__main__":
    main()
