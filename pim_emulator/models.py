"""LLM shape presets (the paper's five models) and loading of any Llama-family HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """The shapes a decode step needs.  head_dim = hidden / heads unless the config says otherwise."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    # Keys quantized after RoPE (Q.K^T can run on the PIM) for long-context models (Llama-3.x,
    # Mistral); before RoPE for short-context Llama-1/2 (P3LLM.md 2.4).
    post_rope_keys: bool

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out_features, in_features] of each decoder linear layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
                "o_proj": (h, self.q_dim), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def decoder_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.linear_shapes().values())


def _shape(name: str, layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int,
           post_rope: bool) -> ModelShape:
    return ModelShape(name, layers, hidden, inter, heads, kv, vocab, hidden // heads, post_rope)


MODEL_PRESETS: dict[str, ModelShape] = {m.name: m for m in (
    _shape("llama-2-7b", 32, 4096, 11008, 32, 32, 32000, False),
    _shape("llama-2-13b", 40, 5120, 13824, 40, 40, 32000, False),
    _shape("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256, True),
    _shape("llama-3.2-3b", 28, 3072, 8192, 24, 8, 128256, True),
    _shape("mistral-7b-v0.3", 32, 4096, 14336, 32, 8, 32768, True),
)}
PAPER_MODELS: tuple[str, ...] = tuple(MODEL_PRESETS)

# A model is treated as "short native context" (pre-RoPE keys) when its native context is at most
# this many tokens, as for Llama-1/2 (4096); Llama-3.x and Mistral-v0.3 have 32K-128K.
SHORT_CONTEXT_MAX_POSITIONS = 4096

_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def load_hf_config(path: str | Path) -> ModelShape:
    """Build a ModelShape from a Llama-family Hugging Face config.json (a file or its folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at '{path}'; pass a preset name ({', '.join(MODEL_PRESETS)}) "
                                f"or the path of a Hugging Face config.json")
    cfg = json.loads(p.read_text())
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{p} is not a Llama-family config: missing {missing}")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    name = cfg.get("_name_or_path") or p.parent.name or p.stem
    return ModelShape(
        name=str(name), layers=cfg["num_hidden_layers"], hidden=hidden, intermediate=cfg["intermediate_size"],
        heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads, vocab=cfg["vocab_size"], head_dim=head_dim,
        post_rope_keys=cfg.get("max_position_embeddings", 2048) > SHORT_CONTEXT_MAX_POSITIONS,
    )


def get_model(name_or_path: str) -> ModelShape:
    """A preset by name (case-insensitive) or a config.json path."""
    key = name_or_path.lower()
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_dir() or p.exists():
        return load_hf_config(p)
    raise ValueError(f"unknown model '{name_or_path}'; choose one of {', '.join(MODEL_PRESETS)} "
                     f"or pass the path of a Hugging Face config.json")
