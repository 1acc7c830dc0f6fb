"""``QArray``: the one quantized-array type of lowbit (a pytree).

Invariants (checked by ``QArray.check`` and the property tests):

* ``shape`` is the logical shape; ``block_shape`` divides it, ``nb = shape // block_shape`` —
  or, for ragged groups, leaves a remainder along one axis: ``nb = ceil(shape / block_shape)``
  and the last block there holds only the remaining elements.
* ``codes`` are unsigned bit patterns of ``format`` (``0 <= codes < 2**format.bits``),
  dtype ``uint8`` with shape ``shape`` — or, when ``packing = (axis, word_bits)``, the
  lossless packing of those codes along ``axis`` into ``uint{word_bits}`` words
  (``numerics.packing``).
* ``scale`` is a float array of shape ``nb``, or itself a ``QArray`` (scales of scales:
  QLoRA double quantization, DGQ / QServe two-level scales) of shape ``nb`` or a flat,
  possibly padded QArray whose first ``prod(nb)`` entries are the scales in C order.
* ``zero`` is ``None`` (symmetric) or a float array of shape ``nb`` holding integer-valued
  zero points in code units.
* Blockwise, ``x ≈ (format.decode(codes) − zero) · scale``; this is exactly ``dequantize()``.
* A block whose input contained NaN/Inf has scale NaN, so it dequantizes to NaN (never
  to silent finite garbage).

A QArray is a ``numerics.leaves.WeightLeaf``: ``bits_per_weight()`` counts its codes, scales
and zero points with ``numerics.packing`` (which this module builds on, never the reverse).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics import granularity as G
from numerics import packing as _packing
from numerics.formats import Format


@dataclasses.dataclass(frozen=True)
class QArray:
    codes: Array  # uint8 [*shape], or packed words along packing[0]
    scale: Any  # float [*nb] or QArray
    zero: Array | None  # float [*nb] integer-valued, or None
    format: Format = dataclasses.field(metadata={"static": True})
    block_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(metadata={"static": True})  # dtype dequantize() returns
    packing: tuple[int, int] | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def nb(self) -> tuple[int, ...]:
        return G.num_blocks(self.shape, self.block_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def scale_array(self) -> Float[Array, "*nb"]:
        s = self.scale
        if not isinstance(s, QArray):
            return s.astype(jnp.float32)
        flat = s.dequantize(jnp.float32).reshape(-1)  # flat scale QArrays may carry padding
        return flat[: math.prod(self.nb)].reshape(self.nb)

    def unpacked_codes(self) -> Array:
        if self.packing is None:
            return self.codes
        axis, _ = self.packing
        return _packing.unpack(self.codes, self.format.bits, axis=axis, length=self.shape[axis])

    def values(self) -> Float[Array, "*shape"]:
        """Grid values ``decode(codes) − zero`` (before scaling), float32."""
        v = G.to_blocks(self.format.decode(self.unpacked_codes()), self.block_shape)
        if self.zero is not None:
            v = v - G.expand_stat(self.zero.astype(jnp.float32))
        return G.from_blocks(v, self.shape)

    def dequantize(self, dtype=None) -> Array:
        """``(decode(codes) − zero)·scale`` blockwise, in ``dtype`` (default: the input's)."""
        return _dequantize(self, jnp.dtype(dtype or self.dtype))

    def pack(self, *, axis: int = -1, word_bits: int = 32) -> QArray:
        """Pack the codes along ``axis`` into ``uint{word_bits}`` words (lossless)."""
        if self.packing is not None:
            raise ValueError("QArray is already packed")
        ax = axis % self.ndim
        packed = _packing.pack(self.codes, self.format.bits, axis=ax, word_bits=word_bits)
        return dataclasses.replace(self, codes=packed, packing=(ax, word_bits))

    def unpack(self) -> QArray:
        if self.packing is None:
            return self
        return dataclasses.replace(self, codes=self.unpacked_codes(), packing=None)

    def storage_bits(self) -> dict[str, int]:
        """Stored bits by part (codes, scales, zeros): ``numerics.packing.storage_bits``."""
        return _packing.storage_bits(self)

    def bits_per_weight(self) -> float:
        """Stored bits per weight element: ``numerics.packing.bits_per_weight``."""
        return _packing.bits_per_weight(self)

    def check(self) -> None:
        """Raise ValueError if an invariant of the docstring does not hold (eager only)."""
        codes = self.unpacked_codes()
        if codes.shape != self.shape or codes.dtype != jnp.uint8:
            raise ValueError(f"codes {codes.shape}/{codes.dtype} do not match shape {self.shape}")
        if int(jnp.max(codes)) >= 2**self.format.bits:
            raise ValueError(f"codes exceed {self.format.bits} bits")
        sa = self.scale_array()
        if sa.shape != self.nb:
            raise ValueError(f"scale shape {sa.shape} != number of blocks {self.nb}")
        if self.zero is not None and self.zero.shape != self.nb:
            raise ValueError(f"zero shape {self.zero.shape} != number of blocks {self.nb}")


jax.tree_util.register_dataclass(QArray)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(qa: QArray, dtype) -> Array:
    v = G.to_blocks(qa.values(), qa.block_shape)
    x = v * G.expand_stat(qa.scale_array())
    return G.from_blocks(x, qa.shape).astype(dtype)
