"""GPTQ (arXiv 2210.17323): the core is ``methods.gptq.core``; this walks a model with it."""

from methods.base import Method, register
from methods.gptq.core import GPTQConfig, gptq, quantize_layer
from methods.walk import quantize_sequential

__all__ = ["GPTQConfig", "gptq", "quantize_layer", "quantize_model", "METHOD"]


def quantize_model(params, model_cfg, calib_tokens, cfg: GPTQConfig, **kw):
    """Block-by-block GPTQ (the reference's ``llama_sequential``), true-sequential order inside
    a block when ``cfg.true_sequential``; ``kw`` goes to ``methods.walk.quantize_sequential``."""
    kw.setdefault("true_sequential", cfg.true_sequential)
    return quantize_sequential(
        params, model_cfg, calib_tokens, quantize_layer, cfg, needs=("H",), **kw
    )


METHOD = register(
    Method(
        name="gptq",
        config=GPTQConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2210.17323",
        needs=("H",),
        beats_rtn=True,
    )
)
