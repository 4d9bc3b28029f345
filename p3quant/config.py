"""P3Config: which format each operand of a decoder uses, validated, with the paper's presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .formats import ROUNDING_MODES
from .quantizers import ACTIVATION_FORMATS, KV_FORMATS, PROB_FORMATS, QUERY_FORMATS, WEIGHT_FORMATS

KEY_POSITIONS = ("post_rope", "pre_rope")
KEY_GRANULARITIES = ("per_token", "per_channel")
BACKENDS = ("auto", "torch", "triton", "pim")
CALIBRATIONS = ("none", "awq")


@dataclass(frozen=True)
class P3Config:
    """Formats and options of every quantized operand (P3LLM.md section 2). Defaults: the paper's W4A8KV4P8.

    weight_group_size 128 is the paper's; instruct models (and SmolLM2, whose in_features are 576 and 1536)
    use 64. residual_window R keeps the newest R cache tokens in 16 bits (the reference evaluation uses 1).
    AWQ calibrates on calibration_samples windows of calibration_seqlen tokens: 16 x 512 by default (the paper
    uses 128 x 512 of the Pile; 16 keeps SmolLM2-135M calibration within minutes on a 2-core CPU).
    """

    weight_format: str = "bitmod"
    weight_group_size: int = 128
    activation_format: str = "fp8_e4m3"
    query_format: str = "fp8_e4m3"
    key_format: str = "int4"
    key_granularity: str = "per_token"
    key_smoothing: bool = True
    key_position: str = "post_rope"
    value_format: str = "int4"
    prob_format: str = "ue4m4"
    prob_rounding: str = "nearest_even"
    fold_value_scale: bool = True
    residual_window: int = 1
    kivi_group_size: int = 32
    skip_modules: tuple[str, ...] = ("lm_head",)
    quantize_embeddings: bool = False
    calibration: str = "awq"
    calibration_samples: int = 16
    calibration_seqlen: int = 512
    backend: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        self._check_choice("weight_format", WEIGHT_FORMATS)
        self._check_choice("activation_format", ACTIVATION_FORMATS)
        self._check_choice("query_format", QUERY_FORMATS)
        self._check_choice("key_format", KV_FORMATS)
        self._check_choice("value_format", KV_FORMATS)
        self._check_choice("prob_format", PROB_FORMATS)
        self._check_choice("prob_rounding", ROUNDING_MODES)
        self._check_choice("key_position", KEY_POSITIONS)
        self._check_choice("key_granularity", KEY_GRANULARITIES)
        self._check_choice("backend", BACKENDS)
        self._check_choice("calibration", CALIBRATIONS)
        if self.weight_group_size <= 0 or self.weight_group_size % 2:
            raise ValueError(f"weight_group_size must be a positive even number (e.g. 64 or 128), got {self.weight_group_size}")
        if self.residual_window < 0:
            raise ValueError(f"residual_window must be >= 0, got {self.residual_window}")
        if self.key_granularity == "per_channel" and (self.kivi_group_size <= 0 or self.kivi_group_size % 2):
            raise ValueError(f"kivi_group_size must be a positive even number, got {self.kivi_group_size}")
        if self.key_smoothing and self.key_format == "none":
            raise ValueError("key_smoothing needs quantized keys: set key_format='int4' or key_smoothing=False")
        if self.key_smoothing and self.key_granularity == "per_channel":
            raise ValueError("key_smoothing applies to per-token keys; per-channel (KIVI) keys need key_smoothing=False")
        if self.query_format != "none" and self.key_position == "pre_rope":
            raise ValueError(
                "an FP8 query is used with post-RoPE keys (Q.K^T on the PIM); pre-RoPE keys run Q.K^T on the NPU "
                "in 16 bits: set query_format='none' or key_position='post_rope'"
            )
        if self.key_smoothing and self.key_position == "pre_rope":
            raise ValueError("key smoothing is defined on post-RoPE keys: set key_position='post_rope' or key_smoothing=False")
        if self.fold_value_scale and self.prob_format != "none" and self.value_format == "none":
            raise ValueError("folding value scales into P needs quantized values: set value_format='int4' or fold_value_scale=False")
        if self.calibration == "awq" and self.weight_format == "none":
            object.__setattr__(self, "calibration", "none")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"P3Config.{name}={value!r} is not supported; choose one of {list(choices)}")

    @property
    def quantizes_kv(self) -> bool:
        return self.key_format != "none" or self.value_format != "none"

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_format != "none"

    def replace(self, **overrides: Any) -> "P3Config":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown P3Config field(s) {sorted(unknown)}; valid fields: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["skip_modules"] = list(self.skip_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "P3Config":
        return cls().replace(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "P3Config":
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "P3Config":
        """A named configuration (see PRESETS), with field overrides, e.g. preset("w4a8kv4p8", weight_group_size=64)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls().replace(**{**PRESETS[name], **overrides})


_NO_WEIGHTS = dict(weight_format="none", activation_format="none", calibration="none")
_NO_KV = dict(query_format="none", key_format="none", value_format="none", key_smoothing=False, prob_format="none")
_KV4_PLAIN = dict(query_format="none", key_smoothing=False, prob_format="none")
_KV4_SMOOTH = dict(query_format="fp8_e4m3", key_smoothing=True, prob_format="none")

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's scheme and its parts.
    "w4a8kv4p8": {},
    "kv4": dict(**_NO_WEIGHTS, query_format="fp8_e4m3", prob_format="none"),
    "w4a16": dict(**_NO_KV, activation_format="none"),
    "fp16": dict(**_NO_WEIGHTS, **_NO_KV),
    # Classic baselines.
    "int4-w4a8kv4": dict(weight_format="int4", activation_format="int8", calibration="none", **_KV4_PLAIN),
    "kivi-kv4": dict(**_NO_WEIGHTS, query_format="none", key_smoothing=False, key_granularity="per_channel", prob_format="none"),
    # The paper's ablation on Llama-3.1-8B (P3LLM.md section 5), one step at a time.
    "ablation-kv4-prerope": dict(**_NO_WEIGHTS, **_KV4_PLAIN, key_position="pre_rope"),
    "ablation-kv4-postrope": dict(**_NO_WEIGHTS, **_KV4_PLAIN),
    "ablation-kv4-smooth": dict(**_NO_WEIGHTS, **_KV4_SMOOTH),
    "ablation-w4int": dict(weight_format="int4", activation_format="none", calibration="none", **_KV4_SMOOTH),
    "ablation-w4bitmod": dict(activation_format="none", **_KV4_SMOOTH),
    "ablation-p-fp8": dict(activation_format="none", prob_format="fp8_e4m3"),
    "ablation-p-ue4m4": dict(activation_format="none"),
    "ablation-a-int8": dict(activation_format="int8"),
    "ablation-a-fp8": {},
}
