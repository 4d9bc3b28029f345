"""Greedy generation of a local HF causal LM with the "pim" backend versus "torch", plus the PIM ledger.

Usage: python benchmarks/pim_generate_compare.py MODEL_DIR [--tokens 32] [--group 64] [--prompt TEXT]
Both copies are quantized identically (W4A8KV4P8 preset, round-to-nearest weights: no calibration),
so any difference comes from the backends' arithmetic. Prints both continuations, the first diverging
step with the top-2 logit margin of the torch run there, and the modeled tokens/s and energy per token.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import p3quant
from p3quant import P3Config
from p3quant.nn.backends import get_backend


def _generate(model, ids: torch.Tensor, tokens: int):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, attention_mask=torch.ones_like(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--prompt", default="The capital of France is Paris. The largest planet in the solar system is")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    runs = {}
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    for backend in ("torch", "pim"):
        model = p3quant.quantize(copy.deepcopy(base), P3Config.preset(
            "w4a8kv4p8", weight_group_size=args.group, calibration="none", backend=backend))
        if backend == "pim":
            get_backend("pim").ledger.reset()
        start = time.perf_counter()
        runs[backend] = _generate(model, ids, args.tokens)
        print(f"{backend}: {time.perf_counter() - start:.1f} s wall: "
              f"{tokenizer.decode(runs[backend].sequences[0, ids.shape[1]:])!r}")
    a, b = runs["torch"].sequences[0], runs["pim"].sequences[0]
    n = min(len(a), len(b))
    diverge = next((i for i in range(ids.shape[1], n) if a[i] != b[i]), None)
    if diverge is None:
        print(f"greedy tokens identical for all {n - ids.shape[1]} generated tokens")
    else:
        step = diverge - ids.shape[1]
        top2 = runs["torch"].scores[step][0].topk(2).values
        print(f"first divergence at generated token {step}: torch top-2 logit margin {float(top2[0] - top2[1]):.3g}")
    for step in range(min(len(runs["torch"].scores), len(runs["pim"].scores))):
        if diverge is not None and step > diverge - ids.shape[1]:
            break
        d = (runs["torch"].scores[step] - runs["pim"].scores[step]).abs().max()
        print(f"  step {step}: max |logit difference| {float(d):.3g}")
    print(get_backend("pim").ledger.summary())


if __name__ == "__main__":
    main()
