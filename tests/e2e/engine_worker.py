"""Run one vLLM engine in its own process and write what it generated as JSON.

    python engine_worker.py REQUEST.json RESULT.json

Each engine configuration gets a fresh process: vLLM's global state (distributed groups, the
plugin's backend registration, compilation caches) does not support two differently configured
engines in one process.  The request names the model, the environment (``VLLM_MLA_BACKEND``),
``LLM(...)`` keyword arguments and a list of generation waves; waves run one after another so a
later wave can hit the prefix cache an earlier one filled.  The result holds, per request, the
generated token ids and, per generated token, the top-k logprobs vLLM reported (the sampled token
included), plus which attention backend served the MLA layers and the engine start time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# vLLM's worker processes import engine_probe by name: put this folder on their path too.
_HERE = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_HERE, os.environ.get("PYTHONPATH")]))
sys.path.insert(0, _HERE)

import engine_probe  # noqa: E402

# apply_model ships engine_probe's function to the workers: vLLM pickles callables only if allowed.
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def _token_logprobs(step: dict) -> dict[str, float]:
    return {str(tok): lp.logprob for tok, lp in step.items()}


def _prefix_cache_counters(llm) -> dict[str, float]:
    counters = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
            counters[metric.name.split(":", 1)[1]] = getattr(metric, "value", 0)
    return counters


def run(request: dict) -> dict:
    os.environ.update(request.get("env", {}))
    for name in request.get("unset_env", []):
        os.environ.pop(name, None)
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=request["model"], disable_log_stats=False, **request.get("llm", {}))
    result: dict = {"start_s": time.perf_counter() - started, "waves": []}
    result["backends"] = sorted({n for names in llm.apply_model(engine_probe.attention_backends)
                                 for n in names})
    result["indexers"] = sorted({n for names in llm.apply_model(engine_probe.sparse_indexers)
                                 for n in names})
    for wave in request["waves"]:
        params = SamplingParams(temperature=0.0, **wave["sampling"])
        prompts = [{"prompt_token_ids": ids} for ids in wave["prompts"]]
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        result["waves"].append({
            "seconds": seconds,
            "outputs": [{
                "token_ids": list(out.outputs[0].token_ids),
                "logprobs": [_token_logprobs(step) for step in (out.outputs[0].logprobs or [])],
                "num_cached_tokens": out.num_cached_tokens,
            } for out in outputs],
        })
    result["prefix_cache"] = _prefix_cache_counters(llm)
    return result


def main() -> int:
    request_path, result_path = sys.argv[1:3]
    with open(request_path) as f:
        request = json.load(f)
    result = run(request)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
