"""Register quant_method "p3" with transformers so a saved P3 model reloads with from_pretrained.

The checkpoint is plain safetensors (packed codes, FP16-bit scales, selectors/zero points); config.json
carries the P3Config and the names of the packed modules, so loading rebuilds exactly the same model.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import P3Config

METHOD = "p3"


class P3QuantizationConfig(QuantizationConfigMixin):
    """What config.json stores: the full P3Config and the packed module names."""

    def __init__(self, p3_config: dict[str, Any] | None = None, modules: list[str] | None = None, **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.p3_config = P3Config.from_dict(p3_config or {}).to_dict()
        self.modules = list(modules or [])

    @property
    def p3(self) -> P3Config:
        return P3Config.from_dict(self.p3_config)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "p3_config": dict(self.p3_config), "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        data = {k: v for k, v in config_dict.items() if k != "quant_method"}
        config = cls(**data)
        return (config, kwargs) if return_unused_kwargs else config


class P3HfQuantizer(HfQuantizer):
    """Loads pre-quantized P3 checkpoints (quantizing at load time is p3quant.quantize's job)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from ..nn.patching import replace_linears

        replace_linears(model, self.quantization_config.p3, names=self.quantization_config.modules, quantize=False)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..nn.mlp import fuse_mlps
        from ..nn.norm import fuse_norms
        from ..nn.shared_input import group_shared_inputs
        from ..nn.patching import attach_attention, uses_p3_attention

        fuse_norms(model)
        fuse_mlps(model)
        group_shared_inputs(model)
        config = self.quantization_config.p3
        if uses_p3_attention(config):
            attach_attention(model, config)
        model.p3_config = config
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make quant_method "p3" known to transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(METHOD, P3QuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(METHOD, P3HfQuantizer)


register()
