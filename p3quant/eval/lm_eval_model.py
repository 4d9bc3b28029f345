"""lm-eval model "p3": lm-eval's HFLM over a P3-quantized Hugging Face model.

    python -m p3quant.eval.lm_eval_cli --model p3 \\
        --model_args pretrained=smollm2-135m,preset=w4a8kv4p8,backend=torch,weight_group_size=64 --tasks p3_piqa

`pretrained` is a folder (a float checkpoint, quantized on load, or a saved P3 checkpoint, loaded as saved) or a
p3quant.models name; `preset` picks the P3Config and every other P3Config field given in model_args overrides it;
`awq=True` calibrates with AWQ on the offline C4 subset first. In Python, `P3LM(pretrained=model, tokenizer=tok)`
(or plain HFLM) evaluates an in-memory quantized model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import P3Config

MODEL_NAME = "p3"
_FIELDS = {f.name: f for f in dataclasses.fields(P3Config)}


def _coerce(name: str, value: Any) -> Any:
    """model_args arrive as strings or numbers: convert to the P3Config field's type."""
    default = _FIELDS[name].default
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, tuple):
        return tuple(v for v in str(value).split("|") if v)
    return str(value)


def p3_config_from_args(preset: str, overrides: dict[str, Any]) -> P3Config:
    return P3Config.preset(preset, **{k: _coerce(k, v) for k, v in overrides.items()})


def _is_p3_checkpoint(folder: Path) -> bool:
    import json

    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "p3"


def load_quantized(pretrained: str, config: P3Config, awq: bool = False, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer): a saved P3 folder as saved, else a float model (folder or name) quantized with config.

    The float model is moved to `device` before quantizing, so a GPU does the quantization (seconds, where a
    CPU shared by several data-parallel processes takes minutes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import quantize
    from ..models import load

    folder = Path(pretrained).expanduser()
    if folder.is_dir() and _is_p3_checkpoint(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        return (model if device is None else model.to(device)), AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model, tokenizer = load(pretrained, dtype=getattr(torch, dtype), device=device)
    calibration = None
    if awq:
        from ..calibration.texts import calibration_texts

        calibration = calibration_texts()
    return quantize(model, config, calibration=calibration, tokenizer=tokenizer), tokenizer


@register_model(MODEL_NAME)
class P3LM(HFLM):
    """HFLM whose model is P3-quantized (see the module docstring for the model_args)."""

    def __init__(self, pretrained: Any = "smollm2-135m", preset: str = "w4a8kv4p8", awq: bool = False, **kwargs: Any) -> None:
        p3_args = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        accelerator = None
        if isinstance(pretrained, str):
            config = p3_config_from_args(preset, p3_args)
            dtype = str(kwargs.pop("dtype", "float32"))
            accelerator = _data_parallel_accelerator()
            device = accelerator.device if accelerator is not None else _usable(kwargs.get("device"))
            model, tokenizer = load_quantized(pretrained, config, awq=_coerce("key_smoothing", awq), dtype=dtype, device=device)
            kwargs.setdefault("tokenizer", tokenizer)
            pretrained = model
        elif p3_args:
            raise ValueError(f"P3 options {sorted(p3_args)} apply when quantizing from a name or folder; this model is already built")
        super().__init__(pretrained=pretrained, **kwargs)
        if accelerator is not None:  # HFLM skips its data-parallel setup for a built model: do it here
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def _model_call(self, inps, attn_mask=None, labels=None):
        """As HFLM, but a right-padded causal batch runs left-padded with its mask (logits mapped back).

        HFLM right-pads and passes no mask. P3 keeps each sequence's newest token in 16 bits and computes its
        key-smoothing factor over the prompt, so the padding must be masked and sit before the real tokens;
        otherwise a request's score would depend on which requests share its batch.
        """
        if attn_mask is not None or labels is not None or inps.shape[0] == 1:
            return super()._model_call(inps, attn_mask, labels)
        real = right_padding_mask(inps)
        positions = torch.arange(inps.shape[1], device=inps.device)
        shift = (~real).sum(dim=1, keepdim=True)
        to_left = (positions - shift) % inps.shape[1]  # left-padded position j holds original token j - shift
        left_mask = positions >= shift
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(input_ids=inps.gather(1, to_left), attention_mask=left_mask.long(),
                                position_ids=(left_mask.cumsum(dim=1) - 1).clamp(min=0)).logits
        back = ((positions + shift) % inps.shape[1]).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return logits.gather(1, back)


def right_padding_mask(inps: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True up to each row's last nonzero token (lm-eval right-pads causal batches with token 0).

    A leading 0 (some tokenizers' end-of-text, used by lm-eval as the prefix of empty contexts) stays visible;
    only the trailing run of zeros counts as padding.
    """
    positions = torch.arange(1, inps.shape[1] + 1, device=inps.device)
    last = torch.where(inps != 0, positions, 0).amax(dim=1, keepdim=True)
    return positions.unsqueeze(0) <= last


def _usable(device: str | None) -> str | None:
    """The requested device, or None when it is a CUDA device on a machine without CUDA (HFLM falls back too)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return None
    return device


def _data_parallel_accelerator():
    """An accelerate Accelerator when launched with `accelerate launch` on more than one process, else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()
