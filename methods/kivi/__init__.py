"""KIVI (arXiv 2402.02750) over a whole model: the cache codecs of ``core`` as the model's
``Hooks.kv_quant``. Tuning-free: no calibration is read."""

from __future__ import annotations

import time
from typing import Any

from harness import kvcache
from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.kivi.core import BITS, ChannelKeys, KIVIConfig, TokenValues

__all__ = ["BITS", "ChannelKeys", "KIVIConfig", "TokenValues", "kv_quant", "quantize_model"]


def kv_quant(cfg: KIVIConfig) -> kvcache.KVQuant:
    """KIVI's cache: keys per channel in groups of G tokens, quantized R at a time after a
    residual of 1 … R full-precision keys; values per token, the last R + 1 (the new one
    included) read in full precision."""
    if cfg.keys == "channel":
        key = ChannelKeys(bits=cfg.bits, chunk=cfg.group, window=1, flush=cfg.residual)
    else:  # the ablation: keys per token, under the same residual
        key = TokenValues(bits=cfg.bits, group=cfg.group, window=1, flush=cfg.residual)
    return kvcache.KVQuant(
        key=key,
        value=TokenValues(bits=cfg.bits, group=cfg.group, window=cfg.residual + 1, flush=1),
    )


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: KIVIConfig, **kw: Any
) -> QuantizedModel:
    del calib_tokens, kw  # tuning-free
    t0 = time.perf_counter()
    kvq = kv_quant(cfg)
    return kv_cache_result(params, model_cfg, kvq, seconds=time.perf_counter() - t0)


METHOD = register(
    Method(
        name="kivi",
        config=KIVIConfig,
        quantize_model=quantize_model,
        paper="2402.02750",
        kind="kv_cache",
    )
)
