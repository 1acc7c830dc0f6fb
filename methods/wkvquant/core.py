"""WKVQuant (arXiv 2402.12065): the KV-cache half — past-only quantization, two-dimensional
(static per-channel smoothing + dynamic per-token) quantization, and cross-block
reconstruction regularisation (CRR) of the smoothing parameters.

No official repository was found (the project's search tool: GitHub repositories, issues and
pages, 2026); this follows the paper as the public summaries of its text render it (found with
the search tool; the PDF itself could not be opened here, so equation numbers are not cited):

* **Past-only quantization (POQ)**: the current token's key / value enter its own attention in
  full precision; only the past cache is read quantized. ``harness.kvcache``: ``window=1,
  flush=1`` for keys and values (``window=0`` quantizes the current token too — the ablation).
* **Two-dimensional quantization**: a static per-channel shift ``δ`` and scale ``s`` from
  calibration, then dynamic per-token quantization of the smoothed tensor:

      X̃ = (X − δ) ⊘ s,    X̂ = Quant_token(X̃) ⊙ s + δ

  (``δ``, ``s`` per channel of each layer's keys and values; the per-token quantizer is min-max
  asymmetric onto ``0 … 2^b − 1``).
* **CRR**: the 2D parameters of block ``i`` are fitted by minimising the mean absolute error of
  the output ``k`` blocks later (``k = 5`` in the paper) rather than of block ``i`` alone:

      min_{δ, s}  mean | F_{i+k−1}∘…∘F_{i+1}(F̂_i(x; δ, s)) − F_{i+k−1}∘…∘F_i(x) |

  with ``F̂_i`` block ``i`` under its quantized (past-only) cache; gradients pass the rounding
  straight through (and through the per-token min / max, as OmniQuant's learnable
  transformations do).

Choices where the summaries say nothing (ours, unverified against the paper):

* Initialisation: ``δ_j = (max_j + min_j)/2`` and ``s_j = r_j^α`` with the channel half-range
  ``r_j = (max_j − min_j)/2`` and ``α = 0.5`` (OS+ / SmoothQuant-style; a common factor of all
  ``s_j`` does not change a per-token quantizer, so only their ratios matter).
* Per-token groups are one head's ``head_dim`` channels (16-bit scale and zero each).
* Keys are smoothed after RoPE (the cache stores post-RoPE keys; a per-channel shift does not
  commute with the rotation).

Differences, on purpose (sizes that run on this project's 2-core CPU): see
``WKVQuantConfig``'s CRR fields — a few Adam steps per block on a few calibration tokens;
block inputs are the full-precision stream (earlier blocks' quantized caches are not
propagated), and the ``k − 1`` following blocks run with a full-precision cache. The paper's
weight quantization (W4 of W4KV4) is not part of this method: weights stay float.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from harness import kvcache
from methods.base import check_bits
from numerics.config import QuantConfig
from numerics.quantize import quantize

BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WKVQuantConfig:
    bits: int = 4  # KV code bits (the paper's W4KV4; weights stay float here)
    past_only: bool = True  # POQ: the current token stays full precision (window=1)
    alpha: float = 0.5  # s_j = r_j^α at initialisation (ours)
    crr: bool = True  # fit δ, s with cross-block reconstruction (False: the initialisation)
    crr_blocks: int = 5  # k: the loss is read k blocks downstream (the paper's k = 5)
    steps: int = 10  # Adam steps per block (run size, not the paper's)
    lr: float = 5e-3  # Adam learning rate (ours)
    samples: int = 2  # calibration segments the CRR loss reads (run size)
    tokens: int = 128  # their first tokens (run size)

    def __post_init__(self):
        check_bits(self.bits, BITS, "WKVQuant")
        for f in ("crr_blocks", "steps", "samples", "tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"WKVQuant: {f} must be a positive int, got {v!r}")
        for f in ("past_only", "crr"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"WKVQuant: {f} must be a bool, got {getattr(self, f)!r}")
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"WKVQuant: alpha must be in [0, 1], got {self.alpha!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"WKVQuant: lr must be a positive float, got {self.lr!r}")


def init_smoothing(
    lo: Float[Array, " c"], hi: Float[Array, " c"], alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """``δ = (max + min)/2``, ``s = r^α`` (``r`` the half-range) from per-channel calibration
    minima / maxima; a dead channel (``r = 0``) gets the smallest live ``s``."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if lo.size == 0 or lo.shape != hi.shape:
        raise ValueError(f"WKVQuant: empty or mismatched calibration ranges {lo.shape}, {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("WKVQuant: non-finite (NaN / inf) calibration keys or values")
    r = (hi - lo) / 2
    if not np.any(r > 0):
        raise ValueError("WKVQuant: dead calibration: every channel has a zero range")
    s = np.where(r > 0, r, r[r > 0].min()) ** alpha
    return ((hi + lo) / 2).astype(np.float32), s.astype(np.float32)


def _token_cfg(bits: int, d: int) -> QuantConfig:
    return QuantConfig(format=f"uint{bits}", granularity="group", axis=3, group_size=d,
                       zero_point=True, scale_dtype="float16")  # fmt: skip


def fake_2d_ste(x: Float[Array, "b t h d"], delta: Array, s: Array, bits: int) -> Array:
    """``Quant_token((x − δ)/s)·s + δ`` with gradients for CRR: rounding passed straight
    through, the per-token min / max (hence step and zero) differentiable."""
    delta, s = (jnp.reshape(a, (1,) * (x.ndim - 2) + a.shape[-2:]) for a in (delta, s))
    y = (x - delta) / s
    lo, hi = jnp.min(y, axis=-1, keepdims=True), jnp.max(y, axis=-1, keepdims=True)
    step = jnp.maximum(hi - lo, 1e-8) / (2**bits - 1)
    rnd = lambda a: a + jax.lax.stop_gradient(jnp.round(a) - a)
    z = rnd(-lo / step)
    q = jnp.clip(rnd(y / step) + z, 0, 2**bits - 1)
    return (q - z) * step * s + delta


def _as_table(a: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(a, np.float32).ravel())


@dataclasses.dataclass(frozen=True, kw_only=True)
class TwoDCodec(kvcache.KVCodec):
    """Per-token ``[B, 1, kv, hd]``: smoothed by the layer's static ``δ``, ``s`` (tuples over
    layers of ``kv·hd`` floats, hashable), then one min-max scale / zero per token and head."""

    bits: int = 4
    delta: tuple[tuple[float, ...], ...] = ()
    scale: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        check_bits(self.bits, BITS, "WKVQuant")
        if self.chunk != 1:
            raise ValueError("WKVQuant quantizes per token: chunk must be 1")
        if len(self.delta) != len(self.scale):
            raise ValueError("WKVQuant: delta and scale must cover the same layers")

    @classmethod
    def from_arrays(cls, deltas: Sequence[np.ndarray], scales: Sequence[np.ndarray], **kw):
        return cls(delta=tuple(map(_as_table, deltas)), scale=tuple(map(_as_table, scales)), **kw)

    def _params(self, layer: int, H: int, D: int) -> tuple[Array, Array]:
        if not 0 <= layer < len(self.delta):
            raise ValueError(f"WKVQuant: no smoothing parameters for layer {layer}")
        d = jnp.asarray(self.delta[layer], jnp.float32)
        s = jnp.asarray(self.scale[layer], jnp.float32)
        if d.size != H * D:
            raise ValueError(f"WKVQuant: layer {layer} has {d.size} channels, the cache {H * D}")
        return d.reshape(1, 1, H, D), s.reshape(1, 1, H, D)

    def encode(self, layer, x):
        d, s = self._params(layer, x.shape[2], x.shape[3])
        return quantize((x - d) / s, _token_cfg(self.bits, x.shape[3]))

    def decode(self, layer, code):
        x = code.dequantize()
        d, s = self._params(layer, x.shape[2], x.shape[3])
        return x * s + d

    def element_bits(self, head_dim):
        return self.bits + 2 * 16 / head_dim  # δ, s: per channel of a layer, not per element


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TrainCodec(kvcache.KVCodec):
    """The same numerics on traced ``δ``, ``s`` ``[kv, hd]`` of one block, for the CRR loss
    (never stored, never hashed: ``eq=False``)."""

    bits: int = 4
    delta: Array | None = None
    scale: Array | None = None

    def fake(self, layer, x):
        return fake_2d_ste(x.astype(jnp.float32), self.delta, self.scale, self.bits).astype(x.dtype)

    def element_bits(self, head_dim):
        return self.bits + 2 * 16 / head_dim
