"""CPU-side checks of the CUDA path: build configuration, the ptxas report parser, and the split-KV
schedule (mirror of kernels/cuda/decode_schedule.h) including an end-to-end float64 simulation of
the split + LSE-combine algorithm against the reference."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cases import dense_case, sparse_case
from vllm_mla_backend import build_cuda, decode_schedule, ops, reference
from vllm_mla_backend.build import kernels_dir
from vllm_mla_backend.layouts import KVLayout

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z16attention_kernelILi0EEvv' for 'sm_80'
ptxas info    : Function properties for _Z16attention_kernelILi0EEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 192 registers, used 1 barriers, 400 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z16attention_kernelILi3EEvv' for 'sm_90a'
ptxas info    : Function properties for _Z16attention_kernelILi3EEvv
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1040 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z15write_kv_kernelv' for 'sm_80'
ptxas info    : Function properties for _Z15write_kv_kernelv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 464 bytes cmem[0]
"""


# ------------------------------------------------------------------------------------------
# Build configuration and compile check
# ------------------------------------------------------------------------------------------
def test_ptxas_parser_reads_every_entry_and_skips_device_functions():
    usages = build_cuda.parse_ptxas(PTXAS_LOG, "decode.cu")
    assert [(u.kernel, u.arch, u.registers, u.spill_stores, u.spill_loads, u.smem)
            for u in usages] == [
        ("_Z16attention_kernelILi0EEvv", "sm_80", 192, 0, 0, 0),
        ("_Z16attention_kernelILi3EEvv", "sm_90a", 255, 36, 28, 1040),
        ("_Z15write_kv_kernelv", "sm_80", 40, 4, 4, 0),
    ]


def test_spills_fail_only_in_attention_kernels():
    usages = build_cuda.parse_ptxas(PTXAS_LOG, "decode.cu")
    failures = build_cuda.spill_failures(usages)
    assert len(failures) == 1 and "sm_90a" in failures[0] and "attention_kernel" in failures[0]
    assert build_cuda.spill_failures(usages[:1]) == []


def test_report_names_layouts():
    name = ("void vllm_mla::cuda::core::attention_kernel<vllm_mla::cuda::core::Traits<"
            "(vllm_mla::Layout)3, 576>, vllm_mla::cuda::(anonymous namespace)::"
            "SparseDecodeSource>(vllm_mla::cuda::core::CoreParams, "
            "vllm_mla::cuda::(anonymous namespace)::SparseDecodeSource)")
    assert (build_cuda.short_name(name) ==
            "core::attention_kernel<core::Traits<V32_FP8, 576>, SparseDecodeSource>")


@pytest.mark.parametrize("text,want", [
    ("8.0;9.0a", ["80", "90a"]), ("80,90a", ["80", "90a"]), ("8.6 9.0+PTX", ["86", "90+ptx"]),
    ("10.0;12.0", ["100", "120"])])
def test_parse_arch_list(text, want):
    assert build_cuda.parse_arch_list(text) == want


def test_parse_arch_list_rejects_garbage():
    with pytest.raises(ValueError, match="CUDA arch"):
        build_cuda.parse_arch_list("sm_80")


