"""LLM.int8() (arXiv 2208.07339) over a whole model: ``methods.walk`` with the per-linear core.

Every block linear gets vector-wise int8 weights and its input quantizer (per-token int8 with the
run-time outlier decomposition, ``core``). The method is data-free (the walk skips calibration);
with ``outliers=True`` the calibration inputs are captured (one capture per block:
``true_sequential=False``, nothing depends on the previous groups) only so that the report's
``outlier_frac`` per linear gives the share of its input features with ``max|X_j| ≥ α``.
"""

from __future__ import annotations

from typing import Any

from harness.model import ModelConfig
from methods.base import Method, QuantizedModel, register
from methods.llm_int8.core import LLMInt8Config, outlier_fraction, quantize_layer
from methods.walk import quantize_sequential

__all__ = ["LLMInt8Config", "outlier_fraction", "quantize_layer", "quantize_model"]


def quantize_model(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Any,
    cfg: LLMInt8Config,
    *,
    batch_size: int = 8,
    progress: bool = False,
    outliers: bool = False,
    **kw: Any,
) -> QuantizedModel:
    return quantize_sequential(
        params,
        model_cfg,
        calib_tokens,
        quantize_layer,
        cfg,
        needs=("act_absmax",) if outliers else (),
        true_sequential=False,
        batch_size=batch_size,
        progress=progress,
        **kw,
    )


METHOD = register(
    Method(
        name="llm_int8",
        config=LLMInt8Config,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2208.07339",
        kind="weight_act",
    )
)
