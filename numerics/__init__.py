"""lowbit numerics core: pure array math for quantization (no model knowledge).

The front door::

    from numerics import QuantConfig, quantize, rtn, mx
    qa = quantize(W, rtn(4, group_size=128))        # -> QArray
    W_hat = qa.dequantize()
    bits_per_weight(qa)                              # codes + scales + zero points
    is_weight_leaf(qa), weight_bits(qa)              # the weight-leaf protocol (numerics.leaves)

Submodules (see WORKSPACE.md): format_base, formats, minifloat, config, granularity, ranges,
quantize, qarray, leaves, rounding, scales, packing, sparse, codebooks, binarization, transforms,
scaling_laws, zoo.
"""

from numerics.config import QuantConfig, block_fp, block_minifloat, mx, rtn
from numerics.formats import (
    Format,
    IntFormat,
    TableFormat,
    binary_format,
    bipolar_int,
    codebook_format,
    get_format,
    normal_float,
    ternary_format,
)
from numerics.leaves import (
    LEAF_TYPES,
    DenseSparse,
    LUTWeight,
    ScaledQArray,
    WeightLeaf,
    is_weight_leaf,
    weight_bits,
)
from numerics.minifloat import FloatFormat, get_minifloat
from numerics.packing import bits_per_weight, pack, storage_bits, unpack
from numerics.qarray import QArray
from numerics.quantize import fake_quant, quant_error, quantize
from numerics.rounding import lsq_fake_quant, ste_fake_quant
from numerics.scales import dgq_quantize, double_quantize, progressive_quantize, quantize_scales

__all__ = [
    "LEAF_TYPES",
    "DenseSparse",
    "FloatFormat",
    "Format",
    "IntFormat",
    "LUTWeight",
    "QArray",
    "QuantConfig",
    "ScaledQArray",
    "TableFormat",
    "WeightLeaf",
    "binary_format",
    "bipolar_int",
    "bits_per_weight",
    "block_fp",
    "block_minifloat",
    "codebook_format",
    "dgq_quantize",
    "double_quantize",
    "fake_quant",
    "get_format",
    "get_minifloat",
    "is_weight_leaf",
    "lsq_fake_quant",
    "mx",
    "normal_float",
    "pack",
    "progressive_quantize",
    "quant_error",
    "quantize",
    "quantize_scales",
    "rtn",
    "ste_fake_quant",
    "storage_bits",
    "ternary_format",
    "unpack",
    "weight_bits",
]
