"""SmoothQuant+ model walk (arXiv 2312.03788): one α for the whole model.

1. max|X_j| of every input group (``harness.model.ADAPTERS``) on the float model
   (``methods.dgq.input_absmax``);
2. for each α of the grid: smoothing scales ``core.smoothing_scales`` folded into every
   foldable group (``harness.structure.fold_scale``), every block linear RTN-quantized (INT4 g128),
   and the mean squared logit error against the float model on the first ``search_seqs``
   calibration sequences;
3. the best α's smoothed and quantized model is the result (weight-only: no hooks).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from harness.model import ADAPTERS, Model, ModelConfig, get_param, set_param
from harness.structure import fold_scale
from methods.base import Method, QuantizedModel, register
from methods.dgq import input_absmax
from methods.smoothquant_plus.core import (
    SmoothQuantPlusConfig,
    column_absmax,
    quantize_layer,
    smoothing_scales,
)
from methods.walk import quantized_model
from numerics.quantize import quantize
from numerics.sparse import weight_bits

__all__ = ["SmoothQuantPlusConfig", "quantize_layer", "quantize_model", "smooth_model"]


def _foldable(bp: Any, group) -> bool:
    if group.norm is not None:
        return True
    d_in = get_param(bp, group.names[0]).shape[1]
    return group.prev is not None and get_param(bp, group.prev).shape[0] == d_in


def smooth_model(params: Any, model_cfg: ModelConfig, absmax: dict[str, Any], alpha) -> Any:
    """``params`` with the scales of strength ``alpha`` folded into every foldable group."""
    blocks = list(params["blocks"])
    for i in range(model_cfg.n_layers):
        bp = blocks[i]
        for g in ADAPTERS[model_cfg.family]:
            if _foldable(bp, g):
                w = column_absmax(*(get_param(bp, n) for n in g.names))
                s = smoothing_scales(absmax[f"blocks.{i}.{g.names[0]}"], w, alpha)
                bp = fold_scale(bp, g, s.astype(jnp.float16).astype(jnp.float32))
        blocks[i] = bp
    return {**params, "blocks": blocks}


def _quantize_all(params: Any, model_cfg: ModelConfig, cfg: SmoothQuantPlusConfig):
    qcfg, rows = cfg.quant_config(), []
    blocks = list(params["blocks"])
    for i in range(model_cfg.n_layers):
        for g in ADAPTERS[model_cfg.family]:
            for n in g.names:
                t = time.perf_counter()
                qa = quantize(get_param(blocks[i], n), qcfg)
                blocks[i] = set_param(blocks[i], n, qa)
                rows.append(
                    {"name": f"blocks.{i}.{n}", "bits": weight_bits(qa),
                     "seconds": time.perf_counter() - t}
                )  # fmt: skip
    return {**params, "blocks": blocks}, rows


def quantize_model(
    params, model_cfg: ModelConfig, calib_tokens, cfg: SmoothQuantPlusConfig, *,
    batch_size: int = 8, **kw,
) -> QuantizedModel:  # fmt: skip
    """SmoothQuant+ (module docstring): the result's report rows carry the chosen α and each
    α's loss is in ``report[0]["alpha_losses"]``."""
    del kw
    t0 = time.perf_counter()
    absmax = input_absmax(params, model_cfg, calib_tokens, batch_size=batch_size)
    tokens = jnp.asarray(calib_tokens)[: cfg.search_seqs]
    fwd = jax.jit(Model(model_cfg).forward)
    ref = fwd(params, tokens)
    losses, best, alphas = [], None, [float(a) for a in cfg.alphas()]
    for alpha in alphas:
        qp, rows = _quantize_all(smooth_model(params, model_cfg, absmax, alpha), model_cfg, cfg)
        loss = float(jnp.mean(jnp.square(fwd(qp, tokens) - ref)))
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, qp, rows)
    loss, alpha, qp, rows = best
    for r in rows:
        r["alpha"] = alpha
    pairs = zip(alphas, losses, strict=True)
    rows[0]["alpha_losses"] = ",".join(f"{a:.2f}:{v:.4g}" for a, v in pairs)
    return quantized_model(params, qp, rows, t0)


METHOD = register(
    Method(
        name="smoothquant_plus",
        config=SmoothQuantPlusConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2312.03788",
        needs=("H", "act_absmax"),
    )
)
