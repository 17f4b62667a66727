"""Helpers of the end-to-end tests: engine runs in subprocesses, prompts, the HF oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("engine_worker.py")
ENGINE_TIMEOUT_S = 900
ENV_VAR = "VLLM_MLA_BACKEND"
# The worker binds its memory to one NUMA node; vLLM's default KV-cache fraction does not fit.
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class EngineFailed(RuntimeError):
    def __init__(self, returncode: int, log: str):
        self.returncode, self.log = returncode, log
        tail = "\n".join(log.splitlines()[-60:])
        super().__init__(f"engine worker exited with {returncode}:\n{tail}")


def run_engine(model: Path, *, backend: str | None, llm: dict, waves: list[dict],
               env: dict[str, str] | None = None) -> dict:
    """Start one engine in a fresh process (``backend``: the VLLM_MLA_BACKEND value, None for
    unset), run the generation waves, return the worker's JSON result (plus its log)."""
    request = {"model": str(model), "env": {**BASE_ENV, **(env or {})}, "llm": llm,
               "waves": waves, "unset_env": [] if backend is not None else [ENV_VAR]}
    if backend is not None:
        request["env"][ENV_VAR] = backend
    with tempfile.TemporaryDirectory(prefix="vllm-mla-e2e-") as tmp:
        req, res = Path(tmp, "request.json"), Path(tmp, "result.json")
        req.write_text(json.dumps(request))
        child_env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        proc = subprocess.run([sys.executable, str(WORKER), str(req), str(res)], env=child_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=ENGINE_TIMEOUT_S)
        if proc.returncode != 0 or not res.exists():
            raise EngineFailed(proc.returncode, proc.stdout)
        result = json.loads(res.read_text())
    result["log"] = proc.stdout
    return result


# --- prompts: chunked prefill + a shared prefix ----------------------------------------------

CHUNK_TOKENS = 64        # max_num_batched_tokens: every prompt here but one spans several chunks
LONG_CHUNK_TOKENS = 512  # the same for long_prefill_waves: chunks long enough for MHA prefill
PREFIX_TOKENS = 200      # shared by most prompts: more than one KV block (vLLM's CPU default: 128)
MAX_TOKENS = 16
TOP_LOGPROBS = 5


def _random_ids(gen: torch.Generator, n: int, vocab: int, first_id: int) -> list[int]:
    return torch.randint(first_id, vocab, (n,), generator=gen).tolist()


def chunked_prefix_waves(vocab_size: int, *, first_id: int = 5, seed: int = 0) -> list[dict]:
    """Wave 1 fills the prefix cache with one prompt; wave 2 reuses the prefix (suffixes of
    different lengths) next to unrelated prompts, batched together, greedy with top-k logprobs."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: _random_ids(gen, n, vocab_size, first_id)  # noqa: E731
    prefix = ids(PREFIX_TOKENS)
    bos = [0]
    wave1 = [bos + prefix + ids(40)]
    wave2 = [bos + prefix + ids(100), bos + prefix + ids(3), bos + ids(150), bos + ids(10)]
    sampling = {"max_tokens": MAX_TOKENS, "logprobs": TOP_LOGPROBS, "ignore_eos": True}
    return [{"prompts": wave1, "sampling": sampling}, {"prompts": wave2, "sampling": sampling}]


def long_prefill_waves(vocab_size: int, *, first_id: int = 5, seed: int = 1) -> list[dict]:
    """Prompts of 450-900 tokens for prefill chunks of up to LONG_CHUNK_TOKENS: wave 1 one
    701-token prompt, wave 2 the same 600-token prefix + 300 new tokens (a prefix-cache hit)
    next to an unrelated 451-token prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: _random_ids(gen, n, vocab_size, first_id)  # noqa: E731
    prefix = [0] + ids(600)
    sampling = {"max_tokens": 8, "logprobs": TOP_LOGPROBS, "ignore_eos": True}
    return [{"prompts": [prefix + ids(100)], "sampling": sampling},
            {"prompts": [prefix + ids(300), [0] + ids(450)], "sampling": sampling}]


def engine_kwargs(dtype: str, **extra) -> dict:
    """Chunked prefill with a small token budget and prefix caching, for every engine here."""
    return {"dtype": dtype, "max_model_len": 1024, "max_num_batched_tokens": CHUNK_TOKENS,
            "max_num_seqs": 8, "enable_chunked_prefill": True, "enable_prefix_caching": True,
            "seed": 0, **extra}


def flat_requests(waves: list[dict], result: dict) -> list[tuple[list[int], dict]]:
    """[(prompt ids, output dict)] over every wave."""
    return [(prompt, out) for wave, res in zip(waves, result["waves"])
            for prompt, out in zip(wave["prompts"], res["outputs"])]


# --- the HF transformers oracle ----------------------------------------------------------------

