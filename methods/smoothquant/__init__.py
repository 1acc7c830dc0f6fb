"""SmoothQuant (arXiv 2211.10438) and the naive W8A8 baseline, over a whole model.

One calibration pass through the full-precision model (``harness.capture.sequential``, the fp
block's outputs feeding the next block, as the reference collects its ``act_scales`` on the fp
model) records each linear's per-channel ``max|X_j|`` (``act_absmax``). Per block:

1. ``smoothquant`` only: for each group of ``harness.model.ADAPTERS`` with a preceding norm
   (q/k/v after ``attn_norm``, gate/up after ``mlp_norm``; o and down are not smoothed, as in
   the reference's LLaMA branch) ``s`` = eq. 4 (``core.smoothing_scales``) is folded into the
   norm and the weights (``harness.structure.fold_scale``); that group's input statistic becomes
   ``max|X_j| / s_j``;
2. every block linear is quantized by ``core.quantize_layer`` (INT weights + the input's
   quantizer at the config's level), the quantizers go into the result's ``Hooks.act_quant``.

``w8a8`` is the same with step 1 skipped: "naive W8A8", its own method (not an α of
SmoothQuant, since α = 0 still rescales by ``1 / max|W_j|``) so that every W+A table can carry
it as a baseline row at any level.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp

from harness import capture
from harness import stats as statistics
from harness.model import ADAPTERS, ModelConfig, get_param
from harness.structure import fold_scale
from methods.base import Method, QuantizedModel, register
from methods.smoothquant import core
from methods.smoothquant.core import SmoothQuantConfig, W8A8Config, quantize_layer
from methods.walk import layer_stats, quantize_sequential

__all__ = [
    "SmoothQuantConfig",
    "W8A8Config",
    "calibrate",
    "quantize_from_stats",
    "quantize_layer",
    "quantize_model",
    "smooth_block",
]


def smooth_block(
    bp: Any, absmax: dict[str, Any], alpha: float, family: str
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Fold eq. 4's scales into one block (norm-preceded groups only).

    ``absmax``: block-relative linear name → ``max|X_j|`` of its fp inputs. Returns the smoothed
    block, the smoothed inputs' ``max|X_j| / s_j`` per linear, and ``s`` per smoothed group."""
    absmax, scales = dict(absmax), {}
    for group in ADAPTERS[family]:
        if group.norm is None:
            continue
        lead = group.names[0]
        s = core.smoothing_scales(absmax[lead], [get_param(bp, n) for n in group.names], alpha)
        bp = fold_scale(bp, group, s)
        for n in group.names:
            absmax[n] = jnp.asarray(absmax[n], jnp.float32) / s
        scales[lead] = s
    return bp, absmax, scales


def calibrate(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Any,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """``max|X_j|`` of every block linear's inputs in the full-precision model (one pass, the fp
    block's outputs feeding the next block, as the reference's ``get_act_scales``), by full
    name (``blocks.3.attn.q_proj``)."""
    names = [n for g in ADAPTERS[model_cfg.family] for n in g.names]
    out: dict[str, Any] = {}

    def on_block(i: int, bp: Any, calib: capture.BlockCalibration) -> Any:
        out.update({f"blocks.{i}.{n}": layer_stats(calib[n]).act_absmax for n in names})
        return bp

    capture.sequential(
        params, model_cfg, calib_tokens, on_block,
        accumulators=statistics.plan(("act_absmax",))[0], batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return out


def quantize_from_stats(
    params: Any, model_cfg: ModelConfig, act_absmax: dict[str, Any], cfg: W8A8Config
) -> QuantizedModel:
    """Smooth (``SmoothQuantConfig``) and quantize every block with the fp inputs' statistics
    ``act_absmax`` (:func:`calibrate`); one calibration serves any α or level. The per-linear
    walk (data-free: the statistics are given) quantizes the smoothed params."""
    smooth = isinstance(cfg, SmoothQuantConfig)
    absmax, smoothed, blocks = dict(act_absmax), set(), list(params["blocks"])
    table = ADAPTERS[model_cfg.family]
    for i in range(model_cfg.n_layers) if smooth else ():
        rel = {n: act_absmax[f"blocks.{i}.{n}"] for g in table for n in g.names}
        blocks[i], rel, scales = smooth_block(blocks[i], rel, cfg.alpha, model_cfg.family)
        absmax |= {f"blocks.{i}.{n}": m for n, m in rel.items()}
        groups = [g for g in table if g.names[0] in scales]
        smoothed |= {f"blocks.{i}.{n}" for g in groups for n in g.names}
    q = quantize_sequential(
        {**params, "blocks": blocks}, model_cfg, None, quantize_layer, cfg, needs=(),
        extra_stats={n: {"act_absmax": m} for n, m in absmax.items()},
    )  # fmt: skip
    report = [r | {"smoothed": r["name"] in smoothed} for r in q.report]
    return dataclasses.replace(q, report=report)


def quantize_model(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Any,
    cfg: W8A8Config,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> QuantizedModel:
    """``cfg`` a :class:`SmoothQuantConfig` (smooth, then quantize) or a :class:`W8A8Config`
    (quantize only); see the module docstring."""
    t0 = time.perf_counter()
    stats = calibrate(params, model_cfg, calib_tokens, batch_size=batch_size, progress=progress)
    q = quantize_from_stats(params, model_cfg, stats, cfg)
    return dataclasses.replace(q, seconds=time.perf_counter() - t0)


SMOOTHQUANT = register(
    Method(
        name="smoothquant",
        config=SmoothQuantConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2211.10438",
        kind="weight_act",
        needs=("act_absmax",),
    )
)
W8A8 = register(
    Method(
        name="w8a8",
        config=W8A8Config,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2211.10438",
        kind="weight_act",
        needs=("act_absmax",),
    )
)
