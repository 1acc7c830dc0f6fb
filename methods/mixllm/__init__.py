"""MixLLM model walk (arXiv 2412.14590).

1. The Fisher information of every block linear on the calibration set
   (``methods.squeezellm.fisher.fisher_information``, one gradient pass);
2. every row's salience (``core.salience``) over the whole model and one global threshold
   (``core.global_threshold``: the top rows until ``high_frac`` of all weights);
3. every linear quantized with that threshold (``core.quantize_layer`` through
   ``methods.walk.quantize_sequential``; data-free given the threshold), each with its input's
   per-token INT8 quantizer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from harness.model import ModelConfig, get_param, linear_names
from methods.base import Method, QuantizedModel, register
from methods.mixllm.core import (
    MixLLMConfig,
    global_threshold,
    mixed_quantize,
    quantize_layer,
    salience,
)
from methods.squeezellm.fisher import fisher_information
from methods.walk import quantize_sequential

__all__ = ["MixLLMConfig", "quantize_layer", "quantize_model", "salience", "mixed_quantize"]


def quantize_model(
    params,
    model_cfg: ModelConfig,
    calib_tokens,
    cfg: MixLLMConfig,
    *,
    fisher=None,
    fisher_batch_size: int = 1,
    **kw,
) -> QuantizedModel:
    """MixLLM over the whole model (module docstring); ``fisher``: a precomputed
    ``fisher_information`` dict to reuse."""
    if fisher is None:
        fisher = fisher_information(params, model_cfg, calib_tokens, fisher_batch_size)
    names = linear_names(model_cfg)
    S, widths = [], []
    for n in names:
        W = get_param(params, n)
        S.append(np.asarray(salience(W, fisher[n], cfg)))
        widths.append(int(W.shape[1]))
    tau = global_threshold(S, widths, cfg.high_frac)
    return quantize_sequential(
        params, model_cfg, calib_tokens, quantize_layer, dataclasses.replace(cfg, threshold=tau),
        needs=(), extra_stats={n: {"fisher": fisher[n]} for n in names}, **kw,
    )  # fmt: skip


METHOD = register(
    Method(
        name="mixllm",
        kind="weight_act",
        config=MixLLMConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2412.14590",
        needs=("fisher",),
    )
)
