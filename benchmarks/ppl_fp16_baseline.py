"""Unquantized WikiText-2 perplexity baseline of the real models (the reference for P3 results).

Named after the paper's FP16 baseline; on CPU it runs in FP32 by default (--dtype). Example:
    python benchmarks/ppl_fp16_baseline.py --models smollm2-135m gemma3-270m --seqlen 2048 --max-windows 20
"""

from __future__ import annotations

import argparse
import time

import torch

from p3quant.data import wikitext2_test_text
from p3quant.eval import perplexity
from p3quant.models import MODELS, load

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), help="model names or local HF folders")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None, help="default: all windows of the test split")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--path", choices=["prefill", "decode"], default="prefill")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    text = wikitext2_test_text()
    rows = []
    for name in args.models:
        start = time.perf_counter()
        model, tokenizer = load(name, dtype=DTYPES[args.dtype], device=args.device)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        result = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows, path=args.path)
        eval_s = time.perf_counter() - start
        rows.append(
            f"| {name} | {args.dtype} | {result.seqlen} | {result.windows} | {result.tokens} | {result.ppl:.3f} "
            f"| {load_s:.1f} | {eval_s:.1f} |"
        )
        del model
    print(f"torch threads: {torch.get_num_threads()}, path: {args.path}")
    print("| model | dtype | seqlen | windows | predicted tokens | ppl | load s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
