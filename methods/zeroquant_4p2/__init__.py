"""ZeroQuant(4+2) (arXiv 2312.08583): FP6 E3M2 weights, per-channel scales, 4+2 bit layout."""

from methods.base import Method, register
from methods.walk import quantize_sequential
from methods.zeroquant_4p2.core import ZeroQuant42Config, quantize_layer


def quantize_model(params, model_cfg, calib_tokens, cfg: ZeroQuant42Config, **kw):
    """Data-free: the walk runs no calibration forward."""
    return quantize_sequential(params, model_cfg, calib_tokens, quantize_layer, cfg, needs=(), **kw)


METHOD = register(
    Method(
        name="zeroquant_4p2",
        config=ZeroQuant42Config,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2312.08583",
        kind="weight_only",
        needs=(),
        beats_rtn=False,
    )
)
