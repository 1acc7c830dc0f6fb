"""Weight leaves: the protocol every quantized weight of a params tree satisfies, and its types.

A weight leaf is what a method puts where a float matrix ``W[out, in]`` was; the harness seam
(``harness.layers.linear``) only dequantizes it, the tables only count its bits. The protocol
(:class:`WeightLeaf`, ``typing.Protocol``, checked at run time by :func:`is_weight_leaf`):

* ``shape``             — the logical weight shape (``W[out, in]``);
* ``dtype``             — the dtype ``dequantize()`` returns by default (the input's);
* ``dequantize(dtype=None)`` — the float weight ``Ŵ``;
* ``bits_per_weight()`` — everything stored (codes, scales, zero points, outliers, lookup
  tables) per weight element. Every leaf lists its parts in ``storage_bits()`` and counts them
  with the one function ``numerics.packing.bits_per_weight``.

The leaf types, all registered pytrees (``jax.tree_util.register_dataclass``; their array
fields are children, the rest static, so ``methods.checkpoint`` rebuilds each from its class
path and static fields):

* ``numerics.qarray.QArray`` — codes + scales (+ zero points) of one ``Format``;
* :class:`DenseSparse` — a quantized dense part plus fp16 outliers (SpQR, SqueezeLLM);
* :class:`ScaledQArray` — ``Q(W·diag(s))·diag(s)⁻¹``, a QArray with a per-input-channel scale
  kept beside it (AWQ's unfolded form);
* :class:`LUTWeight` — per-row lookup tables (SqueezeLLM's non-uniform levels).

``LEAF_TYPES`` lists them (e.g. for an allowlist of classes to rebuild); ``weight_bits`` counts
any leaf, or a float array at its dtype width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from numerics.lowrank import LowRankCorrected
from numerics.mixed import RowMixed
from numerics.packing import array_bits
from numerics.packing import bits_per_weight as _bits_per_weight
from numerics.qarray import QArray


@runtime_checkable
class WeightLeaf(Protocol):
    """A quantized weight: see the module docstring."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def dequantize(self, dtype: Any = None) -> Array: ...

    def bits_per_weight(self) -> float: ...


# --------------------------------------------------------------------------- dense + sparse


