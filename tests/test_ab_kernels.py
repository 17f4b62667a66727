"""benchmarks/ab_kernels.py's export of a revision: its kernel sources with every ``vllm_mla``
name renamed, so that its library registers beside the working tree's in one process (the
compile itself is what every build test covers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab_kernels():
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ab_kernels
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return ab_kernels


def test_export_renames_every_kernel_namespace(ab_kernels, tmp_path):
    ab_kernels.export_revision("HEAD", tmp_path)
    files = [p for p in (tmp_path / "kernels").rglob("*") if p.is_file()]
    assert (tmp_path / "vllm_mla_backend" / "build.py").is_file()
    assert f"TORCH_LIBRARY({ab_kernels.BASE_NAMESPACE}," in (tmp_path / "kernels" /
                                                             "bindings.cpp").read_text()
    leftovers = [str(p) for p in files if re.search(r"\bvllm_mla\b", p.read_text())]
    assert not leftovers
    # every source kind the kernels use is one the rename covers
    assert {p.suffix for p in files} <= ab_kernels.KERNEL_SUFFIXES
