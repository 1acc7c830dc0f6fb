"""RTN baseline (round-to-nearest per channel / per group)."""

from methods.base import Method, register
from methods.rtn.core import RTNConfig, quantize_layer
from methods.walk import quantize_sequential


def quantize_model(params, model_cfg, calib_tokens, cfg: RTNConfig, **kw):
    """RTN needs no statistics; it still walks the blocks so reports look like everyone's."""
    return quantize_sequential(params, model_cfg, calib_tokens, quantize_layer, cfg, needs=(), **kw)


METHOD = register(
    Method(
        name="rtn",
        config=RTNConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="baseline",
        needs=(),
        beats_rtn=False,
    )
)
