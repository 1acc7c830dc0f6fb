"""RotateKV (arXiv 2501.16383) over a whole model: the calibrated channel order of each layer's
rotated pre-RoPE keys, and the codecs of ``core`` as the model's ``Hooks.kv_quant``.

``rotatekv_plain`` is the paper's ablation baseline: the same per-token quantizer, clip ratio
and sink tokens on keys and values as they are (no rotation, no reordering)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from harness import capture, kvcache
from harness import stats as statistics
from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.rotatekv.core import (
    BITS,
    CLIP,
    RotatedCodec,
    RotateKVConfig,
    channel_order,
    clipped_quantize,
    rotate,
)

__all__ = [
    "BITS", "CLIP", "RotateKVConfig", "RotateKVPlainConfig", "RotatedCodec", "channel_order",
    "clipped_quantize", "key_orders", "kv_quant", "quantize_model", "rotate",
]  # fmt: skip

NEEDS = ("k_pre_rope_sample",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotateKVPlainConfig(RotateKVConfig):
    """The ablation: RotateKV's quantizer without its rotations and channel order."""

    rotate: bool = False
    reorder: bool = False


def key_orders(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: RotateKVConfig
) -> tuple[tuple[int, ...], ...]:
    """``π`` of every layer: the rotated pre-RoPE calibration keys' channels sorted by mean
    (the keys of the full-precision model; the cache does not change what a layer computes
    from its input, only what later queries read)."""
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(
            f"RotateKV: calibration tokens must be a non-empty [n, t], got {tokens.shape}"
        )
    span = cfg.span(model_cfg.n_kv_heads, model_cfg.head_dim) if cfg.rotate else 0
    _, sites = statistics.plan(NEEDS)
    orders: dict[int, tuple[int, ...]] = {}

    def on_block(i: int, bp: Any, calib: capture.BlockCalibration) -> Any:
        (name,) = NEEDS
        K = statistics.values(calib["attn.k_pre_rope"])[name]  # [≤ 4096, kv·hd]
        if K.shape[0] == 0:
            raise ValueError(f"RotateKV: layer {i} saw no calibration keys")
        if not bool(jnp.all(jnp.isfinite(K))):
            raise ValueError(f"RotateKV: layer {i}'s calibration keys hold NaN or Inf")
        if not bool(jnp.any(K != 0)):
            raise ValueError(f"RotateKV: layer {i}'s calibration keys are all zero (dead)")
        mean = jnp.mean(rotate(K, span) if span else K, axis=0)
        orders[i] = channel_order(mean)
        return bp

    capture.sequential(params, model_cfg, tokens, on_block, accumulators={}, names=(), sites=sites)
    return tuple(orders[i] for i in range(model_cfg.n_layers))


def kv_quant(
    cfg: RotateKVConfig, model_cfg: ModelConfig, orders: tuple[tuple[int, ...], ...] = ()
) -> kvcache.KVQuant:
    """RotateKV's cache: keys stored pre-RoPE, rotated over ``head_group`` heads and permuted by
    ``orders``; values rotated per head; every token quantized but the first ``sink``."""
    hd = model_cfg.head_dim
    group = cfg.quant_group(hd)
    span = cfg.span(model_cfg.n_kv_heads, hd) if cfg.rotate else 0
    if cfg.reorder and len(orders) != model_cfg.n_layers:
        raise ValueError(
            f"RotateKV: need one channel order per layer ({model_cfg.n_layers}), got {len(orders)}"
        )
    side = dict(bits=cfg.bits, group=group, rho=cfg.rho)
    return kvcache.KVQuant(
        key=RotatedCodec(**side, span=span, order=tuple(orders) if cfg.reorder else ()),
        value=RotatedCodec(**side, span=hd if cfg.rotate else 0),
        pre_rope=True,
        sink=cfg.sink,
    )


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: RotateKVConfig, **kw: Any
) -> QuantizedModel:
    del kw
    t0 = time.perf_counter()
    orders = key_orders(params, model_cfg, calib_tokens, cfg) if cfg.reorder else ()
    kvq = kv_quant(cfg, model_cfg, orders)
    report = [
        {
            "name": f"blocks.{i}.attn.kv",
            "layer": i,
            "moved": int(np.sum(np.asarray(o) != np.arange(len(o)))),
        }
        for i, o in enumerate(orders)
    ]
    return kv_cache_result(params, model_cfg, kvq, seconds=time.perf_counter() - t0, report=report)


METHOD = register(
    Method(
        name="rotatekv",
        config=RotateKVConfig,
        quantize_model=quantize_model,
        paper="2501.16383",
        kind="kv_cache",
        needs=NEEDS,
    )
)
PLAIN = register(
    Method(
        name="rotatekv_plain",
        config=RotateKVPlainConfig,
        quantize_model=quantize_model,
        paper="2501.16383",
        kind="kv_cache",
    )
)
