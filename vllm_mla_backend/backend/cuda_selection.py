"""CUDA backend selection: our backend for every MLA layer it can serve, vLLM's choice otherwise.

vLLM 0.33's CUDA selector walks a priority list per device and model (dense MLA: FLASH_ATTN_MLA,
FLASHMLA, FLASHINFER_MLA, ...; sparse: FLASH_ATTN_MLA_SPARSE on Hopper, FLASHINFER_MLA_SPARSE
for fp8 on SM100, FLASHMLA_SPARSE, ...) and takes the first backend whose
``validate_configuration`` accepts the layer.  Overriding slots of that list cannot express "ours
where we can, vLLM's where we cannot": a slot taken by us hides vLLM's backend even for layers
we refuse (a head size other than 576), and a slot left alone may win before ours.  So
``install()`` wraps ``get_attn_backend_cls`` instead: for an MLA layer without an explicit
``--attention-backend``, our dense or sparse backend validates the layer the way vLLM's selector
would and serves it if it has no objection; otherwise vLLM's own selection runs unchanged, with
one log line saying why ours stepped aside.
"""

from __future__ import annotations

from .registration import BACKEND_PATH, current_mode, warn_once

OURS = ("CUSTOM",)            # an explicit --attention-backend that names our backend
_MARK = "_vllm_mla_backend_selection"


def our_backend_for(platform_cls, selected_backend, attn_selector_config) -> str | None:
    """The class path of our backend for this layer, or None to leave it to vLLM."""
    config = attn_selector_config
    if current_mode() == "off" or not config.use_mla:
        return None
    if selected_backend is not None:
        if selected_backend.name not in OURS:
            warn_once("vllm-mla-backend: --attention-backend %s was given; MLA layers use "
                         "it, not our kernels", selected_backend.name)
        return None
    from vllm.utils.import_utils import resolve_obj_by_qualname

    path = BACKEND_PATH
    if config.use_sparse:   # DeepSeek V3.2 (imported only then: it pulls vLLM's sparse modules)
        from .sparse_v32 import BACKEND_PATH as path
    try:
        reasons = resolve_obj_by_qualname(path).validate_configuration(
            device_capability=platform_cls.get_device_capability(), **config._asdict())
    except (ImportError, OSError) as e:   # as vLLM's selector treats its own backends
        reasons = [f"{type(e).__name__}: {e}"]
    if reasons:
        warn_once("vllm-mla-backend cannot serve this %s MLA layer (%s); vLLM selects its "
                     "own backend for it", "sparse" if config.use_sparse else "dense",
                     "; ".join(reasons))
        return None
    return path


def install(platform_cls) -> None:
    """Wrap ``platform_cls.get_attn_backend_cls`` once per process."""
    original = platform_cls.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        ours = our_backend_for(cls, selected_backend, attn_selector_config)
        if ours is not None:
            return ours
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _MARK, True)
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
