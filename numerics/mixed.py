"""Row-mixed precision: a weight ``W[out, in]`` whose output rows have two bit-widths.

MixLLM (arXiv 2412.14590 §3) keeps its most salient output features at 8 bits and the rest at
4. ``RowMixed`` holds the two parts as ordinary QArrays — ``low`` (the rows ``rows_low``,
e.g. asymmetric INT4 in groups of 128) and ``high`` (the rows ``rows_high``, e.g. INT8 per
channel) — and ``dequantize()`` scatters them back into place. Bits per weight count every
part with ``numerics.packing.storage_bits`` (codes, scales, zero points of each part: a row
at 8 bits counts 8 per weight plus its scale) plus ``index_bits`` per high row for its index
(the low rows are the complement). Either part may be absent (``None``: no row of that width).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from numerics.packing import bits_per_weight, storage_bits
from numerics.qarray import QArray


@dataclasses.dataclass(frozen=True)
class RowMixed:
    low: QArray | None  # the low-precision rows [out − k, in] (None when k = out)
    high: QArray | None  # the high-precision rows [k, in] (None when k = 0)
    rows_low: Int[Array, " m"]  # row index of each row of ``low`` (int32)
    rows_high: Int[Array, " k"]  # row index of each row of ``high`` (int32)
    index_bits: int = dataclasses.field(default=16, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows_low.shape[0]) + int(self.rows_high.shape[0]), self._part.shape[1])

    @property
    def dtype(self):
        return self._part.dtype

    @property
    def _part(self) -> QArray:
        return self.low if self.low is not None else self.high

    @property
    def n_high(self) -> int:
        return int(self.rows_high.shape[0])

    def dequantize(self, dtype=None) -> Array:
        dt = jnp.dtype(dtype or self.dtype)
        w = jnp.zeros(self.shape, jnp.float32)
        for part, rows in ((self.low, self.rows_low), (self.high, self.rows_high)):
            if part is not None:
                w = w.at[rows].set(part.dequantize(jnp.float32))
        return w.astype(dt)

    def storage_bits(self) -> dict[str, int]:
        """Each part's stored bits (codes + scales + zeros) and the high rows' indices."""
        parts = {"low": self.low, "high": self.high}
        out = {k: sum(storage_bits(q).values()) for k, q in parts.items() if q is not None}
        return out | {"row_indices": self.n_high * self.index_bits}

    def bits_per_weight(self) -> float:
        return bits_per_weight(self)


jax.tree_util.register_dataclass(RowMixed)
