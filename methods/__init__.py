"""Weight-quantization methods, one paper per subpackage, all behind ``methods.base.Method``.

Importing this package registers every method (``methods.base.REGISTRY``)."""

from methods import (
    awq,  # noqa: F401
    bfp_kv,  # noqa: F401
    dgq,  # noqa: F401
    gear,  # noqa: F401
    gptq,  # noqa: F401
    kivi,  # noqa: F401
    kvquant,  # noqa: F401
    llm_int8,  # noqa: F401
    mixllm,  # noqa: F401
    omniquant,  # noqa: F401
    qserve_kv,  # noqa: F401
    rotatekv,  # noqa: F401
    rtn,  # noqa: F401  (registers)
    rtn_act,  # noqa: F401
    smoothquant,  # noqa: F401
    smoothquant_plus,  # noqa: F401
    spqr,  # noqa: F401
    squeezellm,  # noqa: F401
    wkvquant,  # noqa: F401
    zeroquant_4p2,  # noqa: F401
    zeroquant_fp,  # noqa: F401
    zeroquant_v2,  # noqa: F401
)
from methods.base import REGISTRY, LayerResult, LayerStats, Method, QuantizedModel, get_method

__all__ = ["REGISTRY", "LayerResult", "LayerStats", "Method", "QuantizedModel", "get_method"]
