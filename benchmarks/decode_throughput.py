"""Tiny-model decode throughput and engine start time: our backend vs vLLM's own, same machine.

    .venv/bin/python benchmarks/decode_throughput.py [--batch-sizes 1 8] [--rounds 6] [--cpu N]

The same as ``vllm-mla bench``: the method and options are in ``vllm_mla_backend/bench.py``.
"""

import sys

from vllm_mla_backend.bench import main

if __name__ == "__main__":   # engines run in spawned processes
    sys.exit(main())
