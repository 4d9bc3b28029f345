"""`pim-report`: run the system model over models x batches x systems; tables, JSON, figures.

Usage: python -m p3quant.pim_emulator.report --models llama-2-7b ... --batch 1 2 4 8 --context 4096
       [--systems ...] [--dram hbm2] [--pim-model closed|command] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean
from typing import Sequence

from .command_model import command_gemv
from .dram import DRAM_PRESETS, get_dram
from .models import PAPER_MODELS, get_model
from .system_model import Hardware, StepResult, decode_step
from .systems import ALL_SYSTEMS, get_system
from .timing import pim_gemv

REFERENCE = "p3-llm"


@dataclass(frozen=True)
class PaperTarget:
    """One averaged ratio the paper reports: mean over models and `batches` of metric(den) / metric(num)."""

    label: str
    num: str  # the faster / more efficient system
    den: str
    batches: tuple[int, ...]
    target: float
    metric: str  # "latency", "energy" or "memory"


PAPER_TARGETS: tuple[PaperTarget, ...] = (
    PaperTarget("speedup P3-LLM / NPU-FP16", "p3-llm", "npu-fp16", (1, 2, 4, 8), 7.8, "latency"),
    PaperTarget("speedup P3-LLM / HBM-PIM", "p3-llm", "hbm-pim", (1, 2, 4, 8), 4.9, "latency"),
    PaperTarget("speedup P3-LLM / Ecco", "p3-llm", "ecco", (1, 2, 4, 8), 2.0, "latency"),
    PaperTarget("speedup P3-LLM / Pimba-enhanced", "p3-llm", "pimba-enhanced", (1, 2, 4, 8), 3.4, "latency"),
    PaperTarget("speedup Pimba-enhanced / Pimba", "pimba-enhanced", "pimba", (1, 2, 4, 8), 2.1, "latency"),
    PaperTarget("speedup P3-LLM / NPU-SmoothQuant", "p3-llm", "npu-smoothquant", (1, 2, 4, 8), 3.9, "latency"),
    PaperTarget("speedup P3-LLM / NPU-AWQ", "p3-llm", "npu-awq", (1, 2, 4, 8), 3.0, "latency"),
    PaperTarget("ablation W4A8KV4-on-PIM / HBM-PIM", "pim-w4a8kv4", "hbm-pim", (2, 4), 3.3, "latency"),
    PaperTarget("ablation +TEP", "pim-w4a8kv4-tep", "pim-w4a8kv4", (2, 4), 1.6, "latency"),
    PaperTarget("ablation +P8 attention on PIM", "p3-llm", "pim-w4a8kv4-tep", (2, 4), 1.2, "latency"),
    PaperTarget("energy eff. P3-LLM / NPU-FP16", "p3-llm", "npu-fp16", (1, 2, 4, 8), 6.3, "energy"),
    PaperTarget("energy eff. P3-LLM / HBM-PIM", "p3-llm", "hbm-pim", (1, 2, 4, 8), 3.5, "energy"),
    PaperTarget("energy eff. P3-LLM / Ecco", "p3-llm", "ecco", (1, 2, 4, 8), 2.1, "energy"),
    PaperTarget("memory FP16 / P3-LLM (batch 8)", "p3-llm", "npu-fp16", (8,), 3.7, "memory"),
)


def _metric(r: StepResult, metric: str) -> float:
    if metric == "latency":
        return r.latency_s
    if metric == "energy":
        return r.energy_j
    # Memory: the state the quantization scheme compresses (decoder weights + KV cache).
    return r.memory_bytes["decoder_weights"] + r.memory_bytes["kv_cache"]


def run_grid(models: Sequence[str], systems: Sequence[str], batches: Sequence[int], context: int,
             hw: Hardware | None = None, pim_model: str = "closed") -> list[StepResult]:
    """Decode steps for every (model, batch, system)."""
    gemv = {"closed": pim_gemv, "command": command_gemv}[pim_model]
    shapes = [get_model(m) for m in models]
    specs = [get_system(s) for s in systems]
    return [decode_step(m, s, b, context, hw, gemv) for m in shapes for b in batches for s in specs]


def _index(results: Sequence[StepResult]) -> dict[tuple[str, int, str], StepResult]:
    return {(r.model, r.batch, r.system): r for r in results}


def ratios(results: Sequence[StepResult], num: str, den: str, metric: str = "latency") -> dict[tuple[str, int], float]:
    """metric(den) / metric(num) per (model, batch) where both systems were run."""
    idx = _index(results)
    return {(m, b): _metric(idx[m, b, den], metric) / _metric(r, metric)
            for (m, b, s), r in idx.items() if s == num and (m, b, den) in idx}


def paper_comparison(results: Sequence[StepResult]) -> list[dict]:
    """Measured value of each paper target the results allow (mean over models and batches)."""
    rows = []
    for t in PAPER_TARGETS:
        vals = [v for (m, b), v in ratios(results, t.num, t.den, t.metric).items() if b in t.batches]
        if vals:
            measured = mean(vals)
            rows.append({"label": t.label, "target": t.target, "measured": measured,
                         "error": measured / t.target - 1, "points": len(vals)})
    return rows


def best_batch(results: Sequence[StepResult], num: str, den: str) -> int | None:
    """Batch with the highest mean speedup of `num` over `den` (the paper: batch 2 for P3 over Ecco)."""
    by_batch: dict[int, list[float]] = {}
    for (m, b), v in ratios(results, num, den).items():
        by_batch.setdefault(b, []).append(v)
    return max(by_batch, key=lambda b: mean(by_batch[b])) if by_batch else None


def format_tables(results: Sequence[StepResult], reference: str = REFERENCE) -> str:
    """Latency/energy per (model, batch, system), speedups of `reference`, averages, paper checks."""
    systems = list(dict.fromkeys(r.system for r in results))
    lines = [f"{'model':<18}{'batch':>6}  " + "".join(f"{s:>17}" for s in systems)]
    keys = list(dict.fromkeys((r.model, r.batch) for r in results))
    idx = _index(results)
    for title, fn in (("latency per step [ms]", lambda r: r.latency_s * 1e3),
                      ("energy per token [mJ]", lambda r: r.energy_per_token_j * 1e3)):
        lines.append(f"\n== {title} ==")
        lines.append(lines[0])
        for m, b in keys:
            lines.append(f"{m:<18}{b:>6}  " + "".join(f"{fn(idx[m, b, s]):>17.3f}" for s in systems))
    if reference in systems:
        for title, metric in (("speedup of " + reference, "latency"), ("energy efficiency of " + reference, "energy")):
            lines.append(f"\n== {title} over each system ==")
            lines.append(lines[0])
            per = {s: ratios(results, reference, s, metric) for s in systems}
            for m, b in keys:
                lines.append(f"{m:<18}{b:>6}  " + "".join(f"{per[s][m, b]:>17.2f}" for s in systems))
            lines.append(f"{'average':<24}" + "".join(f"{mean(per[s].values()):>17.2f}" for s in systems))
    comparison = paper_comparison(results)
    if comparison:
        lines.append("\n== paper averages (target vs measured) ==")
        for row in comparison:
            lines.append(f"{row['label']:<40}{row['target']:>8.2f}{row['measured']:>10.2f}{row['error']:>+9.1%}")
        if {reference, "ecco"} <= set(systems):
            lines.append(f"{'highest speedup over Ecco at batch':<40}{2:>8d}{best_batch(results, reference, 'ecco'):>10d}")
    return "\n".join(lines)


_GROUPS = {"linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "lm_head": ("lm_head",), "Q.K^T": ("qk",), "P.V": ("pv",), "softmax": ("softmax",)}


def plot(results: Sequence[StepResult], path: str | Path, reference: str = REFERENCE) -> None:
    """Speedup bars per model and batch, and a per-operation time breakdown per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = [s for s in dict.fromkeys(r.system for r in results) if s != reference]
    keys = list(dict.fromkeys((r.model, r.batch) for r in results))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, len(keys) * 0.6), 10))
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        per = ratios(results, reference, s)
        ax1.bar(x + i * width, [per.get(k, np.nan) for k in keys], width, label=s)
    ax1.set_xticks(x + 0.4 - width / 2, [f"{m} b{b}" for m, b in keys], fontsize=7, rotation=60, ha="right")
    ax1.set_ylabel(f"speedup of {reference}")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7, ncol=3)
    ax1.set_title("decode speedup per model and batch")

    model, batch = keys[0]
    idx = _index(results)
    names = [s for s in dict.fromkeys(r.system for r in results) if (model, batch, s) in idx]
    bottom = np.zeros(len(names))
    for group, ops in list(_GROUPS.items()) + [("other", None)]:
        vals = []
        for s in names:
            grouped = {o for g in _GROUPS.values() for o in g}
            sel = [o for o in idx[model, batch, s].ops if (o.name in ops if ops else o.name not in grouped)]
            vals.append(sum(o.seconds for o in sel) * 1e3)
        ax2.bar(names, vals, bottom=bottom, label=group)
        bottom += np.array(vals)
    ax2.set_ylabel("ms per decode step")
    ax2.set_title(f"per-operation time, {model}, batch {batch}")
    ax2.tick_params(axis="x", labelsize=7, rotation=30)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p3quant pim-report", description="Modeled decode latency and energy of "
                                "P3-LLM and its baselines (NPU + DRAM-PIM).")
    p.add_argument("--models", nargs="+", default=list(PAPER_MODELS),
                   help="preset names or paths to Hugging Face config.json files")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument("--systems", nargs="+", default=list(ALL_SYSTEMS), help=f"any of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--dram", default="hbm2", help=f"one of {', '.join(DRAM_PRESETS)}")
    p.add_argument("--stacks", type=int, default=None, help="override the number of DRAM stacks/packages")
    p.add_argument("--pim-model", choices=("closed", "command"), default="closed",
                   help="closed-form fast path (default) or the command-level sequencer")
    p.add_argument("--json", type=Path, help="write one record per (model, system, batch) here")
    p.add_argument("--plot", type=Path, help="write the figures (PNG) here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for s in args.systems:
            get_system(s)
        for m in args.models:
            get_model(m)
        dram = get_dram(args.dram)
        if args.stacks:
            dram = dram.with_stacks(args.stacks)
        if min(args.batch) < 1 or args.context < 1:
            raise ValueError("--batch and --context must be >= 1")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    hw = replace(Hardware(), dram=dram)
    results = run_grid(args.models, args.systems, args.batch, args.context, hw, args.pim_model)
    print(format_tables(results))
    if args.json:
        args.json.write_text(json.dumps([r.to_record() for r in results], indent=1))
        print(f"\nwrote {len(results)} records to {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote figures to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
