"""`python -m p3quant.eval.lm_eval_cli ARGS`: lm-eval's own command line with model "p3" and the p3_* tasks known.

lm-eval 0.4 finds models only in its registry, which has no plugin (entry point) discovery, so the stock
`lm_eval` command cannot see a model defined in another package. This entry point imports p3quant's model
(registering "p3"), adds the packaged offline task folder to --include_path, and runs lm-eval's CLI unchanged:
    python -m p3quant.eval.lm_eval_cli --model p3 --model_args pretrained=smollm2-135m,weight_group_size=64 \\
        --tasks p3_piqa,p3_arc_easy --limit 200
Data-parallel on several GPUs: `accelerate launch -m p3quant.eval.lm_eval_cli ...` (see benchmarks/ACCURACY.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def with_task_path(argv: list[str]) -> list[str]:
    """argv with --include_path set to the packaged task folder, unless the user gave one (then theirs is used)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help") or "--include_path" in argv:
        return argv
    return argv + ["--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers the "p3" model)

    sys.argv = [sys.argv[0], *with_task_path(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
