"""lm-eval integration: the offline p3_* tasks load, the "p3" model runs them (Python API and command line)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import p3quant
from p3quant.eval.lm_eval_cli import TASKS_DIR
from p3quant.eval.lm_eval_model import P3LM, p3_config_from_args, right_padding_mask
from p3quant.models import MODELS, ensure_converted

TASKS = ["p3_wikitext", "p3_piqa", "p3_arc_easy", "p3_arc_challenge", "p3_hellaswag", "p3_lambada_openai"]
SIZES = {"p3_wikitext": 62, "p3_piqa": 1838, "p3_arc_easy": 2376, "p3_arc_challenge": 1172, "p3_hellaswag": 10042, "p3_lambada_openai": 5153}


DATA_FILES = {
    "p3_wikitext": "wikitext-2-raw/wiki.test.raw", "p3_piqa": "piqa/valid.jsonl", "p3_arc_easy": "arc/ARC-Easy-test.jsonl",
    "p3_arc_challenge": "arc/ARC-Challenge-test.jsonl", "p3_hellaswag": "hellaswag/hellaswag_val_full.txt.bz2",
    "p3_lambada_openai": "lambada_openai/lambada_test.jsonl",
}


@pytest.fixture(scope="module")
def tokenizer():
    try:
        importlib.metadata.version(MODELS["smollm2-135m"].package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs SmolLM2's tokenizer: {MODELS['smollm2-135m'].pip_command}")
    return AutoTokenizer.from_pretrained(ensure_converted("smollm2-135m"), local_files_only=True)


def _tiny(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048, head_dim=16)
    return LlamaForCausalLM(config).eval()


def test_offline_tasks_load(require_data) -> None:
    from lm_eval.tasks import TaskManager

    for relative in DATA_FILES.values():
        require_data(relative)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if hasattr(manager, "load"):  # newer lm-eval (get_task_dict deprecated): a flat dict of the leaf tasks
        tasks = manager.load(TASKS)["tasks"]
    else:
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(TASKS, manager)
    for name in TASKS:
        task = tasks[name]
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
        assert len(docs) == SIZES[name], (name, len(docs))
    piqa = list(tasks["p3_piqa"].validation_docs())
    assert {d["label"] for d in piqa} == {0, 1}
    hella = list(tasks["p3_hellaswag"].validation_docs())[0]
    assert len(hella["choices"]) == 4 and 0 <= hella["label"] <= 3


def test_model_args_override_config() -> None:
    config = p3_config_from_args("w4a8kv4p8", {"weight_group_size": "64", "key_smoothing": "False", "residual_window": 16})
    assert (config.weight_group_size, config.key_smoothing, config.residual_window) == (64, False, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        p3_config_from_args("w5", {})


def test_in_memory_quantized_model_runs_a_task(tokenizer, require_data) -> None:
    import lm_eval

    require_data(DATA_FILES["p3_arc_easy"])
    from lm_eval.tasks import TaskManager

    model = p3quant.quantize(_tiny(len(tokenizer)), p3quant.P3Config.preset("w4a8kv4p8", weight_group_size=64))
    lm = P3LM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["p3_arc_easy"], limit=5, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    acc = out["results"]["p3_arc_easy"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_command_line_model_p3(tmp_path, tokenizer, require_data) -> None:
    require_data(DATA_FILES["p3_piqa"])
    folder = tmp_path / "tiny"
    _tiny(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "p3quant.eval.lm_eval_cli", "--model", "p3",
           "--model_args", f"pretrained={folder},preset=int4-w4a8kv4,backend=torch,weight_group_size=32",
           "--tasks", "p3_piqa", "--limit", "4", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "p3"
    assert "p3_piqa" in results["results"]


def test_right_padding_mask() -> None:
    inps = torch.tensor([[0, 5, 7, 0, 0], [3, 0, 4, 9, 2], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(right_padding_mask(inps), expected)


def test_scores_do_not_depend_on_batch_composition(tokenizer) -> None:
    """Padding must not enter P3's per-sequence key-smoothing factor: batched scores equal one-at-a-time ones."""
    # float64, so that the GEMMs' batch-shape-dependent summation order cannot flip an FP8 rounding
    model = p3quant.quantize(_tiny(len(tokenizer)).double(), p3quant.P3Config.preset("w4a8kv4p8", backend="torch", weight_group_size=32))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    requests = []
    for length in (5, 23, 11, 17):  # different lengths: the shorter rows of a batch get padding
        tokens = torch.randint(1, len(tokenizer), (length,), generator=gen).tolist()
        requests.append((("", ""), tokens[:-3], tokens[-3:]))
    single = P3LM(pretrained=model, tokenizer=tokenizer, batch_size=1)._loglikelihood_tokens(requests, disable_tqdm=True)
    batched = P3LM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    for (ll1, _), (ll4, _) in zip(single, batched):
        assert abs(ll1 - ll4) < 1e-6, (single, batched)  # float32 attention arithmetic; padding leaks gave 3e-4
