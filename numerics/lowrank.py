"""Quantized dense weights plus a quantized low-rank correction (LoRC, ZeroQuant-V2).

ZeroQuant-V2 (arXiv 2303.08302 §5, "Low Rank Compensation") keeps, beside the quantized
weight ``Ŵ``, the best rank-``r`` approximation of its error ``E = W − Ŵ``:
``E ≈ Û V̂`` with ``Û = U_r Σ_r^{1/2}`` and ``V̂ = Σ_r^{1/2} V_rᵀ``
(``numerics.transforms.low_rank_compensation``), and stores the two factors themselves
quantized (the paper: 8-bit) so that the extra memory is a few percent of the 4-bit weight.

``LowRankCorrected`` is that weight leaf: ``dequantize() = Ŵ + Û V̂`` (every part dequantized
first, the product in float32). ``bits_per_weight()`` counts all three parts through
``numerics.packing.bits_per_weight`` (codes + scales + zero points of ``Ŵ``, ``Û`` and ``V̂``),
divided by the weight's element count — so ``numerics.sparse.weight_bits`` and the tables count
the factors' bits too. ``Û`` / ``V̂`` may also be plain float arrays (unquantized factors,
counted at their dtype's width).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics.config import QuantConfig
from numerics.packing import array_bits, bits_per_weight, storage_bits
from numerics.qarray import QArray
from numerics.quantize import quantize
from numerics.transforms import low_rank_compensation


def _dense(x: Any) -> Array:
    return x.dequantize(jnp.float32) if isinstance(x, QArray) else x.astype(jnp.float32)


def _bits(x: Any) -> int:
    """Total stored bits of one factor (a QArray's parts, or a float array at its width)."""
    return sum(storage_bits(x).values()) if isinstance(x, QArray) else array_bits(x)


@dataclasses.dataclass(frozen=True)
class LowRankCorrected:
    dense: QArray  # the quantized weight Ŵ [out, in]
    U: Any  # Û [out, r]: a QArray (quantized factor) or a float array
    V: Any  # V̂ [r, in]: a QArray or a float array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense.shape

    @property
    def dtype(self) -> Any:
        return self.dense.dtype

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def dequantize(self, dtype=None) -> Array:
        """``Ŵ + Û V̂`` in ``dtype`` (default: the dense part's)."""
        dt = jnp.dtype(dtype or self.dense.dtype)
        w = self.dense.dequantize(jnp.float32) + _dense(self.U) @ _dense(self.V)
        return w.astype(dt)

    def storage_bits(self) -> dict[str, int]:
        """Ŵ's parts (codes, scales, zeros) and the two factors' bits."""
        return self.dense.storage_bits() | {"low_rank": _bits(self.U) + _bits(self.V)}

    def bits_per_weight(self) -> float:
        """(bits of Ŵ + bits of Û + bits of V̂) / elements of W."""
        return bits_per_weight(self)


jax.tree_util.register_dataclass(LowRankCorrected)


def lorc(
    W: Float[Array, "out in"],
    W_hat: QArray,
    rank: int,
    factor_quant: QuantConfig | None,
) -> LowRankCorrected:
    """ZeroQuant-V2 LoRC: ``Ŵ`` plus the rank-``rank`` SVD factors of ``W − Ŵ``, each factor
    quantized with ``factor_quant`` (per row of ``Û`` and of ``V̂`` when the config is per
    channel along the last axis) or kept in ``W``'s dtype when ``factor_quant`` is None."""
    if not isinstance(W_hat, QArray):
        raise TypeError(f"lorc: W_hat must be a QArray, got {type(W_hat).__name__}")
    if tuple(W.shape) != W_hat.shape:
        raise ValueError(f"lorc: W {tuple(W.shape)} and W_hat {W_hat.shape} differ in shape")
    U, V = low_rank_compensation(W, W_hat.dequantize(W.dtype), rank)
    if factor_quant is not None:
        U, V = quantize(U, factor_quant), quantize(V, factor_quant)
    return LowRankCorrected(W_hat, U, V)