@dataclasses.dataclass(frozen=True)
class DenseSparse:
    """A quantized dense part plus a few full-precision outliers.

    SpQR (arXiv 2306.03078 §4) and SqueezeLLM (arXiv 2306.07629 §4.2) keep a small fraction of
    weights (sensitivity- or magnitude-chosen outliers) in 16-bit precision in a sparse
    structure and quantize the rest. ``dequantize()`` returns the dense part with the outlier
    positions overwritten by their stored values. Each outlier counts ``bits_per_outlier``
    (value + index; SpQR uses 32: a 16-bit value and a 16-bit column index in CSR rows)."""

    dense: Any  # the quantized weight [out, in]: a QArray or any other weight leaf
    rows: Int[Array, " k"]  # outlier row indices (int32)
    cols: Int[Array, " k"]  # outlier column indices (int32)
    values: Float[Array, " k"]  # outlier values (stored as float16 by default)
    bits_per_outlier: int = dataclasses.field(default=32, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense.shape

    @property
    def dtype(self) -> Any:
        return self.dense.dtype

    @property
    def n_outliers(self) -> int:
        return int(self.rows.shape[0])

    def dequantize(self, dtype=None) -> Array:
        dt = jnp.dtype(dtype or self.dense.dtype)
        w = self.dense.dequantize(jnp.float32)
        w = w.at[self.rows, self.cols].set(self.values.astype(jnp.float32))
        return w.astype(dt)

    def storage_bits(self) -> dict[str, int]:
        """The dense part's parts plus ``outliers``: ``n_outliers · bits_per_outlier``."""
        return self.dense.storage_bits() | {"outliers": self.n_outliers * self.bits_per_outlier}

    def bits_per_weight(self) -> float:
        return _bits_per_weight(self)


jax.tree_util.register_dataclass(DenseSparse)


# --------------------------------------------------------------------------- AWQ's unfolded form


@dataclasses.dataclass(frozen=True)
class ScaledQArray:
    """``Ŵ = Q(W·diag(s))·diag(s)⁻¹``: the quantized, column-scaled weight and its input scale.

    AWQ (arXiv 2306.00978 §3.2). In a model ``s`` is folded into the preceding norm / linear
    and only ``q`` is stored; on its own a layer must keep ``s`` (d_in float16 values, counted
    with the scales in ``bits_per_weight``)."""

    q: QArray  # quantized W·diag(s) [out, in]
    s: Float[Array, " d_in"]  # per-input-channel scale (float16)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self) -> Any:
        return self.q.dtype

    def dequantize(self, dtype=None) -> Array:
        w = self.q.dequantize(jnp.float32) / self.s.astype(jnp.float32)[None, :]
        return w.astype(dtype or self.q.dtype)

    def storage_bits(self) -> dict[str, int]:
        """``q``'s parts, with ``s`` at its storage width added to the scales."""
        parts = self.q.storage_bits()
        return parts | {"scales": parts["scales"] + array_bits(self.s)}

    def bits_per_weight(self) -> float:
        return _bits_per_weight(self)


jax.tree_util.register_dataclass(ScaledQArray)


# --------------------------------------------------------------------------- per-row tables


@dataclasses.dataclass(frozen=True)
class LUTWeight:
    """Per-output-channel non-uniform codes: ``W[i, j] ≈ lut[i, codes[i, j]]``.

    SqueezeLLM (arXiv 2306.07629 §4.1; the repo's ``QuantLinearLUT`` ``qweight`` /
    ``lookup_table``): ``bits``-bit codes ``[m, n]`` and a per-row table ``[m, 2^bits]`` of fp16
    levels. A per-row codebook is not one ``Format`` (a format is static and shared by the whole
    array), hence its own leaf: ``bits + 16·k/n`` bits per weight."""

    codes: UInt8[Array, "m n"]  # indices into the row's table, < 2**bits
    lut: Float[Array, "m k"]  # the row's levels (float16, ascending)
    bits: int = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(default=jnp.float32, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def size(self) -> int:
        return math.prod(self.codes.shape)

    def dequantize(self, dtype=None) -> Float[Array, "m n"]:
        w = jnp.take_along_axis(self.lut.astype(jnp.float32), self.codes.astype(jnp.int32), axis=1)
        return w.astype(jnp.dtype(dtype or self.dtype))

    def storage_bits(self) -> dict[str, int]:
        """Codes at ``bits`` each plus the table entries at their storage width (fp16)."""
        return {"codes": self.size * self.bits, "tables": array_bits(self.lut)}

    def bits_per_weight(self) -> float:
        return _bits_per_weight(self)


jax.tree_util.register_dataclass(LUTWeight)


# --------------------------------------------------------------------------- the protocol's helpers

LEAF_TYPES: tuple[type, ...] = (
    QArray, DenseSparse, ScaledQArray, LUTWeight, RowMixed, LowRankCorrected
)  # fmt: skip


def is_weight_leaf(x: Any) -> bool:
    """True when ``x`` satisfies :class:`WeightLeaf` (shape, dtype, dequantize, bits_per_weight).
    Plain arrays are not weight leaves (they have no ``dequantize``)."""
    return isinstance(x, WeightLeaf)


def weight_bits(w: Any) -> float:
    """Bits per weight of a weight leaf (its ``bits_per_weight()``), or of a plain array (its
    dtype's width: 32 for float32, 16 for bfloat16)."""
    if is_weight_leaf(w):
        return float(w.bits_per_weight())
    if hasattr(w, "dequantize") or hasattr(w, "bits_per_weight"):
        raise TypeError(
            f"weight_bits: {type(w).__name__} is not a WeightLeaf (numerics.leaves: a leaf has "
            "shape, dtype, dequantize() and bits_per_weight())"
        )
    if not (hasattr(w, "dtype") and hasattr(w, "shape")):
        raise TypeError(f"weight_bits: expected a weight leaf or an array, got {type(w).__name__}")
    return float(jnp.dtype(w.dtype).itemsize * 8)
