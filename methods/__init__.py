"""Weight-quantization methods, one paper per subpackage, all behind ``methods.base.Method``.

Importing this package registers every method (``methods.base.REGISTRY``)."""

from methods.base import REGISTRY, LayerResult, LayerStats, Method, QuantizedModel, get_method
from methods import rtn  # noqa: F401  (registers)
from methods import gptq  # noqa: F401
from methods import spqr  # noqa: F401
from methods import squeezellm  # noqa: F401
from methods import awq  # noqa: F401
from methods import omniquant  # noqa: F401

__all__ = ["REGISTRY", "LayerResult", "LayerStats", "Method", "QuantizedModel", "get_method"]
