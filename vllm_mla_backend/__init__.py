"""vllm-mla-backend: MLA attention kernels for every DeepSeek KV-cache format, as a vLLM plugin.

Importing this package is cheap: no kernel build and no vLLM import happen here.
"""

from .layouts import KVLayout

__version__ = "0.1.0"
__all__ = ["KVLayout", "register", "__version__"]


def register() -> None:
    """vLLM plugin entry point (group ``vllm.general_plugins``): idempotent and cheap."""
    from .backend.registration import register as _register
    _register()