class HFReference:
    """Teacher-forced float32 log-probabilities from HF transformers (eager attention)."""

    def __init__(self, model_dir: Path, model_cls=None):
        if model_cls is None:
            from transformers import AutoModelForCausalLM as model_cls
        self.model = model_cls.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()

    @torch.no_grad()
    def logprobs(self, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), vocab]: log-softmax at each position that produced a token."""
        ids = torch.tensor([prompt + generated[:-1]])
        logits = self.model(ids).logits[0, len(prompt) - 1:].float()
        return torch.log_softmax(logits, dim=-1)


def fp8_block_roundtrip(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x through DeepSeek V3.2's indexer quantization (float32 math): per ``block`` elements a
    power-of-two scale >= amax / 448 (UE8M0), values rounded to e4m3."""
    g = x.float().unflatten(-1, (-1, block))
    scale = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True).clamp_min(1e-10)
                                             / 448.0)))
    return ((g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).flatten(-2)


def _v32_fp8_indexer_forward(self, hidden_states, q_resid, position_embeddings, attention_mask,
                             position_ids=None, past_key_values=None):
    """HF's ``DeepseekV32Indexer.forward`` with q and k quantized as vLLM's V3.2 indexer stores
    and scores them (HF scores in float32 without it), the score in float64."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    b, s, _ = hidden_states.shape
    rope, rest = self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim
    q = self.wq_b(q_resid).view(b, s, self.n_heads, self.head_dim)
    k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
    q_rot, q_pass = torch.split(q, [rope, rest], dim=-1)
    k_rot, k_pass = torch.split(k, [rope, rest], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, *position_embeddings, unsqueeze_dim=2)
    q = fp8_block_roundtrip(torch.cat([q_rot, q_pass], dim=-1))
    k = fp8_block_roundtrip(torch.cat([k_rot, k_pass], dim=-1).squeeze(2))
    if past_key_values is not None:
        k = past_key_values.update_indexer(k, self.layer_idx)
    scores = torch.relu(q.double() @ k.double().transpose(-1, -2).unsqueeze(1)) * self.softmax_scale
    weights = self.weights_proj(hidden_states).double() * self.n_heads ** -0.5
    index = (weights.unsqueeze(-2) @ scores).squeeze(-2)
    index = (index.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
             else index + attention_mask)
    return index.topk(min(self.index_topk, index.shape[-1]), dim=-1).indices.to(torch.int32)


class HFReferenceV32(HFReference):
    """The same for DeepSeek V3.2 checkpoints, the indexer quantized as vLLM's (whose top-k
    selection is what the engine must reproduce)."""

    def __init__(self, model_dir: Path):
        # by class: once vLLM is imported, its config registry maps deepseek_v32 to HF's V3
        # config, and the Auto classes would build a V3 model without indexers
        from transformers import DeepseekV32ForCausalLM
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer
        super().__init__(model_dir, DeepseekV32ForCausalLM)
        indexers = [m for m in self.model.modules() if isinstance(m, DeepseekV32Indexer)]
        assert indexers, "not a DeepSeek V3.2 checkpoint"
        for m in indexers:
            m.forward = _v32_fp8_indexer_forward.__get__(m)


@dataclass
class Comparison:
    max_abs: float           # over every logprob vLLM reported (sampled + top-k)
    mean_abs: float
    sampled_max_abs: float   # over the sampled tokens only
    argmax_mismatches: list  # (request, step, vllm token, hf argmax, hf margin top1-top2)
    tokens: int

    def summary(self) -> str:
        return (f"max |dlogprob| {self.max_abs:.2e} (sampled tokens {self.sampled_max_abs:.2e}), "
                f"mean {self.mean_abs:.2e} over {self.tokens} steps, "
                f"{len(self.argmax_mismatches)} greedy tokens differ from HF argmax")


def compare_to_hf(hf: HFReference, requests: list[tuple[list[int], dict]]) -> Comparison:
    diffs, sampled, mismatches, steps = [], [], [], 0
    for r, (prompt, out) in enumerate(requests):
        ref = hf.logprobs(prompt, out["token_ids"])
        for step, (token, reported) in enumerate(zip(out["token_ids"], out["logprobs"])):
            steps += 1
            for tok, lp in reported.items():
                d = abs(lp - ref[step, int(tok)].item())
                diffs.append(d)
                if int(tok) == token:
                    sampled.append(d)
            top2 = ref[step].topk(2)
            if top2.indices[0].item() != token:
                mismatches.append((r, step, token, top2.indices[0].item(),
                                   (top2.values[0] - top2.values[1]).item()))
    d = torch.tensor(diffs, dtype=torch.float64)
    return Comparison(d.max().item(), d.mean().item(), max(sampled), mismatches, steps)


def served_by_us(result: dict) -> bool:
    """Every attention layer ran our impl (``backends``: ``NAME:impl.module.Class``)."""
    impls = [b.split(":", 1)[1] for b in result["backends"]]
    return bool(impls) and all(i.startswith("vllm_mla_backend.") for i in impls)
