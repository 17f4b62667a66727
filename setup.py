"""Wheel build hook: ship the kernel sources inside the package, optionally prebuilt.

Metadata lives in pyproject.toml.  ``build_py`` copies ``kernels/`` to
``vllm_mla_backend/_kernels`` so an installed (non-editable) package can JIT-compile them;
with ``VLLM_MLA_AOT=1`` (``VLLM_MLA_AOT=cuda`` for the CUDA extension) it also compiles them into
``vllm_mla_backend/_prebuilt`` so no compiler is needed at run time.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        package = Path(self.build_lib) / "vllm_mla_backend"
        shutil.copytree(Path(__file__).parent / "kernels", package / "_kernels",
                        dirs_exist_ok=True)
        aot = os.environ.get("VLLM_MLA_AOT", "0").lower()
        if aot not in ("", "0"):
            import sys
            sys.path.insert(0, self.build_lib)
            from vllm_mla_backend import build
            build.aot(package / "_prebuilt", cuda=(aot == "cuda"))


setup(cmdclass={"build_py": BuildPyWithKernels})
