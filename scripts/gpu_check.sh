#!/usr/bin/env bash
# GPU check, one command: on a CUDA machine with PyTorch (no vLLM needed) build the CUDA
# extension, run the GPU tests and the dense / sparse benchmarks, and print a short table last.
# Budget: under 8 minutes on an H200.  Logs go to $OUT (default .cache/gpu-check).
#
#   OUT=/tmp/out scripts/gpu_check.sh            # PYTHON=... to pick the interpreter
#   GPU_CHECK_ARCH=9.0 ...                       # the arch list to build (default: this GPU's)
#
# Exit status: non-zero when the build or any GPU test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/.cache/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_MLA_CACHE_DIR=${VLLM_MLA_CACHE_DIR:-$ROOT/.cache/kernels}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
deadline=$(( start + ${GPU_CHECK_BUDGET_S:-470} ))   # the whole check, build included
elapsed() { echo $(( $(date +%s) - start )); }
share() {  # seconds for the next step: min(cap, percent of what is left)
  local left=$(( deadline - $(date +%s) )) cap=$1 pct=$2
  local s=$(( left * pct / 100 )); [ $s -gt $cap ] && s=$cap; [ $s -lt 20 ] && s=20; echo $s
}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $PY sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  exit 2
fi

# Build only for this GPU: an inherited list (NVIDIA's containers set one from sm_52 up) would
# compile architectures without cp.async / bf16 mma and overrun the build's time.
TORCH_CUDA_ARCH_LIST=${GPU_CHECK_ARCH:-$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')}
export TORCH_CUDA_ARCH_LIST
# the interpreter's own bin folder first: torch's JIT runs `ninja` from PATH
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.log"
import importlib.util, shutil, subprocess, torch
from torch.utils.cpp_extension import CUDA_HOME
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(),
      "sm", torch.cuda.get_device_capability(), "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
for mod in ("pytest", "numpy", "filelock"):
    print(mod, "present" if importlib.util.find_spec(mod) else "MISSING")
print("CUDA_HOME", CUDA_HOME, "| ninja on PATH:", shutil.which("ninja"))
for cmd in ([f"{CUDA_HOME}/bin/nvcc" if CUDA_HOME else "nvcc", "--version"], ["c++", "--version"]):
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.splitlines()
        print(cmd[0], "|", (lines[-1] if "nvcc" in cmd[0] else lines[0]) if lines else "?")
    except (OSError, subprocess.SubprocessError) as e:
        print(cmd[0], "| not runnable:", e)
EOF

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) =="
timeout -k 10 300 "$PY" -c "from vllm_mla_backend import build; print(build.load('cuda'))" \
  > "$OUT/build.log" 2>&1
build_rc=$?
tail -3 "$OUT/build.log"
build_s=$(elapsed)

run_tests() {  # name, timeout, pytest args...  (a test over 60 s dumps its stack: a hang shows)
  local name=$1 limit=$2; shift 2
  timeout -k 10 "$limit" "$PY" -m pytest -q -p no:cacheprovider --maxfail=25 \
    -o faulthandler_timeout=60 --junitxml="$OUT/$name.xml" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -15
  local line; line=$(tail -1 "$OUT/$name.log")
  [ $rc -eq 124 ] && line="TIMEOUT after $limit s: $line"
  echo "$rc|$line"
}
tests_rc=99; tests_line="not run (build failed)"; grid_line="not run"
if [ $build_rc -eq 0 ]; then
  echo "== GPU tests: targeted (sparse, schedule, graphs, determinism, large shapes, bytes) =="
  r=$(run_tests gpu-tests "$(share 150 35)" tests/gpu -k "not test_decode_grid")
  tests_rc=$(echo "$r" | tail -1 | cut -d'|' -f1); tests_line=$(echo "$r" | tail -1 | cut -d'|' -f2-)
  echo "$r" | sed '$d'
  echo "== GPU tests: decode grid (every layout x block size x heads x s_q) =="
  r=$(run_tests gpu-grid "$(share 140 50)" tests/gpu -k "test_decode_grid")
  grid_rc=$(echo "$r" | tail -1 | cut -d'|' -f1); grid_line=$(echo "$r" | tail -1 | cut -d'|' -f2-)
  echo "$r" | sed '$d'
  [ "$grid_rc" -ne 0 ] && [ "$tests_rc" -eq 0 ] && tests_rc=$grid_rc
fi
tests_s=$(elapsed)

bench_rc=99; sparse_rc=99
if [ $build_rc -eq 0 ]; then
  echo "== dense decode benchmark =="
  bench_s=$(share 110 55)
  timeout -k 10 "$bench_s" "$PY" benchmarks/bench_cuda_decode.py --budget-s $(( bench_s * 7 / 10 )) \
    --json "$OUT/bench.json" \
    > "$OUT/bench.log" 2> "$OUT/bench.err"
  bench_rc=$?
  echo "== sparse decode / prefill benchmark =="
  sparse_s=$(share 90 95)
  timeout -k 10 "$sparse_s" "$PY" benchmarks/bench_cuda_sparse.py --budget-s $(( sparse_s * 6 / 10 )) \
    --json "$OUT/bench_sparse.json" \
    > "$OUT/bench_sparse.log" 2> "$OUT/bench_sparse.err"
  sparse_rc=$?
fi

echo
echo "================ GPU check summary ($(elapsed) s) ================"
head -1 "$OUT/env.log"
echo "build:     rc=$build_rc (${build_s} s)   log: $OUT/build.log"
echo "tests:     rc=$tests_rc (${tests_s} s)   targeted: $tests_line"
echo "                              grid:     $grid_line"
echo "benchmarks: dense rc=$bench_rc, sparse rc=$sparse_rc   logs: $OUT/bench.log, $OUT/bench_sparse.log"
for log in "$OUT/bench.log" "$OUT/bench_sparse.log"; do
  [ -f "$log" ] && sed -n '/^device /,$p' "$log"
done
[ $build_rc -eq 0 ] && [ $tests_rc -eq 0 ]
