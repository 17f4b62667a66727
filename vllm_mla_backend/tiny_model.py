"""Tiny random-weight DeepSeek-V3 checkpoints for tests, demos and benchmarks (no model hub).

The attention geometry is DeepSeek's real MLA geometry (kv_lora_rank 512, rope 64, nope 128,
v 128: a 576-wide latent cache entry), everything else is small: hidden 256, 4 heads, 2-4 layers,
a vocabulary of about 1000 byte-level BPE tokens trained here on a text shipped in the package.
``--moe`` makes every layer after the first a routed-expert layer (4 experts, top 2, sigmoid
router with a correction bias: DeepSeek-V3's ``noaux_tc`` routing), so vLLM's fused MoE path runs.
``--index-topk K`` makes it DeepSeek V3.2 (``DeepseekV32ForCausalLM``): every layer gets a DSA
indexer (16 heads of 128, V3.2's head size) that picks K tokens per query.  ``--yarn`` adds
DeepSeek V3's released RoPE scaling (YaRN; it also scales the softmax); ``--v2-lite`` builds
``DeepseekV2ForCausalLM`` as DeepSeek-V2-Lite (q without LoRA, its YaRN block), dense layers.

Weights are drawn per tensor from a generator seeded by (seed, tensor name): the same spec gives
the same bytes on every machine.  Plain ``std=0.02`` initialisation makes attention nearly uniform
and next-token logits nearly flat, which hides attention bugs and makes greedy decoding flip on
rounding noise; so every projection is scaled by its fan-in (unit-variance activations) and the
query / key projections and the output head get extra gain: attention scores have a standard
deviation of about 3 (peaked, position-dependent attention) and logits about 6 (clear argmax).

The checkpoint is written the way DeepSeek ships it: one ``config.json`` (``DeepseekV3ForCausalLM``,
``scoring_func``/``topk_method`` set as in the real config), per-expert weight names
(``mlp.experts.{e}.gate_proj.weight``; transformers 5 fuses experts only in memory), float32
``model.safetensors``, and a ``tokenizer.json`` with a chat template.  A stamp file holding a hash
of the spec, builder version and corpus makes a rebuild of an unchanged spec a no-op.

    python -m vllm_mla_backend.tiny_model --out DIR [--moe] [--layers N] [--seed S] [--index-topk K]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BUILDER_VERSION = 2   # bump when the output changes for the same spec
V32_BUILDER_VERSION = 2   # the same for the V3.2 specs only (2: 16 indexer heads)
CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
STAMP = "tiny_model.json"

BOS, EOS = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# DeepSeek V3 / R1's released rope_scaling: YaRN over a 4k original context, and mscale_all_dim
# scales the softmax by yarn_mscale(40)^2 = 1.874 (every real V2 / V3 config has such a block).
YARN_ROPE = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_MAX_POSITIONS = 163840
# DeepSeek-V2-Lite's: the same YaRN with mscale 0.707 (softmax scale x yarn_mscale(40, 0.707)^2)
V2_LITE_ROPE = {**YARN_ROPE, "mscale": 0.707, "mscale_all_dim": 0.707}

ATTENTION_SCORE_STD = 3.0   # std of q.k / sqrt(d_qk) at initialisation
LOGIT_STD = 6.0             # std of the output logits at initialisation


@dataclass(frozen=True)
class TinyModelSpec:
    layers: int = 2
    moe: bool = False
    seed: int = 0
    vocab_target: int = 1024
    index_topk: int | None = None   # set: DeepSeek V3.2 (a DSA indexer per layer, this top-k)
    yarn: bool | None = None        # True: DeepSeek V3's YaRN RoPE scaling (see YARN_ROPE)
    v2_lite: bool | None = None     # True: DeepseekV2ForCausalLM as V2-Lite (no q LoRA, its YaRN)

    def __post_init__(self):
        if not 1 <= self.layers <= 8:
            raise ValueError(f"layers must be in [1, 8], got {self.layers}")
        if self.index_topk is not None and (self.index_topk < 64 or self.index_topk % 64):
            raise ValueError(f"index_topk must be a positive multiple of 64, got {self.index_topk}")
        if self.v2_lite and (self.moe or self.index_topk is not None or self.yarn):
            raise ValueError("v2_lite is dense, with its own RoPE scaling: no moe / index_topk / "
                             "yarn")
        if self.moe and self.layers < 2:
            raise ValueError("moe needs layers >= 2 (layer 0 stays dense, as in DeepSeek-V3)")

    def digest(self) -> str:
        spec = {k: v for k, v in asdict(self).items() if v is not None}  # V3 digests unchanged
        if self.index_topk is not None:
            spec["v32_builder"] = V32_BUILDER_VERSION
        payload = json.dumps({"spec": spec, "builder": BUILDER_VERSION,
                              "corpus": hashlib.sha256(CORPUS.read_bytes()).hexdigest()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        kind = "moe" if self.moe else "dense"
        arch = "dsv3" if self.index_topk is None else f"dsv32-top{self.index_topk}"
        arch = "dsv2lite" if self.v2_lite else arch + ("-yarn" if self.yarn else "")
        return f"tiny-{arch}-{kind}-l{self.layers}-s{self.seed}-{self.digest()}"

    def config(self, vocab_size: int, bos_id: int, eos_id: int):
        from transformers import DeepseekV2Config, DeepseekV3Config, DeepseekV32Config
        # DeepSeek's MLA geometry at a tiny hidden size, shared by every variant
        mla = dict(
            vocab_size=vocab_size, hidden_size=256, intermediate_size=512,
            num_hidden_layers=self.layers, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
            v_head_dim=128, head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None, dtype="float32")
        if self.v2_lite:
            # q straight from the hidden state (``q_proj``, no LoRA), its YaRN; dense layers
            return DeepseekV2Config(**{**mla, **dict(
                q_lora_rank=None, first_k_dense_replace=self.layers,
                rope_scaling=dict(V2_LITE_ROPE), max_position_embeddings=YARN_MAX_POSITIONS,
                architectures=["DeepseekV2ForCausalLM"], topk_method="greedy")})
        v32 = {} if self.index_topk is None else dict(
            # the indexer at DeepSeek V3.2's head size (vLLM's kernels need 128); 16 heads, so that
            # index scores (sums of per-head ReLUs) are almost never tied at zero
            index_topk=self.index_topk, index_n_heads=16, index_head_dim=128,
            architectures=["DeepseekV32ForCausalLM"])
        yarn = {} if not self.yarn else dict(rope_scaling=dict(YARN_ROPE),
                                             max_position_embeddings=YARN_MAX_POSITIONS)
        config_cls = DeepseekV3Config if self.index_topk is None else DeepseekV32Config
        return config_cls(**{**mla, **dict(
            moe_intermediate_size=128, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1 if self.moe else self.layers,
            num_nextn_predict_layers=0, max_position_embeddings=4096,
            architectures=["DeepseekV3ForCausalLM"],
            # vLLM reads these two (the real DeepSeek-V3 config has them); HF always routes so.
            scoring_func="sigmoid", topk_method="noaux_tc",
        ), **v32, **yarn})


def default_out_dir(spec: TinyModelSpec) -> Path:
    from .build import cache_root
    return cache_root() / "tiny_models" / spec.name


def build_tiny_model(out: str | os.PathLike | None = None, *, layers: int = 2, moe: bool = False,
                     seed: int = 0, index_topk: int | None = None, yarn: bool = False,
                     v2_lite: bool = False) -> Path:
    """Write the checkpoint for this spec into ``out`` (default: the cache) unless it is there."""
    spec = TinyModelSpec(layers=layers, moe=moe, seed=seed, index_topk=index_topk,
                         yarn=yarn or None, v2_lite=v2_lite or None)
    out = Path(out) if out is not None else default_out_dir(spec)
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("digest") == spec.digest():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the destination, then move files in: a half-written model is never stamped.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tiny-build-") as tmp:
        tmp = Path(tmp)
        tokenizer = _write_tokenizer(tmp, spec)
        config = spec.config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        config.save_pretrained(tmp)
        _write_generation_config(tmp, config)
        _write_weights(tmp / "model.safetensors", config, spec.seed)
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    stamp.write_text(json.dumps({"digest": spec.digest(), "spec": asdict(spec)}, indent=1))
    return out


# --- tokenizer ------------------------------------------------------------------------------

def _write_tokenizer(out: Path, spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_target, min_frequency=2,
                                  special_tokens=[BOS, EOS, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(keepends=True), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, chat_template=CHAT_TEMPLATE,
                                   model_max_length=4096)
    fast.save_pretrained(out)
    return fast


def _write_generation_config(out: Path, config) -> None:
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=1))


# --- weights --------------------------------------------------------------------------------

def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _gain(name: str, config) -> float:
    """Multiplier on 1/sqrt(fan_in) for a weight, chosen from the variances it feeds."""
    # q, k_nope and k_pe (and v) get variance S, so q.k / sqrt(d_qk) has std S.  Their inputs
    # have unit variance (q_a / kv_a layernorms; the k_pe input is the normed hidden state).
    if name.endswith(("q_b_proj.weight", "self_attn.q_proj.weight", "kv_b_proj.weight",
                      "kv_a_proj_with_mqa.weight",
                      "indexer.wq_b.weight", "indexer.wk.weight")):
        return math.sqrt(ATTENTION_SCORE_STD)
    if name == "lm_head.weight":
        return LOGIT_STD
    if name.endswith("mlp.gate.weight"):
        return 2.0      # decisive routing: top-2 expert choice is far from a tie
    if name == "model.embed_tokens.weight":
        return math.sqrt(config.hidden_size)   # unit-variance embeddings
    return 1.0


def _init_tensor(name: str, shape: torch.Size, config, seed: int) -> torch.Tensor:
    gen = _generator(seed, name)
    if name.endswith("norm.weight"):
        # Norm gains near 1 with some spread, so a dropped or misapplied norm is visible.
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) * (_gain(name, config) / math.sqrt(fan_in))


def _unfused_expert_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers 5 keeps experts fused; DeepSeek checkpoints (and vLLM) name each one."""
    prefix, kind = name.rsplit(".", 1)              # "model.layers.1.mlp.experts", "gate_up_proj"
    out = {}
    for e, expert in enumerate(tensor):
        if kind == "gate_up_proj":                   # [2I, H]: gate rows then up rows
            gate, up = expert.chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate
            out[f"{prefix}.{e}.up_proj.weight"] = up
        else:
            out[f"{prefix}.{e}.down_proj.weight"] = expert
    return out


def _write_weights(path: Path, config, seed: int) -> None:
    from safetensors.torch import save_file
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

    model_cls = {"deepseek_v32": DeepseekV32ForCausalLM,
                 "deepseek_v2": DeepseekV2ForCausalLM}.get(config.model_type, DeepseekV3ForCausalLM)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in model_cls(config).state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        value = _init_tensor(name, shape, config, seed).float()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors.update(_unfused_expert_tensors(name, value))
        else:
            tensors[name] = value
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path),
              metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_mla_backend.tiny_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint folder (default: a folder in the cache named by the spec)")
    parser.add_argument("--moe", action="store_true", help="routed-expert layers after layer 0")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index-topk", type=int, default=None,
                        help="DeepSeek V3.2 architecture: a DSA indexer with this top-k")
    parser.add_argument("--yarn", action="store_true", help="DeepSeek V3's YaRN RoPE scaling")
    parser.add_argument("--v2-lite", action="store_true",
                        help="DeepseekV2ForCausalLM as DeepSeek-V2-Lite (dense layers)")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out, layers=args.layers, moe=args.moe, seed=args.seed,
                           index_topk=args.index_topk, yarn=args.yarn, v2_lite=args.v2_lite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
