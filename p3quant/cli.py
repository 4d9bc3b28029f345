"""The `p3quant` command: demo, quantize, ppl, generate, eval, pim-report."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PROMPT = "The capital of France is"


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set field=value pairs to P3Config overrides (ints, bools and lists parsed)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects field=value, got {pair!r}")
        key, value = pair.split("=", 1)
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        elif "," in value:
            out[key] = tuple(v for v in value.split(",") if v)
        else:
            out[key] = value
    return out


def _default_group_size(model_name: str) -> int:
    """SmolLM2's in_features (576, 1536) are not multiples of 128: the paper's instruct-model group 64 fits."""
    return 64 if "smollm2" in model_name else 128


def _config(args: argparse.Namespace):
    from .config import P3Config

    overrides = {"weight_group_size": _default_group_size(args.model), **_parse_overrides(args.set)}
    if getattr(args, "backend", None):
        overrides["backend"] = args.backend
    return P3Config.preset(args.preset, **overrides)


def _add_model_args(p: argparse.ArgumentParser, preset: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="p3quant.models name (smollm2-135m, gemma3-270m) or HF folder")
    if preset:
        p.add_argument("--preset", default="w4a8kv4p8", help="P3Config preset (see p3quant.PRESETS)")
        p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="P3Config overrides, e.g. residual_window=16")
        p.add_argument("--backend", default=None, help="torch, triton, pim or auto (default: the preset's)")
    p.add_argument("--device", default=None, help="e.g. cuda; default CPU")


def _load(args: argparse.Namespace):
    from . import models

    return models.load(args.model, device=args.device)


def _load_quantized(args: argparse.Namespace):
    """Load the model and quantize it with the preset, unless it is a saved P3 model already (or preset none)."""
    model, tokenizer = _load(args)
    if args.preset != "none" and getattr(model, "p3_config", None) is None:
        model = _quantized(model, args)
    return model, tokenizer


def _quantized(model, args, tokenizer=None, calibration=None):
    from .quantize import quantize

    return quantize(model, _config(args), calibration=calibration, tokenizer=tokenizer)


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _greedy_static(model, tokenizer, prompt: str, max_new_tokens: int, cuda_graph: bool) -> str:
    """p3quant.generate over a P3StaticCache (optionally CUDA-graph replay), cut at the first end-of-text token."""
    from .generation import generate

    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    tokens = generate(model, ids["input_ids"], max_new_tokens, attention_mask=ids["attention_mask"], cuda_graph=cuda_graph)[0].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_demo(args: argparse.Namespace) -> int:
    """Load SmolLM2, quantize it with the paper's scheme, compare FP vs P3 perplexity, memory and text."""
    import torch

    from .data import wikitext2_test_text
    from .eval.perplexity import perplexity
    from .nn.linear import P3Linear
    from .nn.patching import cache_argument, model_memory

    model, tokenizer = _load(args)
    text = wikitext2_test_text(args.data)
    linear_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    fp = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.windows)
    fp_text = _greedy(model, tokenizer, args.prompt, args.max_new_tokens)
    qmodel = _quantized(copy.deepcopy(model), args)
    q = perplexity(qmodel, tokenizer, text, seqlen=args.seqlen, max_windows=args.windows)
    q_text = _greedy(qmodel, tokenizer, args.prompt, args.max_new_tokens)
    packed = sum(m.packed_nbytes() for m in qmodel.modules() if isinstance(m, P3Linear))
    whole_fp, whole_q = model_memory(model)["total_bytes"], model_memory(qmodel)["total_bytes"]
    cache = qmodel.p3_make_cache()
    ids = tokenizer(text[:20000], return_tensors="pt")["input_ids"][:, : args.seqlen].to(next(qmodel.parameters()).device)
    with torch.no_grad():
        qmodel(ids, use_cache=True, **{cache_argument(qmodel): cache})
    config = _config(args)
    print(f"\nWikiText-2 perplexity, {fp.windows} window(s) of {args.seqlen} tokens ({fp.tokens} predicted tokens):")
    print(f"  {'FP32 (GGUF-dequantized weights)':<36} {fp.ppl:8.3f}")
    print(f"  {'P3 ' + args.preset + f' (g{config.weight_group_size})':<36} {q.ppl:8.3f}   (+{q.ppl - fp.ppl:.3f})")
    print("\nmemory:")
    print(f"  decoder linear weights  FP16 {_mib(linear_bytes)} -> packed {_mib(packed)} ({packed / linear_bytes:.3f}x)")
    print(f"  whole model in memory   FP32 {_mib(whole_fp)} -> {_mib(whole_q)} (embeddings and norms stay 32-bit here)")
    print(f"  KV cache, {ids.shape[1]} tokens     FP16 {_mib(cache.fp16_nbytes())} -> P3 {_mib(cache.nbytes())} "
          f"({cache.nbytes() / cache.fp16_nbytes():.3f}x)")
    print(f"\ngreedy continuation of {args.prompt!r}:")
    print(f"  FP32: {fp_text!r}")
    print(f"  P3  : {q_text!r}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .data import wikitext2_test_text

    model, tokenizer = _load(args)
    calibration = None
    if args.calibrate:
        config = _config(args)
        text = wikitext2_test_text(args.data) if args.calibration_text is None else open(args.calibration_text).read()
        ids = tokenizer(text[: config.calibration_samples * config.calibration_seqlen * 8], return_tensors="pt")["input_ids"][0]
        n = min(config.calibration_samples, ids.numel() // config.calibration_seqlen)
        calibration = ids[: n * config.calibration_seqlen].view(n, config.calibration_seqlen)
    started = time.perf_counter()
    model = _quantized(model, args, tokenizer, calibration)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"quantized {args.model} with {args.preset} in {time.perf_counter() - started:.1f} s -> {args.out}")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from .data import wikitext2_test_text
    from .eval.perplexity import perplexity

    model, tokenizer = _load_quantized(args)
    result = perplexity(model, tokenizer, wikitext2_test_text(args.data), seqlen=args.seqlen,
                        max_windows=args.windows, path=args.path)
    print(f"{args.model} {args.preset} WikiText-2 ppl {result.ppl:.4f} ({result.windows} x {result.seqlen} tokens, {args.path} path)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .nn.backends import get_backend

    model, tokenizer = _load_quantized(args)
    ledger = get_backend("pim").ledger if args.backend == "pim" else None
    if ledger is not None:
        ledger.reset()
    if args.static_cache or args.cuda_graph:
        print(_greedy_static(model, tokenizer, args.prompt, args.max_new_tokens, args.cuda_graph))
    else:
        print(_greedy(model, tokenizer, args.prompt, args.max_new_tokens))
    if ledger is not None:
        print(ledger.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p3quant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize SmolLM2 with W4A8KV4P8 and compare with FP (perplexity, memory, text)")
    _add_model_args(demo)
    demo.add_argument("--windows", type=int, default=2, help="WikiText-2 windows to score")
    demo.add_argument("--seqlen", type=int, default=512)
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--data", default=None, help="path to wiki.test.raw (default: P3QUANT_DATA or ../shared/data)")
    demo.set_defaults(func=cmd_demo)

    quant = sub.add_parser("quantize", help="quantize a model and save it (safetensors + config)")
    _add_model_args(quant)
    quant.add_argument("--out", required=True, help="output folder")
    quant.add_argument("--calibrate", action="store_true", help="run AWQ calibration on WikiText-2 (or --calibration-text)")
    quant.add_argument("--calibration-text", default=None)
    quant.add_argument("--data", default=None)
    quant.set_defaults(func=cmd_quantize)

    ppl = sub.add_parser("ppl", help="WikiText-2 perplexity (standard protocol)")
    _add_model_args(ppl)
    ppl.add_argument("--seqlen", type=int, default=2048)
    ppl.add_argument("--windows", type=int, default=None, help="at most this many windows (default: all)")
    ppl.add_argument("--path", choices=["prefill", "decode"], default="prefill")
    ppl.add_argument("--data", default=None)
    ppl.set_defaults(func=cmd_ppl)

    gen = sub.add_parser("generate", help="greedy generation")
    _add_model_args(gen)
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--static-cache", action="store_true", help="decode with p3quant.generate over a P3StaticCache")
    gen.add_argument("--cuda-graph", action="store_true", help="as --static-cache, replaying the decode step as a CUDA graph (CUDA only)")
    gen.set_defaults(func=cmd_generate)

    sub.add_parser("eval", help="run an evaluation suite (lm-eval tasks, perplexity) side by side; see `p3quant eval --help`",
                   add_help=False)
    sub.add_parser("pim-report", help="modeled PIM speedup/energy tables; see `p3quant pim-report --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "pim-report":
        from .pim_emulator.report import main as pim_report

        return pim_report(argv[1:])
    if argv and argv[0] == "eval":
        from .eval.suite import main as eval_suite

        return eval_suite(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