def test_target_archs_default_is_filtered_by_nvcc(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build_cuda.target_archs({"80", "86", "89", "90"}) == ["80", "86", "89", "90a"]
    assert build_cuda.target_archs({"80", "86", "89", "90", "100", "120"}) == [
        "80", "86", "89", "90a", "100", "120"]
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        build_cuda.target_archs({"70"})


def test_target_archs_honours_env(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert build_cuda.target_archs({"80"}) == ["90a"]
    assert build_cuda.gencode_flags(["90a", "120+ptx"]) == [
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120"]


def test_cuda_spec_builds_one_library_for_cpu_and_cuda(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    spec = build_cuda.cuda_spec()
    root = kernels_dir()
    names = {p.relative_to(root).as_posix() for p in spec.sources}
    assert "bindings.cpp" in names
    assert {p.relative_to(root).as_posix() for p in (root / "cpu").glob("*.cpp")} <= names
    cu = {p.relative_to(root).as_posix() for p in (root / "cuda").glob("*.cu")}
    assert cu and cu <= names
    assert spec.with_cuda and "-DMLA_WITH_CUDA" in spec.cflags
    assert "-DMLA_WITH_CUDA" in spec.cuda_cflags
    assert "-gencode=arch=compute_90a,code=sm_90a" in spec.cuda_cflags
    assert "sm80_90a" in spec.target and spec.key() != ""


def test_cpu_build_key_ignores_the_cuda_sources(tmp_path, monkeypatch):
    """Editing kernels/cuda must not rebuild the CPU extension; editing the CPU kernels must."""
    import shutil

    from vllm_mla_backend import build
    src = tmp_path / "kernels"
    shutil.copytree(kernels_dir(), src)
    monkeypatch.setattr(build, "kernels_dir", lambda: src)
    cpu_key, cuda_key = build.cpu_spec().key(), build_cuda.cuda_spec().key()
    unit = src / "cuda" / "decode.cu"
    unit.write_text(unit.read_text() + "\n// edited\n")
    assert build.cpu_spec().key() == cpu_key and build_cuda.cuda_spec().key() != cuda_key
    header = src / "common" / "layout.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert build.cpu_spec().key() != cpu_key


def test_check_cuda_without_nvcc_fails_clearly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build_cuda, "nvcc_path", lambda: None)
    assert build_cuda.check_cuda("80", tmp_path / "r.txt") == 2
    assert "nvcc not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Schedule mirror
# ------------------------------------------------------------------------------------------
def _header_constant(name: str) -> int:
    text = (kernels_dir() / "cuda" / "decode_schedule.h").read_text()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def test_schedule_constants_match_the_cuda_header():
    ds = decode_schedule
    assert _header_constant("kRowsPerCta") == ds.ROWS_PER_CTA
    assert _header_constant("kTileTokens") == ds.TILE_TOKENS
    assert _header_constant("kRequestOverhead") == ds.REQUEST_OVERHEAD
    assert _header_constant("kHeaderInts") == ds.HEADER_INTS


@pytest.mark.parametrize("seed", range(6))
def test_schedule_covers_every_tile_once(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 80, (1,), generator=gen))
    max_tokens = 4096
    lens = torch.randint(-5, 5000, (batch,), generator=gen)
    lens[torch.rand(batch, generator=gen) < 0.2] = 0
    parts = int(torch.randint(1, 140, (1,), generator=gen))
    sch = decode_schedule.schedule(lens.tolist(), max_tokens, parts)
    seen: dict[int, list[tuple[int, int]]] = {}
    slots = []
    for part in range(parts):
        pieces = sch.pieces(part)
        work = sum(j1 - j0 for _, j0, j1, _ in pieces)
        assert work <= sch.units_per_part
        for b, j0, j1, slot in pieces:
            seen.setdefault(b, []).append((j0, j1))
            if sch.num_splits[b] > 1:  # only split requests own partial slots
                slots.append(slot)
                assert sch.split_begin[b] <= slot < sch.split_begin[b] + sch.num_splits[b]
    for b, n in enumerate(lens.tolist()):
        tiles = math.ceil(min(max(n, 0), max_tokens) / decode_schedule.TILE_TOKENS)
        ranges = sorted(seen.get(b, []))
        assert len(ranges) == sch.num_splits[b]
        covered = [j for j0, j1 in ranges for j in range(j0, j1)]
        assert covered == list(range(tiles))
    assert len(slots) == len(set(slots))
    assert max(slots, default=0) < decode_schedule.WorkspaceLayout(batch, 1, parts).slots


def test_workspace_size_bounds_the_slots():
    ws = decode_schedule.WorkspaceLayout(requests=128, out_rows=2 * 128, parts=16)
    assert ws.o_offset + ws.slots * 2 * 128 * 512 == ws.total_words
    size = ops.decode_workspace_size(128, 2, 128, 1, num_sms=132)
    parts = decode_schedule.num_parts(2 * 128, 1, 132)
    assert parts == 132 // 8
    assert size == decode_schedule.WorkspaceLayout(128, 2 * 128, parts).total_words * 4
    with pytest.raises(ValueError, match="multiple of h_kv"):
        ops.decode_workspace_size(4, 1, 6, 4, num_sms=10)


def test_sparse_workspace_has_one_request_per_query_token():
    size = ops.sparse_decode_workspace_size(128, 2, 128, num_sms=132)
    parts = decode_schedule.num_parts(128, 1, 132)
    assert parts == 132 // 4
    assert size == decode_schedule.WorkspaceLayout(256, 128, parts).total_words * 4
    assert ops.sparse_decode_workspace_size(0, 1, 16, num_sms=8) > 0
    with pytest.raises(ValueError, match="h_q must be >= 1"):
        ops.sparse_decode_workspace_size(4, 1, 0, num_sms=8)


def test_sparse_token_counts_follow_topk_length_then_extra():
    counts = decode_schedule.sparse_token_counts(3, 2, 64, torch.tensor([0, 100, 7]), 32,
                                                 torch.tensor([5, -3, 32]))
    assert counts == [5, 5, 64, 64, 39, 39]
    assert decode_schedule.sparse_token_counts(2, 1, 64) == [64, 64]


def _pieces_of(sch, partials: dict, r: int) -> list:
    """The partial results of request r: its slots when split, else its one direct piece."""
    if sch.num_splits[r] > 1:
        return [partials[sch.split_begin[r] + k] for k in range(sch.num_splits[r])]
    return [partials[("direct", r)]] if sch.num_splits[r] else []


def _simulated_split_decode(case, causal: bool, parts: int):
    """The CUDA algorithm in float64: per run piece a partial (out, log2-LSE), merged by LSE."""
    raw = ops.cache_bytes(case.cache, case.layout)
    b, s_q, h_q, _ = case.q.shape
    bs = raw.shape[1]
    max_tokens = case.block_table.shape[1] * bs
    sch = decode_schedule.schedule(case.seq_lens.tolist(), max_tokens, parts)
    kv = reference.read_kv(raw, case.layout, case.k_scale or 1.0).double()
    slots = {}
    for part in range(parts):
        for r, j0, j1, slot in sch.pieces(part):
            n = int(case.seq_lens[r])
            t = torch.arange(j0 * 32, min(j1 * 32, n))
            blocks = case.block_table[r, t // bs].long()
            k = kv[blocks, t % bs, 0]                                  # [N, d]
            limit = n - (s_q - 1 - torch.arange(s_q)) if causal else torch.full((s_q,), n)
            valid = t[None, :] < limit[:, None]                         # [s_q, N]
            out, lse, _ = reference.attend(case.q[r].double(), k[None].expand(s_q, -1, -1)
                                           [:, :, None], valid, case.softmax_scale)
            key = slot if sch.num_splits[r] > 1 else ("direct", r)
            slots[key] = (out, lse.masked_fill(torch.isinf(lse), -math.inf))
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for r in range(b):
        parts_r = _pieces_of(sch, slots, r)
        if not parts_r:
            continue
        lses = torch.stack([p[1] for p in parts_r])                     # [k, s_q, h_q]
        m = lses.amax(0)
        w = torch.exp(lses - torch.where(torch.isinf(m), 0, m))
        total = w.sum(0)
        o = sum(wk[..., None] * p[0] for wk, p in zip(w, parts_r))
        nonempty = total > 0
        out[r] = torch.where(nonempty[..., None], o / total.clamp_min(1e-300)[..., None], 0)
        lse[r] = torch.where(nonempty, m + total.log(), math.inf).T
    return out, lse


@pytest.mark.parametrize("parts", [1, 3, 17])
@pytest.mark.parametrize("causal", [False, True])
def test_split_kv_algorithm_matches_reference(parts, causal):
    case = dense_case(KVLayout.BF16, 16, [0, 1, 37, 300, 129], h_q=4, s_q=2, seed=parts)
    out, lse = _simulated_split_decode(case, causal, parts)
    want_out, want_lse = case.expected(causal)
    torch.testing.assert_close(out, want_out.double(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, want_lse.double(), atol=1e-9, rtol=1e-9)


def _merge_splits(pieces: list[tuple[torch.Tensor, torch.Tensor]]):
    """LSE merge of split partials (out [.., h, 512], log-LSE [.., h]; -inf for empty)."""
    lses = torch.stack([p[1] for p in pieces])
    m = lses.amax(0)
    w = torch.exp(lses - torch.where(torch.isinf(m), 0, m))
    total = w.sum(0)
    o = sum(wk[..., None] * p[0] for wk, p in zip(w, pieces))
    nonempty = total > 0
    out = torch.where(nonempty[..., None], o / total.clamp_min(1e-300)[..., None], 0)
    return out, torch.where(nonempty, m + total.log(), math.inf)


def _simulated_split_sparse_decode(case, parts: int):
    """The CUDA sparse algorithm in float64: one request per (batch entry, query token) whose
    candidates are the first topk_length main slots then the extra ones; pieces of 32-candidate
    tiles per run, merged by LSE, the sink applied after the merge."""
    b, s_q, h_q, _ = case.q.shape
    lists = [(ops.cache_bytes(case.cache, case.layout), case.indices, case.topk_length)]
    if case.extra_cache is not None:
        lists.append((ops.cache_bytes(case.extra_cache, case.layout), case.extra_indices,
                      case.extra_topk_length))
    flat = [(reference.read_kv(raw, case.layout).double().flatten(0, 1)[:, 0], idx, length)
            for raw, idx, length in lists]

    def candidates(r: int):
        bi, i = divmod(r, s_q)
        k, valid = [], []
        for kv, idx, length in flat:
            n = idx.shape[2] if length is None else min(max(int(length[bi]), 0), idx.shape[2])
            slots = idx[bi, i, :n].long()
            ok = (slots >= 0) & (slots < kv.shape[0])
            k.append(kv[torch.where(ok, slots, 0)] * ok[:, None])
            valid.append(ok)
        return torch.cat(k), torch.cat(valid)

    counts = decode_schedule.sparse_token_counts(
        b, s_q, case.indices.shape[2], case.topk_length,
        0 if case.extra_indices is None else case.extra_indices.shape[2], case.extra_topk_length)
    sch = decode_schedule.schedule(counts, 1 << 30, parts)
    slots = {}
    for part in range(parts):
        for r, j0, j1, slot in sch.pieces(part):
            k, valid = candidates(r)
            k, valid = k[j0 * 32:j1 * 32], valid[j0 * 32:j1 * 32]
            bi, i = divmod(r, s_q)
            out, lse, _ = reference.attend(case.q[bi, i][None].double(), k[None, :, None],
                                           valid[None], case.softmax_scale)
            key = slot if sch.num_splits[r] > 1 else ("direct", r)
            slots[key] = (out[0], lse[0].masked_fill(torch.isinf(lse[0]), -math.inf))
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for r in range(b * s_q):
        pieces = _pieces_of(sch, slots, r)
        if not pieces:
            continue
        bi, i = divmod(r, s_q)
        o, row_lse = _merge_splits(pieces)
        if case.attn_sink is not None:
            o = o * torch.sigmoid(row_lse - case.attn_sink.double())[:, None]
        out[bi, i], lse[bi, :, i] = o, row_lse
    return out, lse


@pytest.mark.parametrize("parts", [1, 5, 40])
def test_split_sparse_algorithm_matches_reference(parts):
    case = sparse_case(KVLayout.MODEL1_FP8, 64, 16, 128, b=3, s_q=2, sink=True,
                       extra=(16, 96, 300), seed=parts)
    out, lse = _simulated_split_sparse_decode(case, parts)
    want_out, want_lse = case.expected()
    torch.testing.assert_close(out, want_out.double(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, want_lse.double(), atol=1e-9, rtol=1e-9)


@pytest.mark.skipif(build_cuda.nvcc_path() is None, reason="nvcc not installed")
def test_nvcc_supports_the_check_archs():
    assert {"80", "90"} <= build_cuda.nvcc_archs()
