"""The p3quant command on a tiny random Llama saved with SmolLM2's tokenizer (real tokenizer, fast model)."""

from __future__ import annotations

import importlib.metadata

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from p3quant import P3Linear, models
from p3quant.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    try:
        importlib.metadata.version(models.MODELS["smollm2-135m"].package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs SmolLM2's tokenizer: {models.MODELS['smollm2-135m'].pip_command}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.ensure_converted("smollm2-135m"), local_files_only=True)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "quantize", "ppl", "generate", "eval", "pim-report"):
        assert command in out


def test_quantize_then_generate_and_ppl_from_the_saved_folder(tiny_folder, tmp_path, capsys) -> None:
    out_dir = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_folder), "--preset", "w4a8kv4p8", "--set", "weight_group_size=64",
                 "--out", str(out_dir)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, P3Linear)
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--max-new-tokens", "4"]) == 0
    dynamic = capsys.readouterr().out
    assert main(["generate", "--model", str(out_dir), "--max-new-tokens", "4", "--static-cache"]) == 0
    assert capsys.readouterr().out == dynamic
    try:
        code = main(["ppl", "--model", str(out_dir), "--seqlen", "64", "--windows", "1"])
    except FileNotFoundError as err:
        pytest.skip(f"WikiText-2 not available: {err}")
    assert code == 0
    assert "WikiText-2 ppl" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(tiny_folder) -> None:
    with pytest.raises(ValueError, match="unknown P3Config field"):
        main(["generate", "--model", str(tiny_folder), "--set", "weight_groupsize=64"])
    with pytest.raises(SystemExit, match="field=value"):
        main(["generate", "--model", str(tiny_folder), "--set", "weight_group_size"])


def test_pim_report_runs_through_the_cli(capsys) -> None:
    assert main(["pim-report", "--models", "llama-3.2-3b", "--batch", "1", "--context", "1024"]) == 0
    assert "p3-llm" in capsys.readouterr().out
