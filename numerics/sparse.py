"""Dense-and-sparse weights: a quantized dense part plus a few full-precision outliers.

SpQR (arXiv 2306.03078 §4) and SqueezeLLM (arXiv 2306.07629 §4.2) keep a small fraction of
weights (sensitivity- or magnitude-chosen outliers) in 16-bit precision in a sparse structure
and quantize the rest. ``DenseSparse`` holds both; ``dequantize()`` returns the dense part
with the outlier positions overwritten by their stored values. Bits per weight count each
outlier as ``bits_per_outlier`` (value + index; SpQR uses 32: a 16-bit value and a 16-bit
column index in CSR rows).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from numerics.packing import bits_per_weight as _qa_bits
from numerics.qarray import QArray


@dataclasses.dataclass(frozen=True)
class DenseSparse:
    dense: QArray  # quantized weight [out, in] (or any leaf with .dequantize / .bits_per_weight)
    rows: Int[Array, " k"]  # outlier row indices (int32)
    cols: Int[Array, " k"]  # outlier column indices (int32)
    values: Float[Array, " k"]  # outlier values (stored as float16 by default)
    bits_per_outlier: int = dataclasses.field(default=32, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense.shape

    @property
    def n_outliers(self) -> int:
        return int(self.rows.shape[0])

    def dequantize(self, dtype=None) -> Array:
        dt = jnp.dtype(dtype or self.dense.dtype)
        w = self.dense.dequantize(jnp.float32)
        w = w.at[self.rows, self.cols].set(self.values.astype(jnp.float32))
        return w.astype(dt)

    def bits_per_weight(self) -> float:
        if isinstance(self.dense, QArray):
            return _qa_bits(
                self.dense, n_outliers=self.n_outliers, bits_per_outlier=self.bits_per_outlier
            )
        # any other dense leaf that counts itself (e.g. SqueezeLLM's per-row lookup tables)
        size = math.prod(self.dense.shape)
        return self.dense.bits_per_weight() + self.n_outliers * self.bits_per_outlier / size


jax.tree_util.register_dataclass(DenseSparse)


def split_outliers(
    W: Float[Array, "out in"], mask: Array, *, value_dtype=jnp.float16
) -> tuple[Array, Array, Array]:
    """Coordinates and values of ``W`` where ``mask`` is True (eager: k is data-dependent)."""
    if mask.shape != W.shape:
        raise ValueError(f"mask shape {mask.shape} != weight shape {W.shape}")
    rows, cols = jnp.nonzero(mask)
    return rows.astype(jnp.int32), cols.astype(jnp.int32), W[rows, cols].astype(value_dtype)


def weight_bits(w) -> float:
    """Bits per weight of any weight leaf: QArray, DenseSparse, an object with its own
    ``bits_per_weight()`` (e.g. a lookup-table weight), or a float array (its dtype)."""
    if isinstance(w, DenseSparse):
        return w.bits_per_weight()
    if isinstance(w, QArray):
        return _qa_bits(w)
    if callable(getattr(w, "bits_per_weight", None)):  # other quantized leaves count themselves
        return float(w.bits_per_weight())
    return float(jnp.dtype(w.dtype).itemsize * 8)
