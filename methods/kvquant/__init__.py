"""KVQuant (arXiv 2401.18079) over a whole model: calibrate the per-channel key thresholds and
the per-layer levels of keys and values on the calibration tokens (``calib``), and hand the
model the codecs of ``core`` as its ``Hooks.kv_quant`` (keys pre-RoPE, the sink token fp16)."""

from __future__ import annotations

import time
from typing import Any

from harness import kvcache
from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.kvquant.calib import kv_calibration
from methods.kvquant.core import (
    BITS,
    ChannelKeys,
    KVQuantConfig,
    Levels,
    TokenValues,
    calibrate_keys,
    calibrate_values,
)

__all__ = [
    "BITS", "ChannelKeys", "KVQuantConfig", "Levels", "TokenValues", "calibrate",
    "quantize_model",
]  # fmt: skip


def calibrate(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: KVQuantConfig
) -> tuple[kvcache.KVQuant, list[dict[str, Any]]]:
    """The calibrated cache and one report row per layer (outlier fraction, levels)."""
    layers = kv_calibration(
        params, model_cfg, calib_tokens, pre_rope=cfg.pre_rope,
        fisher=cfg.fisher and cfg.nuq, sink=cfg.sink,
    )  # fmt: skip
    upper, lower, k_levels, v_levels, report = [], [], [], [], []
    for i, d in enumerate(layers):
        u, lo, kl, frac = calibrate_keys(d["K"], d["FK"], cfg, i)
        vl = calibrate_values(d["V"], d["FV"], cfg, i)
        upper.append(u)
        lower.append(lo)
        k_levels.append(kl)
        v_levels.append(vl)
        report.append({
            "name": f"blocks.{i}.attn.kv", "key_outliers": frac,
            "key_levels": kl.recon, "value_levels": vl.recon,
        })  # fmt: skip
    frac = sum(r["key_outliers"] for r in report) / len(report)
    kv = model_cfg.n_kv_heads
    key = ChannelKeys(
        bits=cfg.bits, kv_heads=kv, upper=tuple(upper), lower=tuple(lower),
        levels=tuple(x.levels for x in k_levels), recon=tuple(x.recon for x in k_levels),
        sparse=cfg.outliers > 0, outlier_frac=frac if cfg.outliers > 0 else 0.0,
    )  # fmt: skip
    value = TokenValues(
        bits=cfg.bits, kv_heads=kv, outliers=float(cfg.outliers),
        levels=tuple(x.levels for x in v_levels), recon=tuple(x.recon for x in v_levels),
    )  # fmt: skip
    return kvcache.KVQuant(key=key, value=value, pre_rope=cfg.pre_rope, sink=cfg.sink), report


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: KVQuantConfig, **kw: Any
) -> QuantizedModel:
    del kw
    t0 = time.perf_counter()
    kvq, report = calibrate(params, model_cfg, calib_tokens, cfg)
    return kv_cache_result(params, model_cfg, kvq, seconds=time.perf_counter() - t0, report=report)


METHOD = register(
    Method(
        name="kvquant",
        config=KVQuantConfig,
        quantize_model=quantize_model,
        paper="2401.18079",
        kind="kv_cache",
    )
)
