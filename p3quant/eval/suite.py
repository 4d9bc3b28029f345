"""`p3quant eval`: FP16 and P3 (and baselines) side by side on WikiText-2 perplexity and offline lm-eval tasks.

    p3quant eval --model smollm2-135m --presets fp16 w4a8kv4p8 --tasks wikitext piqa arc_easy --limit 200

Methods are P3Config presets, "quarot-w4a8kv4" (QuaRot-style rotation + preset int4-w4a8kv4, RTN weights),
"quarot-gptq-w4a8kv4" (the same with GPTQ weights, calibrated on 32 x 512 tokens of the offline C4 subset),
"quarot-actgain-w4a8kv4" / "quarot-gptq-actgain-w4a8kv4" (norm gains kept on the activation side instead of fused
into the weights: the Gemma-3 fix, see docs/baselines.md), or presets with "+awq" (AWQ calibration on the offline C4 subset)
or "+gptq" (GPTQ with the preset's own weight quantizer, e.g. BitMoD, in the loop; 32 x 512 C4 tokens as for QuaRot). "wikitext" is perplexity with the standard protocol
(context --seqlen, at most --windows windows, --path prefill or decode); other task names run the packaged
p3_<task> lm-eval tasks (0-shot, --limit items each). One table is printed (markdown).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

LM_EVAL_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "lambada_openai")
TASKS = ("wikitext", *LM_EVAL_TASKS)
QUAROT = "quarot-w4a8kv4"
QUAROT_GPTQ = "quarot-gptq-w4a8kv4"
# QuaRot methods: name -> (weights, norm_gains) of p3quant.baselines.quarot_quantize. "actgain": the input/MLP norm
# gains stay on the activation side (online Q^T diag(g) Q after the norm) instead of being fused into the weights.
QUAROT_METHODS = {
    QUAROT: ("rtn", "fuse"),
    QUAROT_GPTQ: ("gptq", "fuse"),
    "quarot-actgain-w4a8kv4": ("rtn", "online"),
    "quarot-gptq-actgain-w4a8kv4": ("gptq", "online"),
}
GPTQ_SAMPLES = 32  # calibration windows of 512 tokens for quarot-gptq and "+gptq" (GPTQ paper: 128 x 2048)
SUFFIXES = ("", "awq", "gptq")


@dataclass
class Row:
    """One method's scores: metric name -> value, plus wall time in seconds."""

    method: str
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def default_group_size(model) -> int:
    """128 (the paper's) when it divides every decoder linear's in_features, else 64, else 32."""
    import torch

    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


def build(model_name: str, method: str, group_size: int | None = None):
    """(model, tokenizer): `model_name` loaded and quantized by `method` (see the module docstring)."""
    from .. import P3Config, quantize
    from ..models import load

    model, tokenizer = load(model_name)
    base, _, extra = method.partition("+")
    if extra not in SUFFIXES:
        raise ValueError(f"unknown method suffix {extra!r} in {method!r}; only '+awq' and '+gptq' are supported")
    group = group_size or default_group_size(model)
    if base in QUAROT_METHODS:
        from ..baselines import quarot_quantize

        if extra:
            raise ValueError(f"{method!r}: the QuaRot baselines take no '+awq' / '+gptq' suffix (use quarot-gptq-*)")
        weights, norm_gains = QUAROT_METHODS[base]
        config = P3Config.preset("int4-w4a8kv4", weight_group_size=group)
        calibration = None
        if weights == "gptq":
            from ..calibration.texts import calibration_texts

            config, calibration = config.replace(calibration_samples=GPTQ_SAMPLES), calibration_texts()
        return quarot_quantize(model, config, weights=weights, calibration=calibration, tokenizer=tokenizer,
                               norm_gains=norm_gains), tokenizer
    config = P3Config.preset(base, weight_group_size=group)
    calibration = None
    if extra == "gptq":
        from ..calibration.gptq import apply_gptq
        from ..calibration.texts import calibration_texts

        if not config.quantizes_weights:
            raise ValueError(f"{method!r}: preset {base!r} has no quantized weights for GPTQ")
        # GPTQ instead of AWQ (calibration="none": quantize() must not run AWQ on top; GPTQ's weights lie on the
        # preset's grid, so packing keeps them).
        config = config.replace(calibration_samples=GPTQ_SAMPLES, calibration="none")
        apply_gptq(model, config, calibration_texts(), tokenizer)
        return quantize(model, config), tokenizer
    if extra == "awq":
        from ..calibration.texts import calibration_texts

        calibration = calibration_texts()
    return quantize(model, config, calibration=calibration, tokenizer=tokenizer), tokenizer


