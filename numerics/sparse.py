"""Dense-and-sparse weights: a quantized dense part plus a few full-precision outliers.

SpQR (arXiv 2306.03078 §4) and SqueezeLLM (arXiv 2306.07629 §4.2) keep a small fraction of
weights (sensitivity- or magnitude-chosen outliers) in 16-bit precision in a sparse structure
and quantize the rest. The leaf that holds both, ``DenseSparse``, lives with the other weight
leaves in ``numerics.leaves`` (re-exported here, as is ``weight_bits``); this module splits a
weight into its outliers.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics.leaves import DenseSparse, weight_bits

__all__ = ["DenseSparse", "split_outliers", "weight_bits"]


def split_outliers(
    W: Float[Array, "out in"], mask: Array, *, value_dtype=jnp.float16
) -> tuple[Array, Array, Array]:
    """Coordinates and values of ``W`` where ``mask`` is True (eager: k is data-dependent)."""
    if mask.shape != W.shape:
        raise ValueError(f"mask shape {mask.shape} != weight shape {W.shape}")
    rows, cols = jnp.nonzero(mask)
    return rows.astype(jnp.int32), cols.astype(jnp.int32), W[rows, cols].astype(value_dtype)
