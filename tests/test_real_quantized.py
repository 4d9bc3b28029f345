"""P3 quantization of the real SmolLM2-135M and Gemma-3-270M: generation, padding, memory (default model cache)."""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch

import p3quant
from p3quant import P3Config, P3Linear, models
from p3quant.nn.patching import cache_argument


def _load(name: str):
    source = models.MODELS[name]
    try:
        importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{source.package} not installed: {source.pip_command}")
    return models.load(name)


@pytest.fixture(scope="module")
def smollm2():
    return _load("smollm2-135m")


@pytest.fixture(scope="module")
def gemma3():
    return _load("gemma3-270m")


def _generate(model, tokenizer, prompts: list[str], n: int = 10) -> list[str]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_w4a8kv4p8_generates_and_shrinks(smollm2) -> None:
    model, tokenizer = smollm2
    fp_linear = sum(m.weight.numel() * 2 for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n)
    qmodel = p3quant.quantize(copy.deepcopy(model), P3Config.preset("w4a8kv4p8", weight_group_size=64))
    packed = sum(m.packed_nbytes() for m in qmodel.modules() if isinstance(m, P3Linear))
    assert packed < 0.3 * fp_linear
    texts = _generate(qmodel, tokenizer, ["The capital of France is", "Water boils at a temperature of 100 degrees"])
    print(texts)
    assert "Paris" in texts[0]
    alone = _generate(qmodel, tokenizer, ["Water boils at a temperature of 100 degrees"])
    assert alone[0] == texts[1]  # left padding does not change a row's greedy text
    batch = tokenizer(["The capital of France is", "Water boils at a temperature of 100 degrees"], return_tensors="pt", padding=True)
    static = p3quant.generate(qmodel, batch["input_ids"], 10, attention_mask=batch["attention_mask"])
    assert tokenizer.batch_decode(static, skip_special_tokens=True) == texts  # static cache: the same greedy text
    cache = qmodel.p3_make_cache()
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        qmodel(ids, **{cache_argument(qmodel): cache}, use_cache=True)
    assert cache.nbytes() <= 0.30 * cache.fp16_nbytes()


def test_gemma3_w4a8kv4p8_generates(gemma3) -> None:
    model, tokenizer = gemma3
    qmodel = p3quant.quantize(copy.deepcopy(model), P3Config.preset("w4a8kv4p8", weight_group_size=128))
    text = _generate(qmodel, tokenizer, ["The capital of France is"], n=8)[0]
    print(repr(text))
    assert any(c.isalpha() for c in text)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(qmodel(ids).logits).all()
