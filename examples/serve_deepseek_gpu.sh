#!/usr/bin/env bash
# Serve a real DeepSeek checkpoint with vllm-mla-backend on NVIDIA GPUs (vLLM 0.33, CUDA build).
#
#   pip install vllm==0.33.0 && pip install -e .          # once
#   MODEL=deepseek-ai/DeepSeek-V2-Lite-Chat bash examples/serve_deepseek_gpu.sh   # 1 GPU, 16B
#   MODEL=deepseek-ai/DeepSeek-V3 TP=8 KV_DTYPE=fp8 bash examples/serve_deepseek_gpu.sh
#
# VLLM_MLA_BACKEND=1 (the default of `vllm-mla serve`) selects our backend for every MLA layer it
# validates (vLLM's own where it does not, with a log line); VLLM_MLA_BACKEND=0 serves the same model with vLLM's own backend
# (for comparison). KV_DTYPE: auto (bf16 cache), fp8 (per-tensor e4m3), fp8_ds_mla (DeepSeek
# V3.2's 656-byte token layout). Then query it with any OpenAI client (see the curl call below).
set -euo pipefail
MODEL=${MODEL:-deepseek-ai/DeepSeek-V2-Lite-Chat}
TP=${TP:-1}
KV_DTYPE=${KV_DTYPE:-auto}
PORT=${PORT:-8000}
export VLLM_MLA_BACKEND=${VLLM_MLA_BACKEND:-1}

vllm-mla doctor || true     # versions, GPU, kernel build, which backend will serve

exec vllm-mla serve "$MODEL" \
  --tensor-parallel-size "$TP" \
  --kv-cache-dtype "$KV_DTYPE" \
  --max-model-len 32768 \
  --trust-remote-code \
  --port "$PORT"

# In another shell:
#   curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d \
#     '{"model": "deepseek-ai/DeepSeek-V2-Lite-Chat", "max_tokens": 64,
#       "messages": [{"role": "user", "content": "What is multi-head latent attention?"}]}'
