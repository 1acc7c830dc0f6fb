"""ZeroQuant-FP (arXiv 2307.09782): FP8 E4M3 activations with INT4 / FP4 weights."""

from methods.base import Method, register
from methods.walk import quantize_sequential
from methods.zeroquant_fp.core import ZeroQuantFPConfig, quantize_layer


def quantize_model(params, model_cfg, calib_tokens, cfg: ZeroQuantFPConfig, **kw):
    """Data-free (RTN weights, dynamic activations): the walk runs no calibration forward."""
    return quantize_sequential(params, model_cfg, calib_tokens, quantize_layer, cfg, needs=(), **kw)


METHOD = register(
    Method(
        name="zeroquant_fp",
        config=ZeroQuantFPConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2307.09782",
        kind="weight_act",
        needs=(),
        beats_rtn=False,
    )
)
