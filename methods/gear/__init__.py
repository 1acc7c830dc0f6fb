"""GEAR (arXiv 2403.05527) over a whole model: the codecs of ``core`` as the model's
``Hooks.kv_quant``. Tuning-free: no calibration is read."""

from __future__ import annotations

import time
from typing import Any

from harness import kvcache
from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.gear.core import BITS, GEARCodec, GEARConfig, codecs, power_iteration

__all__ = ["BITS", "GEARCodec", "GEARConfig", "kv_quant", "power_iteration", "quantize_model"]


def kv_quant(cfg: GEARConfig) -> kvcache.KVQuant:
    """GEAR's cache: keys and values compressed ``n_b`` tokens at a time, behind a buffer of
    1 … ``n_b`` full-precision tokens."""
    key, value = codecs(cfg)
    return kvcache.KVQuant(key=key, value=value)


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: GEARConfig, **kw: Any
) -> QuantizedModel:
    del calib_tokens, kw  # tuning-free
    t0 = time.perf_counter()
    kvq = kv_quant(cfg)
    if model_cfg.head_dim % min(cfg.group, model_cfg.head_dim):
        raise ValueError(
            f"GEAR: value group {cfg.group} does not divide head_dim {model_cfg.head_dim}"
        )
    return kv_cache_result(params, model_cfg, kvq, seconds=time.perf_counter() - t0 + 1e-9)


METHOD = register(
    Method(
        name="gear",
        config=GEARConfig,
        quantize_model=quantize_model,
        paper="2403.05527",
        kind="kv_cache",
    )
)
