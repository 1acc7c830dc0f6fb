"""SqueezeLLM (arXiv 2306.07629): Fisher-weighted per-channel k-means levels + dense-and-sparse."""

from methods.base import Method, register
from methods.squeezellm.core import (
    LUTWeight,
    SqueezeLLMConfig,
    nonuniform_quantize,
    quantize_layer,
    sparse_indices,
)
from methods.squeezellm.fisher import fisher_information, sequence_loss
from methods.walk import quantize_sequential


def quantize_model(
    params,
    model_cfg,
    calib_tokens,
    cfg: SqueezeLLMConfig,
    *,
    fisher=None,
    fisher_batch_size: int = 1,
    **kw,
):
    """Fisher information of the full-precision model on ``calib_tokens`` (once, as the paper's
    gradient pass), then every block linear quantized with its own ``F``. Pass ``fisher`` (the
    dict ``fisher_information`` returns) to reuse one. ``kw`` goes to ``quantize_sequential``."""
    if fisher is None:
        fisher = fisher_information(params, model_cfg, calib_tokens, fisher_batch_size)
    extra = {name: {"fisher": F} for name, F in fisher.items()}
    return quantize_sequential(
        params, model_cfg, calib_tokens, quantize_layer, cfg, needs=(), extra_stats=extra, **kw
    )


METHOD = register(
    Method(
        name="squeezellm",
        config=SqueezeLLMConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2306.07629",
        needs=(),  # reads LayerStats.fisher when given (uniform weights without it)
        beats_rtn=True,
    )
)

__all__ = [
    "METHOD",
    "LUTWeight",
    "SqueezeLLMConfig",
    "fisher_information",
    "nonuniform_quantize",
    "sparse_indices",
    "quantize_layer",
    "quantize_model",
    "sequence_loss",
]
