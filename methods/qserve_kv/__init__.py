"""QServe's KV4 with SmoothAttention (arXiv 2405.04532) over a whole model: ``λ`` of every
layer from the post-RoPE calibration keys, the codecs of ``core`` as ``Hooks.kv_quant``.

``qserve_kv_plain`` is the same KV4 without SmoothAttention (the paper's ablation). The KV4
parts (``core.smooth_attention_scales``, ``core.fold_smooth_attention``, ``core.TokenHeadCodec``,
``core.kv_quant``, :func:`smooth_scales`) are what QoQ's W4A8KV4 imports."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp

from harness import capture
from harness import stats as statistics
from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.qserve_kv.core import (
    BITS,
    QServeKVConfig,
    TokenHeadCodec,
    fold_smooth_attention,
    kv_quant,
    smooth_attention_scales,
    token_head_config,
)

__all__ = [
    "BITS", "QServeKVConfig", "QServeKVPlainConfig", "TokenHeadCodec", "fold_smooth_attention",
    "kv_quant", "quantize_model", "smooth_attention_scales", "smooth_scales", "token_head_config",
]  # fmt: skip

NEEDS = ("k_absmax",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QServeKVPlainConfig(QServeKVConfig):
    """The ablation: QServe's KV4 without SmoothAttention."""

    smooth: bool = False


def smooth_scales(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, alpha: float
) -> tuple[tuple[float, ...], ...]:
    """``λ`` of every layer (python floats, one per KV channel) from the full-precision model's
    post-RoPE calibration keys."""
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(
            f"QServe KV: calibration tokens must be a non-empty [n, t], got {tokens.shape}"
        )
    _, sites = statistics.plan(NEEDS)
    lam: dict[int, tuple[float, ...]] = {}

    def on_block(i: int, bp: Any, calib: capture.BlockCalibration) -> Any:
        (name,) = NEEDS
        m = statistics.values(calib["attn.k"])[name]
        try:
            lam[i] = tuple(float(v) for v in smooth_attention_scales(m, model_cfg.head_dim, alpha))
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
        return bp

    capture.sequential(params, model_cfg, tokens, on_block, accumulators={}, names=(), sites=sites)
    return tuple(lam[i] for i in range(model_cfg.n_layers))


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: QServeKVConfig, **kw: Any
) -> QuantizedModel:
    del kw
    t0 = time.perf_counter()
    lam = smooth_scales(params, model_cfg, calib_tokens, cfg.alpha) if cfg.smooth else ()
    report = [
        {"name": f"blocks.{i}.attn.k", "layer": i, "lambda_max": max(v), "lambda_min": min(v)}
        for i, v in enumerate(lam)
    ]
    return kv_cache_result(
        params, model_cfg, kv_quant(cfg, lam), seconds=time.perf_counter() - t0, report=report
    )


METHOD = register(
    Method(
        name="qserve_kv",
        config=QServeKVConfig,
        quantize_model=quantize_model,
        paper="2405.04532",
        kind="kv_cache",
        needs=NEEDS,
    )
)
PLAIN = register(
    Method(
        name="qserve_kv_plain",
        config=QServeKVPlainConfig,
        quantize_model=quantize_model,
        paper="2405.04532",
        kind="kv_cache",
    )
)
