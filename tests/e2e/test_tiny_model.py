"""The tiny checkpoint builder (fast: no vLLM engine): determinism, caching, the checkpoint format
vLLM expects, and the properties the end-to-end tests rely on (peaked attention, clear argmax)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from vllm_mla_backend.tiny_model import TinyModelSpec, build_tiny_model


def _digest_files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("moe"), moe=True, layers=3, seed=1)


def test_same_spec_same_bytes_and_cached(tmp_path, moe_dir):
    again = build_tiny_model(tmp_path / "again", moe=True, layers=3, seed=1)
    assert _digest_files(again) == _digest_files(moe_dir)
    stamp_mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again, moe=True, layers=3, seed=1) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp_mtime   # not rewritten


def test_other_seed_other_weights_and_rebuild_over_stale_folder(tmp_path, moe_dir):
    other = build_tiny_model(tmp_path / "m", moe=True, layers=3, seed=2)
    assert _digest_files(other)["model.safetensors"] != _digest_files(moe_dir)["model.safetensors"]
    build_tiny_model(tmp_path / "m", moe=True, layers=3, seed=1)     # same folder, new spec
    assert _digest_files(tmp_path / "m") == _digest_files(moe_dir)


def test_bad_specs_rejected():
    with pytest.raises(ValueError, match="layers"):
        TinyModelSpec(layers=0)
    with pytest.raises(ValueError, match="moe"):
        TinyModelSpec(layers=1, moe=True)
    for other in ({"moe": True}, {"index_topk": 64}, {"yarn": True}):
        with pytest.raises(ValueError, match="v2_lite"):
            TinyModelSpec(v2_lite=True, **other)


def test_checkpoint_layout(moe_dir):
    config = json.loads((moe_dir / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 64)
    assert config["num_hidden_layers"] == 3 and config["first_k_dense_replace"] == 1
    assert (config["scoring_func"], config["topk_method"]) == ("sigmoid", "noaux_tc")
    with safe_open(moe_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for layer in (1, 2):
        for e in range(config["n_routed_experts"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in names
        assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in names
    assert not any("gate_up_proj" in n for n in names)      # no transformers-internal fused names
    assert "model.layers.0.mlp.gate_proj.weight" in names    # layer 0 dense


def test_hf_loads_unfused_experts_exactly(moe_dir):
    """transformers re-fuses the per-expert tensors on load: gate rows then up rows."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    with safe_open(moe_dir / "model.safetensors", "pt") as f:
        gate = f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight")
        up = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
    torch.testing.assert_close(fused[3], torch.cat([gate, up]), rtol=0, atol=0)


def test_attention_peaked_and_argmax_clear(moe_dir):
    """What the e2e comparisons need: attention far from uniform, logits with a clear top-1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(moe_dir)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    ids = tok("The library was the oldest building in the city. Rain fell all night on the "
              "tin roof, and the cat sat by the door.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    t = ids.shape[1]
    for attn in out.attentions:                          # [1, heads, T, T], last query row
        last = attn[0, :, -1, :]
        entropy = -(last * last.clamp_min(1e-30).log()).sum(-1)
        assert entropy.mean() < 0.6 * torch.log(torch.tensor(float(t)))
    top2 = out.logits[0].topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    assert margins.median() > 0.5


def test_tokenizer_and_chat_template(moe_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(moe_dir)
    text = "Hello, how are you today?"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text     # byte-level round trip
    assert len(ids) < len(text.encode())                                   # BPE merges happened
    rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered == f"{tok.bos_token}<|user|>{text}\n<|assistant|>"
