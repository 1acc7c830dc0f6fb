"""BFP KV cache with K-sort (arXiv 2403.20137) over a whole model: the codecs of ``core`` as
the model's ``Hooks.kv_quant``, K-sort's permutation found once per layer.

Two registered methods: ``bfp_kv`` (K-sort by the paper's W_k row norms, or by the calibration
keys' channel absmax with ``sort="k_absmax"``) and ``bfp_kv_nosort`` (plain BFP keys, the
baseline). ``bits`` (the ``KV<b>`` settings of ``methods.compare``) is the key mantissa width:
``KV4`` is BFP12 keys, ``KV8`` BFP16; values stay at ``value_bits`` (BFP16)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from harness import capture, kvcache
from harness import stats as statistics
from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.bfp_kv.core import (
    BITS,
    BFPCodec,
    BFPKVConfig,
    PlainBFPKVConfig,
    bfp_name,
    head_block,
    ksort,
    wk_norms,
)

__all__ = [
    "BITS", "BFPCodec", "BFPKVConfig", "PlainBFPKVConfig", "channel_magnitudes", "kv_quant",
    "permutations", "quantize_model",
]  # fmt: skip


def _dense(w: Any) -> np.ndarray:
    return np.asarray(w.dequantize() if hasattr(w, "dequantize") else w, np.float64)


def channel_magnitudes(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, sort: str
) -> list[np.ndarray]:
    """Per layer ``[n_kv, head_dim]``: K-sort's magnitude of each key channel."""
    kv, D = model_cfg.n_kv_heads, model_cfg.head_dim
    if sort == "wk_norm":
        return [wk_norms(_dense(b["attn"]["k_proj"]), kv) for b in params["blocks"]]
    if sort != "k_absmax":
        raise ValueError(f"no channel magnitudes for sort={sort!r}")
    tokens = np.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(
            f"BFP-KV sort='k_absmax' needs calibration tokens [n, t], got shape {tokens.shape}"
        )
    _, sites = statistics.plan(("k_absmax",))
    found: dict[int, np.ndarray] = {}

    def on_block(i, bp, calib):
        found[i] = np.asarray(calib["attn.k"]["k_absmax"], np.float64).reshape(kv, D)
        return bp

    capture.sequential(params, model_cfg, tokens, on_block, accumulators={}, names=(), sites=sites)
    return [found[i] for i in range(model_cfg.n_layers)]


def permutations(magnitudes: list[np.ndarray]) -> tuple:
    """K-sort's ``π`` per layer and key head, as the codec's hashable ``perm``."""
    out = []
    for i, m in enumerate(magnitudes):
        try:
            out.append(tuple(tuple(int(c) for c in row) for row in ksort(m)))
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
    return tuple(out)


def kv_quant(cfg: BFPKVConfig, perm: tuple | None = None) -> kvcache.KVQuant:
    """Every token stored as it is written (no full-precision window): keys in BFP with
    ``cfg.bits``-bit mantissas, reordered by ``perm`` (K-sort); values in BFP, unsorted."""
    return kvcache.KVQuant(
        key=BFPCodec(bits=cfg.bits, block=cfg.block, perm=perm),
        value=BFPCodec(bits=cfg.value_bits, block=cfg.value_block),
    )


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: BFPKVConfig, **kw: Any
) -> QuantizedModel:
    del kw
    t0 = time.perf_counter()
    D = model_cfg.head_dim
    kb, vb = head_block(cfg.block, D), head_block(cfg.value_block, D)  # bad blocks fail first
    perm = None
    if cfg.sort != "none":
        perm = permutations(channel_magnitudes(params, model_cfg, calib_tokens, cfg.sort))
    kvq = kv_quant(cfg, perm)
    report = [
        {"name": "keys", "format": bfp_name(cfg.bits), "block": kb, "sort": cfg.sort,
         "bits": kvq.key.element_bits(D)},
        {"name": "values", "format": bfp_name(cfg.value_bits), "block": vb, "sort": "none",
         "bits": kvq.value.element_bits(D)},
    ]  # fmt: skip
    return kv_cache_result(params, model_cfg, kvq, seconds=time.perf_counter() - t0, report=report)


METHOD = register(
    Method(
        name="bfp_kv",
        config=BFPKVConfig,
        quantize_model=quantize_model,
        paper="2403.20137",
        kind="kv_cache",
    )
)
PLAIN = register(
    Method(
        name="bfp_kv_nosort",
        config=PlainBFPKVConfig,
        quantize_model=quantize_model,
        paper="2403.20137",
        kind="kv_cache",
    )
)
