"""Accuracy experiments of benchmarks/ACCURACY.md: the paper's ablation and the comparison table.

    python benchmarks/accuracy.py --model smollm2-135m --suite ablation --windows 4 --out results.jsonl
    python benchmarks/accuracy.py --model smollm2-135m --suite compare --tasks wikitext piqa arc_easy --limit 100

Each finished method is appended to --out as one JSON line (so partial runs keep their numbers); the table is
printed at the end. Methods: see p3quant.eval.suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

from p3quant.eval.suite import TASKS, Row, format_table, run

SUITES = {
    "ablation": ["fp16", "ablation-kv4-prerope", "ablation-kv4-postrope", "ablation-kv4-smooth", "ablation-w4int",
                 "ablation-w4bitmod", "ablation-p-fp8", "ablation-p-ue4m4", "ablation-a-int8", "ablation-a-fp8"],
    "compare": ["fp16", "kv4", "kivi-kv4", "int4-w4a8kv4", "quarot-w4a8kv4", "quarot-gptq-w4a8kv4", "quarot-gptq-actgain-w4a8kv4", "w4a8kv4p8", "w4a8kv4p8+awq", "w4a8kv4p8+gptq"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--suite", choices=sorted(SUITES), help="a named list of methods")
    p.add_argument("--methods", nargs="+", help="methods instead of / after the suite")
    p.add_argument("--tasks", nargs="+", default=["wikitext"], choices=TASKS)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--path", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="append one JSON line per method here")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = (SUITES[args.suite] if args.suite else []) + (args.methods or [])
    rows: list[Row] = []
    for method in methods:
        row = run(args.model, [method], args.tasks, args.limit or None, args.seqlen, args.windows or None, args.path, args.group_size)[0]
        rows.append(row)
        if args.out:
            record = {"model": args.model, "method": method, "scores": row.scores, "seconds": row.seconds, "seqlen": args.seqlen,
                      "windows": args.windows, "path": args.path, "limit": args.limit, "group_size": args.group_size,
                      "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine()}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print(format_table(rows, reference=methods[0]))


if __name__ == "__main__":
    main()
