"""WKVQuant (arXiv 2402.12065) over a whole model: calibrate each layer's 2D smoothing
parameters (``core``), fit them with cross-block reconstruction (CRR), and hand the model
the past-only cache as ``Hooks.kv_quant``. Weights are left as they are."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness import kvcache
from harness.capture import shared_layer
from harness.layers import Hooks
from harness.model import KV_SITES, Model, ModelConfig
from methods.base import Method, QuantizedModel, kv_cache_result, register
from methods.wkvquant.core import (
    BITS,
    TrainCodec,
    TwoDCodec,
    WKVQuantConfig,
    fake_2d_ste,
    init_smoothing,
)

__all__ = [
    "BITS", "TrainCodec", "TwoDCodec", "WKVQuantConfig", "crr_fit", "fake_2d_ste",
    "init_smoothing", "kv_quant", "quantize_model",
]  # fmt: skip

_K, _V = KV_SITES[1], KV_SITES[2]  # post-RoPE keys (what the cache stores) and values


def _policy(cfg: WKVQuantConfig) -> dict:
    return dict(chunk=1, window=1 if cfg.past_only else 0, flush=1)


def kv_quant(cfg: WKVQuantConfig, params: dict) -> kvcache.KVQuant:
    """The cache from fitted parameters ``{"k": (δs, ss), "v": (δs, ss)}`` (one array per
    layer)."""
    pol = _policy(cfg)
    return kvcache.KVQuant(
        key=TwoDCodec.from_arrays(*params["k"], bits=cfg.bits, **pol),
        value=TwoDCodec.from_arrays(*params["v"], bits=cfg.bits, **pol),
    )


def _step_fn(model_cfg: ModelConfig, cfg: WKVQuantConfig, rep: list[int], opt):
    """One Adam step on the CRR loss: the MAE of the output ``len(rep)`` blocks downstream,
    block ``rep[0]`` under the trained cache, the rest full precision;
    ``θ = (δ_k, log s_k, δ_v, log s_v)`` ``[kv, hd]`` each. Returns the loss at ``θ``."""
    plain = Model(model_cfg)
    pol = _policy(cfg)

    def loss(theta, blocks, x, target):
        dk, lk, dv, lv = theta
        kvq = kvcache.KVQuant(
            key=TrainCodec(bits=cfg.bits, delta=dk, scale=jnp.exp(lk), **pol),
            value=TrainCodec(bits=cfg.bits, delta=dv, scale=jnp.exp(lv), **pol),
        )
        h = Model(model_cfg, Hooks(kv_quant=kvq)).apply_block(blocks[0], rep[0], x)
        for j, bp in zip(rep[1:], blocks[1:], strict=True):
            h = plain.apply_block(bp, j, h)
        return jnp.mean(jnp.abs(h - target))

    def step(theta, state, blocks, x, target):
        value, grad = jax.value_and_grad(loss)(theta, blocks, x, target)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
            updates, state = opt.update(grad, state)
        return value, optax.apply_updates(theta, updates), state

    return jax.jit(step)


def crr_fit(model_cfg, cfg, theta0, blocks, rep, x, target) -> tuple[tuple, list[float]]:
    """Adam on the CRR loss from ``theta0``; returns the best parameters seen (the start
    included) and the loss at each of them."""
    opt = optax.adam(cfg.lr)
    step = _step_fn(model_cfg, cfg, rep, opt)
    theta, state = theta0, opt.init(theta0)
    best, best_loss, losses = theta0, np.inf, []
    for _ in range(cfg.steps + 1):
        value, new, state = step(theta, state, blocks, x, target)
        value = float(value)
        if not np.isfinite(value):
            raise ValueError("WKVQuant: the CRR loss is not finite")
        losses.append(value)
        if value < best_loss:
            best, best_loss = theta, value
        theta = new
    return best, losses


def quantize_model(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, cfg: WKVQuantConfig, **kw: Any
) -> QuantizedModel:
    del kw
    t0 = time.perf_counter()
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.size == 0 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"WKVQuant: calibration must be integer ids [n, t], got {tokens.shape}")
    model = Model(model_cfg)
    H, D, L = model_cfg.n_kv_heads, model_cfg.head_dim, model_cfg.n_layers
    k = min(cfg.crr_blocks, L)
    run = jax.jit(lambda bp, h, i: model.apply_block(bp, i, h, capture=True), static_argnums=2)
    h = model.embed(params, tokens)
    n, t = min(cfg.samples, tokens.shape[0]), min(cfg.tokens, tokens.shape[1])
    stream = [h[:n, :t]]  # the full-precision hidden states the CRR loss reads
    ranges = []
    for i in range(L):
        h, got = run(params["blocks"][i], h, shared_layer(model, i))
        ranges.append(
            {s: (jnp.min(got[s], axis=(0, 1)), jnp.max(got[s], axis=(0, 1))) for s in (_K, _V)}
        )
        stream.append(h[:n, :t])
    out = {"k": ([], []), "v": ([], [])}
    report = []
    for i in range(L):
        (dk, sk), (dv, sv) = (init_smoothing(*ranges[i][s], cfg.alpha) for s in (_K, _V))
        theta = tuple(jnp.asarray(a.reshape(H, D)) for a in (dk, np.log(sk), dv, np.log(sv)))
        row = {"name": f"blocks.{i}.attn.kv", "bits": float(cfg.bits)}
        if cfg.crr:
            j = min(i + k, L)
            rep = [shared_layer(model, b) for b in range(i, j)]
            theta, losses = crr_fit(
                model_cfg, cfg, theta, params["blocks"][i:j], rep, stream[i], stream[j]
            )
            row |= {"crr_first": losses[0], "crr_best": min(losses), "crr_blocks": j - i}
        report.append(row)
        dk, lk, dv, lv = (np.asarray(a, np.float32).ravel() for a in theta)
        for side, d, ls in (("k", dk, lk), ("v", dv, lv)):
            out[side][0].append(d)
            out[side][1].append(np.exp(ls))
    return kv_cache_result(
        params, model_cfg, kv_quant(cfg, out), seconds=time.perf_counter() - t0, report=report
    )


METHOD = register(
    Method(
        name="wkvquant",
        config=WKVQuantConfig,
        quantize_model=quantize_model,
        paper="2402.12065",
        kind="kv_cache",
    )
)
