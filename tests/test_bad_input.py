"""Bad input: each raises TypeError / ValueError / IndexError naming the argument, before any
kernel runs (never a crash, a hang, an out-of-bounds access or a silent wrong answer)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_mla_backend import ops
from vllm_mla_backend.layouts import KVLayout

from cases import dense_case, poisoned_cache

BF16 = torch.bfloat16


def _write_args(layout="V32_FP8", T=3, nb=2, bs=4):
    from vllm_mla_backend.layouts import as_layout
    lay = as_layout(layout)
    return dict(cache=poisoned_cache(lay, nb, bs), kv_nope=torch.zeros(T, lay.d_nope, dtype=BF16),
                k_rope=torch.zeros(T, 64, dtype=BF16), slot_mapping=torch.arange(T),
                layout=lay)


def _decode_args(layout="BF16", b=2, bs=4, nb=4, h_q=4, h_kv=1):
    from vllm_mla_backend.layouts import as_layout
    lay = as_layout(layout)
    return dict(q=torch.zeros(b, 1, h_q, lay.d_qk, dtype=BF16),
                cache=poisoned_cache(lay, nb, bs, h_kv),
                block_table=torch.zeros(b, 2, dtype=torch.int32),
                seq_lens=torch.full((b,), 3, dtype=torch.int32), layout=lay)


def _sparse_args(layout="V32_FP8", b=2, topk=8, h_q=4):
    from vllm_mla_backend.layouts import as_layout
    lay = as_layout(layout)
    return dict(q=torch.zeros(b, 1, h_q, lay.d_qk, dtype=BF16), cache=poisoned_cache(lay, 2, 4),
                indices=torch.full((b, 1, topk), -1, dtype=torch.int32), layout=lay)


def _prefill_args(d_qk=576, s_q=2, topk=8, h_q=4):
    return dict(q=torch.zeros(s_q, h_q, d_qk, dtype=BF16),
                kv=torch.zeros(10, 1, d_qk, dtype=BF16),
                indices=torch.zeros(s_q, 1, topk, dtype=torch.int32), softmax_scale=0.1)


def _with(base, **changes):
    return {**base, **changes}


WRITE = _write_args()
DEC = _decode_args()
SP = _sparse_args()
PF = _prefill_args()

# (id, op, kwargs, exception, message pattern naming the argument)
BAD = [
    # write_kv
    ("write-cache-dtype", ops.write_kv, _with(WRITE, cache=torch.zeros(2, 4, 1, 656)),
     TypeError, "cache"),
    ("write-cache-width", ops.write_kv, _with(WRITE, cache=torch.zeros(2, 4, 1, 655,
                                                                      dtype=torch.uint8)),
     ValueError, "cache"),
    ("write-cache-rank", ops.write_kv, _with(WRITE, cache=torch.zeros(8, 656, dtype=torch.uint8)),
     ValueError, "cache"),
    ("write-cache-block-stride", ops.write_kv,
     _with(WRITE, cache=torch.zeros(4000, dtype=torch.uint8).as_strided((2, 4, 1, 656),
                                                                        (1000, 656, 656, 1))),
     ValueError, "cache"),
    ("write-nope-width", ops.write_kv, _with(WRITE, kv_nope=torch.zeros(3, 448, dtype=BF16)),
     ValueError, "kv_nope"),
    ("write-nope-dtype", ops.write_kv, _with(WRITE, kv_nope=torch.zeros(3, 512,
                                                                       dtype=torch.int32)),
     TypeError, "kv_nope"),
    ("write-nope-tokens", ops.write_kv, _with(WRITE, kv_nope=torch.zeros(4, 512, dtype=BF16)),
     ValueError, "kv_nope"),
    ("write-rope-width", ops.write_kv, _with(WRITE, k_rope=torch.zeros(3, 32, dtype=BF16)),
     ValueError, "k_rope"),
    ("write-slot-dtype", ops.write_kv, _with(WRITE, slot_mapping=torch.zeros(3)),
     TypeError, "slot_mapping"),
    ("write-slot-rank", ops.write_kv, _with(WRITE, slot_mapping=torch.zeros(3, 1,
                                                                           dtype=torch.int64)),
     ValueError, "slot_mapping"),
    ("write-slot-outside", ops.write_kv, _with(WRITE, slot_mapping=torch.tensor([0, 8, 1])),
     IndexError, r"slot_mapping\[1\]"),
    ("write-layout", ops.write_kv, _with(WRITE, layout="fp4"), ValueError, "layout"),
    ("write-k-scale", ops.write_kv, _with(_write_args("FP8"), k_scale=0.0), ValueError,
     "k_scale"),
    ("write-k-scale-nan", ops.write_kv, _with(_write_args("FP8"), k_scale=math.nan), ValueError,
     "k_scale"),
    ("write-k-scale-tensor-zero", ops.write_kv, _with(_write_args("FP8"),
                                                      k_scale=torch.tensor(0.0)),
     ValueError, "k_scale"),
    ("write-k-scale-tensor-shape", ops.write_kv, _with(_write_args("FP8"),
                                                       k_scale=torch.ones(2)),
     ValueError, "k_scale"),
    ("decode-k-scale-tensor-inf", ops.mla_decode, _with(_decode_args("FP8"),
                                                        k_scale=torch.tensor([math.inf])),
     ValueError, "k_scale"),
    # dense decode
    ("decode-q-dtype", ops.mla_decode, _with(DEC, q=torch.zeros(2, 1, 4, 576,
                                                                dtype=torch.float64)),
     TypeError, "q"),
    ("decode-q-rank", ops.mla_decode, _with(DEC, q=torch.zeros(2, 4, 576, dtype=BF16)),
     ValueError, "q"),
    ("decode-q-width", ops.mla_decode, _with(DEC, q=torch.zeros(2, 1, 4, 512, dtype=BF16)),
     ValueError, "q"),
    ("decode-model1-q-width", ops.mla_decode,
     _with(_decode_args("MODEL1_FP8"), q=torch.zeros(2, 1, 4, 576, dtype=BF16)),
     ValueError, "q"),
    ("decode-heads", ops.mla_decode, _with(_decode_args(h_kv=2), q=torch.zeros(2, 1, 3, 576,
                                                                               dtype=BF16)),
     ValueError, "heads"),
    ("decode-cache-layout", ops.mla_decode, _with(DEC, layout="V32_FP8"), TypeError, "cache"),
    ("decode-table-dtype", ops.mla_decode, _with(DEC, block_table=torch.zeros(2, 2,
                                                                              dtype=torch.int64)),
     TypeError, "block_table"),
    ("decode-table-batch", ops.mla_decode, _with(DEC, block_table=torch.zeros(3, 2,
                                                                              dtype=torch.int32)),
     ValueError, "block_table"),
    ("decode-seq-dtype", ops.mla_decode, _with(DEC, seq_lens=torch.ones(2, dtype=torch.int64)),
     TypeError, "seq_lens"),
    ("decode-seq-negative", ops.mla_decode, _with(DEC, seq_lens=torch.tensor([3, -1],
                                                                             dtype=torch.int32)),
     ValueError, r"seq_lens\[1\]"),
    ("decode-seq-too-long", ops.mla_decode, _with(DEC, seq_lens=torch.tensor([3, 9],
                                                                             dtype=torch.int32)),
     ValueError, r"seq_lens\[1\]"),
    ("decode-block-outside", ops.mla_decode,
     _with(DEC, block_table=torch.tensor([[0, 9], [1, 2]], dtype=torch.int32),
           seq_lens=torch.tensor([5, 3], dtype=torch.int32)),
     IndexError, r"block_table\[0, 1\]"),
    ("decode-block-negative", ops.mla_decode,
     _with(DEC, block_table=torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32)),
     IndexError, r"block_table\[1, 0\]"),
    ("decode-out-shape", ops.mla_decode, _with(DEC, out=torch.zeros(2, 1, 4, 576, dtype=BF16)),
     ValueError, "out"),
    ("decode-out-dtype", ops.mla_decode, _with(DEC, out=torch.zeros(2, 1, 4, 512)),
     TypeError, "out"),
    ("decode-out-stride", ops.mla_decode,
     _with(DEC, out=torch.zeros(2, 1, 512, 4, dtype=BF16).transpose(2, 3)), ValueError, "out"),
    ("decode-scale", ops.mla_decode, _with(DEC, softmax_scale=math.inf), ValueError,
     "softmax_scale"),
    ("decode-impl", ops.mla_decode, _with(DEC, impl="tpu"), ValueError, "impl"),
    ("decode-impl-device", ops.mla_decode, _with(DEC, impl="cuda"), ValueError, "impl"),
    # sparse decode
    ("sparse-indices-rank", ops.mla_sparse_decode,
     _with(SP, indices=torch.zeros(2, 8, dtype=torch.int32)), ValueError, "indices"),
    ("sparse-indices-dtype", ops.mla_sparse_decode,
     _with(SP, indices=torch.zeros(2, 1, 8, dtype=torch.int64)), TypeError, "indices"),
    ("sparse-indices-batch", ops.mla_sparse_decode,
     _with(SP, indices=torch.zeros(2, 2, 8, dtype=torch.int32)), ValueError, "indices"),
    ("sparse-topk-length-big", ops.mla_sparse_decode,
     _with(SP, topk_length=torch.tensor([8, 9], dtype=torch.int32)), ValueError,
     r"topk_length\[1\]"),
    ("sparse-topk-length-negative", ops.mla_sparse_decode,
     _with(SP, topk_length=torch.tensor([-1, 2], dtype=torch.int32)), ValueError,
     r"topk_length\[0\]"),
    ("sparse-topk-length-shape", ops.mla_sparse_decode,
     _with(SP, topk_length=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
     "topk_length"),
    ("sparse-sink-shape", ops.mla_sparse_decode, _with(SP, attn_sink=torch.zeros(5)), ValueError,
     "attn_sink"),
    ("sparse-sink-dtype", ops.mla_sparse_decode, _with(SP, attn_sink=torch.zeros(4, dtype=BF16)),
     TypeError, "attn_sink"),
    ("sparse-extra-indices-alone", ops.mla_sparse_decode,
     _with(SP, extra_indices=torch.zeros(2, 1, 4, dtype=torch.int32)), ValueError,
     "extra_indices"),
    ("sparse-extra-cache-alone", ops.mla_sparse_decode,
     _with(SP, extra_cache=poisoned_cache(SP["layout"], 2, 8)), ValueError, "extra_indices"),
    ("sparse-extra-cache-width", ops.mla_sparse_decode,
     _with(SP, extra_cache=torch.zeros(2, 8, 1, 584, dtype=torch.uint8),
           extra_indices=torch.zeros(2, 1, 4, dtype=torch.int32)), ValueError, "extra_cache"),
    ("sparse-extra-length-big", ops.mla_sparse_decode,
     _with(SP, extra_cache=poisoned_cache(SP["layout"], 2, 8),
           extra_indices=torch.zeros(2, 1, 4, dtype=torch.int32),
           extra_topk_length=torch.tensor([5, 0], dtype=torch.int32)), ValueError,
     "extra_topk_length"),
    ("sparse-cache-heads", ops.mla_sparse_decode,
     _with(_sparse_args("BF16"), cache=poisoned_cache(_sparse_args("BF16")["layout"], 2, 4, 2)),
     ValueError, "cache"),
    ("sparse-q-width", ops.mla_sparse_decode,
     _with(_sparse_args("MODEL1_FP8"), q=torch.zeros(2, 1, 4, 576, dtype=BF16)), ValueError,
     "q"),
    # sparse prefill
    ("prefill-q-width", ops.mla_sparse_prefill, _with(PF, q=torch.zeros(2, 4, 448, dtype=BF16)),
     ValueError, "q"),
    ("prefill-kv-dtype", ops.mla_sparse_prefill, _with(PF, kv=torch.zeros(10, 1, 576)),
     TypeError, "kv"),
    ("prefill-kv-shape", ops.mla_sparse_prefill,
     _with(PF, kv=torch.zeros(10, 2, 576, dtype=BF16)), ValueError, "kv"),
    ("prefill-indices-shape", ops.mla_sparse_prefill,
     _with(PF, indices=torch.zeros(2, 8, dtype=torch.int32)), ValueError, "indices"),
    ("prefill-topk-length", ops.mla_sparse_prefill,
     _with(PF, topk_length=torch.tensor([8, 9], dtype=torch.int32)), ValueError, "topk_length"),
    ("prefill-scale", ops.mla_sparse_prefill, _with(PF, softmax_scale=None), ValueError,
     "softmax_scale"),
    ("prefill-sink", ops.mla_sparse_prefill, _with(PF, attn_sink=torch.zeros(3)), ValueError,
     "attn_sink"),
]


@pytest.mark.parametrize("op,kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(op, kwargs, exc, match, cpu_kernels):
    kwargs = dict(kwargs)
    kwargs.setdefault("impl", "cpu")
    with pytest.raises(exc, match=match):
        op(**kwargs)


def test_valid_base_arguments_pass(cpu_kernels):
    """The arguments every bad case starts from are accepted (so each case tests one change)."""
    ops.write_kv(**{**_write_args(), "impl": "reference"})
    ops.mla_decode(**{**DEC, "impl": "reference"})
    ops.mla_sparse_decode(**{**SP, "impl": "reference"})
    ops.mla_sparse_prefill(**{**PF, "impl": "reference"})


def test_skipped_slots_never_validated_against_cache(cpu_kernels):
    """Negative slots are padding (skipped), however negative."""
    args = _write_args()
    ops.write_kv(**{**args, "slot_mapping": torch.tensor([-1, -(2**62), 7]), "impl": "cpu"})


def test_prechecked_decode_never_reads_past_a_block_table_row(cpu_kernels):
    """The backend's trusted path skips the seq_lens check: a sequence longer than its
    block-table row attends the row's capacity only (its out-of-range garbage ids read as empty),
    never memory past the row."""
    case = dense_case(KVLayout.BF16, 16, [48, 20], 16)   # 3 + 2 garbage columns
    raw = ops.cache_bytes(case.cache, case.layout)
    too_long = torch.tensor([10**6, 20], dtype=torch.int32)
    got = ops.mla_decode_prechecked(case.q, raw, case.block_table, too_long, case.layout,
                                    case.softmax_scale, False, ops.unit_k_scale(case.q.device),
                                    "cpu")
    want = case.run("cpu", False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
