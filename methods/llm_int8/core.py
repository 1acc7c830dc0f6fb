"""LLM.int8() (Dettmers et al., arXiv 2208.07339): the pure per-linear core.

**Vector-wise quantization** (sec. 3.1–3.2, eq. 4): each row of the hidden states ``X_f16``
(each token) and each output row of ``W`` (each output channel) gets its own absmax scale,
``c = 127 / max|·|``; the int8 product is accumulated in int32 and dequantized by the outer
product of the inverse scales (``kernels.w8a8`` computes exactly that).

**Mixed-precision decomposition** (sec. 3.2, eq. 7): with threshold α (6.0 in the paper) the set
``O = {i : some |X_{·,i}| ≥ α}`` of outlier feature dimensions is multiplied in 16-bit and the
rest in int8:

    C ≈ Σ_{h∈O} X_h W_h  +  S · Σ_{h∉O} X8_h W8_h

``O`` depends on the current activations: it is found at run time in every forward pass. Here
it is the input quantizer of each linear (``methods.actquant`` with ``outlier_threshold``: a mask
over features computed at run time, per sequence — float for the masked columns, per-token int8
over the others), so the fake-quantized model is ``(X_O + Q(X_rest)) @ Ŵᵀ``.

Details as in the reference (TimDettmers/bitsandbytes, ``MatMul8bitLt`` with ``threshold=6.0``,
read for this port): the weight is int8 with one absmax scale per output row over *all* its
columns, and the 16-bit outlier product uses those int8 weight columns dequantized — so the only
float part is the activations' outlier columns; the rows' activation scales are taken with the
outlier columns removed.

Differences, on purpose: the outlier columns are found per sequence (the rows of one
sequence), not over every row of the batched matmul call as bitsandbytes does — identical for a
batch of one, and it keeps perplexity independent of how windows are batched. Float here is the
model's float32, not fp16. ``threshold=None`` is the "Int8 absmax" vector-wise baseline without
the decomposition (Table 1's middle column).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, check_bits
from numerics.config import QuantConfig
from numerics.formats import IntFormat
from numerics.quantize import quantize

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_BITS = (4, 6, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMInt8Config:
    bits: int = 8  # weight bits, one absmax scale per output channel (vector-wise)
    act_bits: int = 8  # activation bits, one absmax scale per token
    threshold: float | None = 6.0  # α of the decomposition (sec. 3.2); None: absmax only

    def __post_init__(self) -> None:
        check_bits(self.bits, WEIGHT_BITS, "LLMInt8Config")
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits!r} not supported; choose one of {ACT_BITS}")
        t = self.threshold
        if t is not None:
            finite = isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            if not (finite and t > 0):
                raise ValueError(f"LLM.int8() threshold must be positive (or None), got {t!r}")

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(
            bits=self.act_bits, granularity="token", outlier_threshold=self.threshold
        )

    def weight_config(self) -> QuantConfig:
        return QuantConfig(
            format=IntFormat(bits=self.bits, signed=True), granularity="channel", axis=-1
        )


def outlier_fraction(act_absmax: Float[Array, " d"], threshold: float) -> Array:
    """Fraction of feature dimensions with ``max|X_j| ≥ α`` (over the inputs ``act_absmax`` was
    taken on: the decomposition's share of the features if all of them were one forward pass)."""
    return jnp.mean((jnp.asarray(act_absmax, jnp.float32) >= threshold).astype(jnp.float32))


def jit_inner(W, stats: LayerStats, cfg: LLMInt8Config, *, key=None):
    """The traced part of :func:`quantize_layer`: the vector-wise weight quantization."""
    del stats, key
    return quantize(W, cfg.weight_config())


EAGER_ONLY = "NaN weights are refused on concrete values first"


def quantize_layer(
    W: Float[Array, "o i"], stats: LayerStats, cfg: LLMInt8Config, *, key: jax.Array | None = None
) -> LayerResult:
    """Vector-wise int8 weights plus the input's run-time quantizer (with the decomposition).

    The quantization is data-free; ``stats.act_absmax``, when given, only feeds the report's
    outlier fraction (``info["outlier_frac"]``)."""
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        raise TypeError(f"LLM.int8(): W must be a float array, got {W.dtype}")
    if W.ndim != 2:
        raise ValueError(f"LLM.int8(): W must be 2-D [out, in], got shape {W.shape}")
    if bool(jnp.any(jnp.isnan(W))):
        raise ValueError("LLM.int8(): W has NaN entries")
    info = {}
    if cfg.threshold is not None and stats.act_absmax is not None:
        info["outlier_frac"] = outlier_fraction(stats.act_absmax, cfg.threshold)
    act = act_quantizer(cfg.act_config(), who="LLM.int8()")
    return LayerResult(weight=jit_inner(W, stats, cfg), info=info, act=act)
