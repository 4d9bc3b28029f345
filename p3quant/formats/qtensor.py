"""Quantized-tensor containers: plain dataclasses of tensors, movable and serializable to flat dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

T = TypeVar("T", bound="QuantizedTensor")


@dataclass
class QuantizedTensor:
    """Base class: tensor fields plus static metadata (ints/strings/tuples) describing the layout."""

    kind: ClassVar[str] = "base"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def metadata(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self: T, device: torch.device | str) -> T:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def nbytes(self) -> int:
        """Bytes held by the tensor fields (what the quantized operand really costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat {name: tensor} dict for safetensors; metadata is encoded as small int64 tensors."""
        out = {f"{prefix}{k}": v.contiguous() for k, v in self.tensors().items()}
        for key, value in self.metadata().items():
            out[f"{prefix}{key}"] = torch.tensor(list(value) if isinstance(value, tuple) else [value], dtype=torch.int64)
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, torch.Tensor], prefix: str = "") -> T:
        kwargs: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if key not in data:
                raise KeyError(f"{cls.__name__}.from_dict: missing entry {key!r}")
            value = data[key]
            if f.type in ("tuple[int, ...]",):
                kwargs[f.name] = tuple(int(v) for v in value.tolist())
            elif f.type in ("int",):
                kwargs[f.name] = int(value.item())
            elif f.type in ("bool",):
                kwargs[f.name] = bool(value.item())
            else:
                kwargs[f.name] = value
        return cls(**kwargs)
