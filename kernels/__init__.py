"""Pallas kernels that read quantized weights directly, each beside a plain-jnp reference.

* :mod:`kernels.mpgemm` — mixed-precision GEMM ``x @ Ŵᵀ`` on packed INT2/3/4/8, NF4 and FP4
  (MXFP4) codes with group scales (+ zero points), dequantized tile by tile inside the kernel;
  :func:`qarray_matmul` takes a ``numerics.QArray`` (the harness's ``Hooks.matmul`` seam).
* :mod:`kernels.w8a8` — int8 × int8 → int32 with per-token × per-channel scales
  (SmoothQuant / LLM.int8() inner product).
* :mod:`kernels.tmac` — T-MAC lookup-table mpGEMM (arXiv 2407.00088) and its operation counts.
* :mod:`kernels.kv_decode` — decode attention over a low-bit KV cache (KIVI layout: keys per
  channel, values per token), dequantized block by block inside the kernel.
* :mod:`kernels.common` — in-kernel unpacking / decoding helpers, argument checks, the
  float32-accumulation error bound the tests use.

Every kernel takes ``interpret=``: ``True`` runs Pallas' interpreter (CPU, tests), ``False``
compiles with the Triton backend on a GPU. Importing this package needs no GPU.
"""

from kernels.common import dot_error_bound
from kernels.kv_decode import kv_decode, kv_decode_reference, qarray_kv_decode
from kernels.mpgemm import mpgemm, mpgemm_reference, qarray_fields, qarray_matmul
from kernels.tmac import qarray_tmac, tmac, tmac_op_counts, tmac_prepare, tmac_reference
from kernels.w8a8 import (
    int8_matmul,
    int8_matmul_reference,
    qarray_w8a8,
    w8a8,
    w8a8_reference,
)

__all__ = [
    "dot_error_bound",
    "int8_matmul",
    "int8_matmul_reference",
    "kv_decode",
    "kv_decode_reference",
    "mpgemm",
    "mpgemm_reference",
    "qarray_fields",
    "qarray_kv_decode",
    "qarray_matmul",
    "qarray_tmac",
    "qarray_w8a8",
    "tmac",
    "tmac_op_counts",
    "tmac_prepare",
    "tmac_reference",
    "w8a8",
    "w8a8_reference",
]
