"""SpQR (arXiv 2306.03078): GPTQ with β₁ = 16 groups, 3-bit group scales, fp16 sparse outliers."""

from methods.base import Method, register
from methods.spqr.core import SpQRCodes, SpQRConfig, quantize_layer, spqr_quantize, to_qarray
from methods.walk import quantize_sequential


def quantize_model(params, model_cfg, calib_tokens, cfg: SpQRConfig, **kw):
    """Block-by-block SpQR (true-sequential by default; ``kw`` goes to ``quantize_sequential``)."""
    return quantize_sequential(
        params, model_cfg, calib_tokens, quantize_layer, cfg, needs=("H",), **kw
    )


METHOD = register(
    Method(
        name="spqr",
        config=SpQRConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2306.03078",
        needs=("H",),
        beats_rtn=True,
    )
)

__all__ = [
    "METHOD",
    "SpQRCodes",
    "SpQRConfig",
    "quantize_layer",
    "quantize_model",
    "spqr_quantize",
    "to_qarray",
]
