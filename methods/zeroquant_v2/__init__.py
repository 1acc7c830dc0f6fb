"""ZeroQuant-V2 (arXiv 2303.08302): fine-grained W4A8 with LoRC low-rank error compensation."""

from methods.base import Method, register
from methods.walk import quantize_sequential
from methods.zeroquant_v2.core import ZeroQuantV2Config, quantize_layer


def quantize_model(params, model_cfg, calib_tokens, cfg: ZeroQuantV2Config, **kw):
    """Data-free (RTN weights, dynamic activations): the walk runs no calibration forward."""
    return quantize_sequential(params, model_cfg, calib_tokens, quantize_layer, cfg, needs=(), **kw)


METHOD = register(
    Method(
        name="zeroquant_v2",
        config=ZeroQuantV2Config,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2303.08302",
        kind="weight_act",
        needs=(),
        beats_rtn=True,  # LoRC adds the best rank-m correction of the RTN error
    )
)
