"""Sibling P3Linear layers fed one input (an attention's q/k/v, an MLP's gate/up) computed in one backend call.

Hugging Face's modules call q_proj(x), k_proj(x) and v_proj(x) one after the other. Grouped, the first member
called computes every member's output where the backend fuses them (the triton backend at decode: one GEMV launch
over all their rows, kernels.gemm_w4.w4_matmul_shared_input) and keeps the others' until they are called with the
same, unchanged input. The outputs equal separate calls bit for bit. A member called while the others' outputs for
a different input are still waiting shows that this module does not feed them one input (or that a forward
failed between the calls): the group then stops sharing and every member computes its own output from then on.
Inputs without a version counter (created under torch.inference_mode) are never shared.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import get_backend
from .linear import P3Linear

# (parent attribute, member names): self-attention projections and gated-MLP projections
_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def _input_key(x: torch.Tensor) -> tuple | None:
    """What must not change between the members' calls: the version counter and the CUDA-graph capture state
    (inference tensors have no version counter: None, no sharing)."""
    if x.is_inference():  # asked first: reading _version raises here, and the exception costs ~7 us per call
        return None
    return x._version, x.is_cuda and torch.cuda.is_current_stream_capturing()


class SharedInputGroup:
    """P3Linear members with one in_features, fed the same input by their parent's forward."""

    def __init__(self, members: list[P3Linear]) -> None:
        self.members = members
        self.sharing = True  # False once the members were seen fed different inputs
        self._pending: tuple | None = None  # (input, key, {member index: output}) not yet returned

    def output(self, member: P3Linear, x: torch.Tensor) -> torch.Tensor:
        """member(x): its pending output when the group computed it for this x, else computed now (with the
        other members' outputs where the backend computes them together)."""
        pending = self._pending
        if not self.sharing:
            return member.compute(x)
        index = next(i for i, m in enumerate(self.members) if m is member)
        key = _input_key(x)
        if pending is not None:
            if pending[0] is x and pending[1] == key and index in pending[2]:
                out = pending[2].pop(index)
                if not pending[2]:
                    self._pending = None
                return out
            self._pending, self.sharing = None, False
            return member.compute(x)
        backend = get_backend(member.backend, x.device)
        if key is None or not backend.fuses_shared_input(x, member.activation_format) or not self._uniform(x.device):
            return member.compute(x)
        outs = backend.linear_shared_input(x, [m.qweight for m in self.members], [m.bias for m in self.members],
                                           member.activation_format)
        self._pending = (x, key, {i: y for i, y in enumerate(outs) if i != index})
        return outs[index]

    def _uniform(self, device: torch.device) -> bool:
        """Whether one call can compute every member: one backend, activation format and in_features, weights and
        biases on the input's device, and no accelerate hook (an offloaded member loads its weight only in its
        own forward)."""
        first = self.members[0]
        backend = get_backend(first.backend, device).name
        return all(get_backend(m.backend, device).name == backend and m.activation_format == first.activation_format
                   and m.in_features == first.in_features and m.weight_packed.device == device
                   and (m.bias is None or m.bias.device == device) and not hasattr(m, "_hf_hook") for m in self.members)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the waiting outputs (and the input they hold) behind."""
        return {**self.__dict__, "_pending": None}


def group_shared_inputs(model: nn.Module) -> int:
    """Group the q/k/v projections of each self-attention and the gate/up projections of each MLP when all are
    P3Linear with one in_features and activation format; returns how many groups were formed."""
    count = 0
    for layer in list(model.modules()):
        for parent_name, names in _GROUPS:
            parent = getattr(layer, parent_name, None)
            members = [getattr(parent, name, None) for name in names]
            if parent is None or not all(isinstance(m, P3Linear) for m in members):
                continue
            if len({(m.in_features, m.activation_format) for m in members}) != 1:
                continue
            group = SharedInputGroup(members)
            for m in members:
                m.shared_input = group
            count += 1
    return count


__all__ = ["SharedInputGroup", "group_shared_inputs"]
