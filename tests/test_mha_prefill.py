"""The CPU MHA prefill (``backend/mha_prefill.py``) against the latent-space formula in float64:
scores q_nope . (W_UK c) + q_pe . k_pe, output softmax . (W_UV c), causal over context + new
tokens; and its cost rule."""

from __future__ import annotations

import pytest
import torch

from vllm_mla_backend.backend import mha_prefill as mp

RANK, ROPE, NOPE, V = 512, 64, 128, 128


def _reference(q, latent, w_kv, context_len, scale):
    """float64: query row j (position context_len + j) over latent rows 0 .. context_len + j."""
    L, h, _ = q.shape
    q, latent = q.double(), latent.double()
    w = w_kv.double().view(h, NOPE + V, RANK)
    w_uk, w_uv = w[:, :NOPE], w[:, NOPE:]
    c, k_pe = latent[:, :RANK], latent[:, RANK:]
    k_nope = torch.einsum("hdr,sr->hsd", w_uk, c)                    # [h, S, nope]
    v = torch.einsum("hdr,sr->hsd", w_uv, c)                         # [h, S, v]
    scores = (torch.einsum("lhd,hsd->hls", q[..., :NOPE], k_nope)
              + torch.einsum("lhd,sd->hls", q[..., NOPE:], k_pe)) * scale
    S = latent.shape[0]
    visible = torch.arange(S)[None, :] <= (context_len + torch.arange(L))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hls,hsd->lhd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("context_len,query_len,chunk", [
    (0, 200, 64),       # new tokens only, several chunks, a ragged last one
    (192, 70, 64),      # context in whole chunks, new tokens in one chunk
    (130, 5, 64),       # ragged context (read_context gets a partial last chunk)
    (0, 1, 64),
])
def test_matches_latent_formula(dtype, atol, context_len, query_len, chunk):
    gen = torch.Generator().manual_seed(context_len * 1000 + query_len)
    h, scale = 4, (NOPE + ROPE) ** -0.5
    latent = torch.randn(context_len + query_len, RANK + ROPE, generator=gen).to(dtype)
    w_kv = (torch.randn(h * (NOPE + V), RANK, generator=gen) / RANK ** 0.5).to(dtype)
    q = torch.randn(query_len, h, NOPE + ROPE, generator=gen).to(dtype)
    reads = []

    def read_context(k0, k1):
        reads.append((k0, k1))
        return latent[k0:k1]

    out = mp.mha_prefill(q, latent[context_len:], context_len, read_context, w_kv,
                         nope_dim=NOPE, v_dim=V, scale=scale, chunk=chunk)
    assert out.dtype == dtype and out.shape == (query_len, h, V)
    ref = _reference(q, latent, w_kv, context_len, scale)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    # the context is read once, in chunk-aligned pieces
    assert reads == [(k0, min(k0 + chunk, context_len)) for k0 in range(0, context_len, chunk)]


def test_cost_rule():
    dims = dict(kv_lora_rank=RANK, rope_dim=ROPE, nope_dim=NOPE, v_dim=V)
    assert mp.mha_pays(2048, 0, **dims)            # a fresh prompt
    assert mp.mha_pays(256, 0, **dims)
    assert mp.mha_pays(4096, 1024, **dims)         # a long chunk after a shorter context
    assert not mp.mha_pays(1024, 8192, **dims)     # decompressing the context costs more
    assert not mp.mha_pays(1, 4096, **dims)        # a decode-like row
    assert not mp.mha_pays(16, 32768, **dims)      # a short chunk: decompression dominates
    assert mp.chunk_tokens(128, 192, 2, 64) % 64 == 0
    assert mp.chunk_tokens(1 << 20, 192, 2, 64) == 64


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("", "auto"), ("MHA", "mha"),
                                            ("latent", "latent")])
def test_mode(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(mp.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(mp.ENV_VAR, value)
    assert mp.mode() == expected


def test_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv(mp.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VLLM_MLA_PREFILL='fast' is not valid: use one of "
                                         "auto, latent, mha"):
        mp.mode()
