"""Greedy text of one model on two backends ("torch" vs "triton" by default), and where they first differ.

    python benchmarks/backend_parity.py --model smollm2-135m --tokens 12

Meant for a GPU. On a machine without CUDA the triton backend runs its kernels in Triton's CPU interpreter
(set here before Triton is imported): the same kernel code, but for SmolLM2-135M about 2.5 minutes per
generated token on 2 cores (0.7 s per decode GEMV call, 210 calls a token), so use a GPU or a tiny model.
Prints one line per prompt and a summary.

    python benchmarks/backend_parity.py --sensitivity

instead compares each prompt's next-token logits: each backend's top 3, the backends' difference, and how much
each backend's logits move when the input embeddings are scaled by 1 + 1e-6 noise; --layers feeds each decoder
layer of the second backend the first one's input to it and compares their outputs layer by layer. The quantized
model rounds its activations to FP8, its keys and values to 4 bits and its attention probabilities to UE4M4, so it
is discontinuous: a perturbation far below any format's resolution can flip a rounding and move the logits as much
as the two backends' fp32 summation orders do, which is why greedy texts part after a few tokens on a GPU.
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


def _top3(tokenizer, logits: torch.Tensor) -> str:
    values, ids = torch.topk(logits, 3)
    return ", ".join(f"{tokenizer.decode([int(i)])!r} {float(v):.3f}" for v, i in zip(values, ids))


def _change(new: torch.Tensor, old: torch.Tensor) -> str:
    return f"rel {float((new - old).norm() / old.norm()):.2e}, max |d| {float((new - old).abs().max()):.3f}"


def sensitivity(base, models: dict, tokenizer, noise: float = 1e-6, seed: int = 0) -> None:
    """Next-token logits of each prompt on each backend against the other's and against its own under inputs
    perturbed by `noise` (relative), next to the unquantized model's change under the same perturbation."""
    gen = torch.Generator(device=base.device).manual_seed(seed)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(base.device)
        with torch.no_grad():
            clean = base.get_input_embeddings()(ids)
            noisy = clean * (1 + noise * torch.randn(clean.shape, device=clean.device, generator=gen))
            logits = {name: (m(inputs_embeds=clean).logits[0, -1].float(), m(inputs_embeds=noisy).logits[0, -1].float())
                      for name, m in {"unquantized": base, **models}.items()}
        print(f"{prompt!r}:")
        for name, (at_clean, at_noisy) in logits.items():
            print(f"  {name:>11}: top 3 {_top3(tokenizer, at_clean)}; inputs x (1 + {noise:g} noise): {_change(at_noisy, at_clean)}")
        (a, (la, _)), (b, (lb, _)) = list(logits.items())[1:]
        print(f"  {b} vs {a}: {_change(lb, la)}", flush=True)


def layerwise(models: dict, tokenizer, prompt: str = PROMPTS[0]) -> None:
    """Each decoder layer of the second backend fed the first backend's input to it (p3quant.eval.layer_diff), so
    each line shows what one layer adds (fp32 summation order, and any rounding it flips), not what the layers
    before it passed on."""
    from p3quant.eval.layer_diff import layer_differences

    (first, model_a), (second, model_b) = models.items()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model_a.parameters()).device)
    print(f"{prompt!r}, each layer of {second} fed {first}'s input to it:")
    for d in layer_differences(model_a, model_b, ids):
        print(f"  layer {d.layer:2d}: rel {d.relative:.2e}, max |d| {d.max_abs:.2e}, "
              f"elements off by > 1e-3 of their row's largest: {d.off_elements} of {d.elements}", flush=True)


def main() -> None:
    import p3quant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="w4a8kv4p8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--backends", nargs=2, default=["torch", "triton"])
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--sensitivity", action="store_true",
                        help="compare next-token logits and their change under 1e-6 input noise instead of greedy text")
    parser.add_argument("--layers", action="store_true",
                        help="compare each decoder layer's output on the first prompt, fed the same input, instead")
    args = parser.parse_args()
    if args.backends[0] == args.backends[1]:
        parser.error("--backends takes two different backends")
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
    what = ("decoder layers, teacher-forced" if args.layers else "next-token logits" if args.sensitivity
            else f"{args.tokens} greedy tokens")
    print(f"{args.model} {args.preset} g{args.group_size} on {device} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}), "
          f"torch {torch.__version__}, {what}")
    if args.layers:
        layerwise(models, tokenizer)
        return
    if args.sensitivity:
        sensitivity(base, models, tokenizer)
        return
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
