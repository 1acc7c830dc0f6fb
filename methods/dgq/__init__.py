"""DGQ model walk (arXiv 2310.04836; ilur98/DGQ ``dgq/entry.py``).

1. The per-channel input maxima max|X_j| of every group of linears sharing an input
   (``harness.model.ADAPTERS``) are captured on the full-precision model
   (:func:`input_absmax`);
2. with ``smooth`` the percentile clipping scales (``core.percentile_smoothing``) are folded
   into the block params (``harness.structure.fold_scale``: RMSNorm for q/k/v and gate/up, up_proj's
   rows for down_proj; o_proj is left alone when it cannot be folded, grouped-query attention);
3. the smoothed model is quantized block by block (``methods.walk.quantize_sequential``, true
   sequential) with the per-linear two-phase search (``core.quantize_layer``), which returns
   each linear's per-token INT8 activation quantizer.
"""

from __future__ import annotations

from typing import Any

from harness import capture
from harness import stats as statistics
from harness.model import ADAPTERS, ModelConfig, get_param
from harness.structure import fold_scale
from methods.base import Method, QuantizedModel, register
from methods.dgq.core import DGQConfig, percentile_smoothing, quantize_layer
from methods.walk import layer_stats, quantize_sequential

__all__ = ["DGQConfig", "quantize_layer", "quantize_model", "input_absmax", "smooth_params"]


def input_absmax(
    params: Any, model_cfg: ModelConfig, calib_tokens: Any, *, batch_size: int = 8
) -> dict[str, Any]:
    """``{"blocks.i.<first linear of a group>": max|X_j|}`` of the full-precision model."""
    out: dict[str, Any] = {}
    leads = [g.names[0] for g in ADAPTERS[model_cfg.family]]

    def on_block(i: int, bp: Any, calib: capture.BlockCalibration) -> Any:
        for lead in leads:
            out[f"blocks.{i}.{lead}"] = layer_stats(calib[lead]).act_absmax
        return bp

    capture.sequential(
        params,
        model_cfg,
        calib_tokens,
        on_block,
        accumulators=statistics.plan(("act_absmax",))[0],
        names=tuple(leads),
        batch_size=batch_size,
    )
    return out


def _foldable(bp: Any, group) -> bool:
    if group.norm is not None:
        return True
    d_in = get_param(bp, group.names[0]).shape[1]
    return group.prev is not None and get_param(bp, group.prev).shape[0] == d_in


def smooth_params(params: Any, model_cfg: ModelConfig, absmax: dict[str, Any], top: float) -> Any:
    """Fold the percentile clipping scales of every foldable input group into ``params``."""
    blocks = list(params["blocks"])
    for i in range(model_cfg.n_layers):
        bp = blocks[i]
        for g in ADAPTERS[model_cfg.family]:
            if _foldable(bp, g):
                s = percentile_smoothing(absmax[f"blocks.{i}.{g.names[0]}"], top)
                bp = fold_scale(bp, g, s)
        blocks[i] = bp
    return {**params, "blocks": blocks}


def quantize_model(
    params, model_cfg: ModelConfig, calib_tokens, cfg: DGQConfig, *, batch_size: int = 8, **kw
) -> QuantizedModel:
    """DGQ over every block (module docstring)."""
    if cfg.smooth:
        absmax = input_absmax(params, model_cfg, calib_tokens, batch_size=batch_size)
        params = smooth_params(params, model_cfg, absmax, cfg.smooth_top)
    return quantize_sequential(
        params, model_cfg, calib_tokens, quantize_layer, cfg, needs=("H", "X"),
        batch_size=batch_size, **kw,
    )  # fmt: skip


METHOD = register(
    Method(
        name="dgq",
        kind="weight_act",
        config=DGQConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2310.04836",
        needs=("H", "X"),
    )
)