def evaluate(model, tokenizer, tasks: list[str], limit: int | None, seqlen: int, windows: int | None, path: str = "prefill") -> dict[str, float]:
    """Scores of one model: "wikitext_ppl" and "<task>_acc" / "<task>_acc_norm" / "lambada_openai_ppl"."""
    scores: dict[str, float] = {}
    if "wikitext" in tasks:
        from ..data import wikitext2_test_text
        from .perplexity import perplexity

        scores["wikitext_ppl"] = perplexity(model, tokenizer, wikitext2_test_text(), seqlen=seqlen, max_windows=windows, path=path).ppl
    harness = [t for t in tasks if t != "wikitext"]
    if harness:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from .lm_eval_cli import TASKS_DIR
        from .lm_eval_model import P3LM

        lm = P3LM(pretrained=model, tokenizer=tokenizer, batch_size=8)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[f"p3_{t}" for t in harness], limit=limit,
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        )
        for task in harness:
            result = out["results"][f"p3_{task}"]
            for metric in ("acc", "acc_norm", "perplexity"):
                if f"{metric},none" in result:
                    scores[f"{task}_{'ppl' if metric == 'perplexity' else metric}"] = result[f"{metric},none"]
    return scores


def run(model_name: str, methods: list[str], tasks: list[str], limit: int | None, seqlen: int, windows: int | None,
        path: str = "prefill", group_size: int | None = None) -> list[Row]:
    rows = []
    for method in methods:
        start = time.time()
        model, tokenizer = build(model_name, method, group_size)
        rows.append(Row(method, evaluate(model, tokenizer, tasks, limit, seqlen, windows, path), time.time() - start))
        print(format_table([rows[-1]]), flush=True)
    return rows


def format_table(rows: list[Row], reference: str | None = None) -> str:
    """Markdown table; with `reference` (a method in rows) a column of wikitext ppl increase over it."""
    metrics = sorted({m for row in rows for m in row.scores})
    ref = next((r for r in rows if r.method == reference), None)
    header = ["method", *metrics] + (["ppl increase"] if ref and "wikitext_ppl" in ref.scores else []) + ["time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.method] + [f"{row.scores[m]:.4f}" if m in row.scores else "" for m in metrics]
        if ref and "wikitext_ppl" in ref.scores:
            cells.append(f"{row.scores['wikitext_ppl'] - ref.scores['wikitext_ppl']:+.3f}" if "wikitext_ppl" in row.scores else "")
        cells.append(f"{row.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p3quant eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="p3quant.models name or HF folder")
    p.add_argument("--presets", nargs="+", default=["fp16", "w4a8kv4p8"], help="methods: presets, quarot[-gptq][-actgain]-w4a8kv4, NAME+awq, NAME+gptq")
    p.add_argument("--tasks", nargs="+", default=["wikitext", "piqa", "arc_easy"], choices=TASKS)
    p.add_argument("--limit", type=int, default=200, help="items per lm-eval task (0: all)")
    p.add_argument("--seqlen", type=int, default=2048, help="WikiText-2 context")
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 windows (0: all)")
    p.add_argument("--path", choices=("prefill", "decode"), default="prefill", help="perplexity code path")
    p.add_argument("--group-size", type=int, default=None, help="weight group size (default: 128 if it divides, else 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = run(args.model, args.presets, args.tasks, args.limit or None, args.seqlen, args.windows or None, args.path, args.group_size)
    print()
    print(format_table(rows, reference=args.presets[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
