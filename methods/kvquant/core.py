# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""KVQuant (arXiv 2401.18079): per-channel pre-RoPE keys, per-token values, per-layer
sensitivity-weighted non-uniform levels (nuqX), per-vector dense-and-sparse outliers and the
attention-sink token in full precision.

Checked against the official repository (github.com/SqueezeAILab/KVQuant):
``quant/kvquant/simquant_module_quantizer.py`` (``SimQuant.quantize``: the offline
calibration; ``quant_fn_nuq_recon`` / ``quant_fn_zp``: the simulated quantizers;
``get_outliers`` / ``get_outliers_dynamic``: the outlier masks), ``quant/llama_simquant.py``
(keys = ``k_proj`` outputs per channel with offline thresholds, values = ``v_proj`` outputs
per token computed online) and ``gradients/run-fisher.py`` (the Fisher information: squared
gradients of the loss w.r.t. the ``k_proj`` / ``v_proj`` outputs, one per calibration element).

Keys (§3.1, §3.2, §3.6). ``K [tokens, C]`` with ``C = kv_heads · head_dim`` channels, taken
before RoPE (``pre_rope``; RoPE is applied after dequantization by ``harness.kvcache``). For
each channel ``c`` the calibration gives outlier thresholds ``u_c`` / ``l_c``: the
``1 − f/2`` and ``f/2`` percentiles over the calibration tokens (``f`` = ``outliers``, 1 %),
or max / min without outliers. Then ``z_c = (u_c + l_c)/2``, ``s_c = (u_c − l_c)/2`` and

    K̃ = (K − z)/s ∈ [−1, 1] for the inliers,  K̂ = s·Q(K̃) + z,

with every element beyond ``[l_c, u_c]`` an outlier kept in fp16 (§3.4). ``u``, ``l`` are
stored in fp16 and shared by all tokens (offline, never recomputed).

Values (§3.4, §3.6). Per token ``v [C]`` online: outliers are the elements ``≥`` the
``1 − f/2`` quantile or ``≤`` the ``f/2`` quantile of the token (linear interpolation, as
``torch.quantile``; 2 of SmolLM2's 192, 42 of LLaMA-7B's 4096); the outliers are replaced by
the token's (lower) median and the min / max of the result give ``z``, ``s`` as above, stored
fp16. Scales are per token over all heads at once, as the reference's ``v_proj`` output.

nuqX (§3.3, eq. 1, App. E eq. 7). One level set ``Q`` of ``2^b`` signposts per layer and side,
from weighted k-means on the normalized inliers of the calibration set:

    Q* = argmin_Q Σ_i F_ii s_i² (Ã_i − Q(Ã_i))²,

``F_ii`` the squared gradient of the loss w.r.t. element ``i`` (App. D). Without ``nuq`` the
levels are uniform, ``−1 + 2j/(2^b − 1)``: exactly the reference's ``quant_fn_zp``
(``x̂ = (round(x·q − o) + o)/q`` with an unrounded fp zero point, ``q = (2^b−1)/(u − l)``).

Q-Norm (reference ``SimQuant.quantize(norm=True)``, used for the repository's 2-bit
checkpoints, ``quant/README.md``): after k-means the dequantized levels are shifted and
scaled so that the quantized inliers of the calibration set have the mean and standard
deviation of the unquantized ones: ``Q' = Q·σ₁/σ₂ + m₁ − m₂·σ₁/σ₂``. Codes still index the
nearest of the k-means levels; only the values they decode to change.

Bits (App. M). Codes ``b`` bits; each outlier a 16-bit value plus a 16-bit index; one 32-bit
sparse pointer per token (CSC for keys, CSR for values); values also one fp16 zero point and
scale per token. The per-channel key thresholds and the per-layer levels are constants of
the layer (not per token) and count nothing per element.

Details as in the reference: the quantizers read fp16 activations (the reference's model runs
in half precision; here keys and values are rounded to fp16 before they are encoded, which
also makes the codes far less sensitive to float32 rounding noise, e.g. under sharding);
thresholds from percentiles with linear interpolation; outliers strictly beyond the key
thresholds, ``≥`` / ``≤`` the per-token value quantiles; outliers kept exactly (fp16); one
codebook per layer and side; the sink token excluded from the calibration (§3.5: from the
levels and from the key scaling factors).

Differences, on purpose: (1) the k-means weights are ``F·s²`` (eq. 7, the paper's version;
``SimQuant.quantize`` passes ``F`` alone) — ``scale_weighted=False`` gives the reference's;
(2) the values' calibration normalizes each token exactly as the online codec does (median
replacement, min / max of the inliers) where ``SimQuant.quantize`` uses the per-token
percentiles themselves (the two differ by a fraction of the gap between the two largest
elements); (3) the sink rows are excluded from the key percentiles too (the reference's
non-capped path only drops them from the k-means); (4) k-means is ``numerics.codebooks``'
weighted Lloyd with k-means++ init and 50 iterations (the reference: sklearn ``KMeans``,
``max_iter=50``, ``n_init="auto"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from harness import kvcache
from methods.base import check_bits
from numerics import codebooks

BITS = (2, 3, 4, 5)  # the reference's QuantLinearSim supports 2 … 5 bits; the paper runs 2 … 4
OUTLIER_BITS = 16 + 16  # an fp16 value and a 16-bit index (App. M)
POINTER_BITS = 32  # one sparse pointer per token (App. M: 32-bit per-token indices)
SCALE_BITS = 16  # fp16 zero points and scales


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuantConfig:
    bits: int = 3  # b: code bits of keys and values (the headline nuq3-1%)
    pre_rope: bool = True  # quantize keys before RoPE (§3.2); False: post-RoPE keys
    nuq: bool = True  # per-layer k-means levels (§3.3); False: uniform levels
    fisher: bool = True  # weight the k-means by the Fisher information (eq. 1)
    scale_weighted: bool = True  # … times s² (App. E eq. 7); False: F alone (the repo)
    outliers: float = 0.01  # f: fraction kept in fp16 per vector (§3.4); 0: dense only
    sink: int = 1  # first tokens kept in fp16 (§3.5, attention-sink aware)
    qnorm: bool | None = None  # Q-Norm; None: on at 2 bits only (the repo's 2-bit checkpoints)
    kmeans_iters: int = 50  # Lloyd iterations (the reference's sklearn max_iter)
    seed: int = 0  # k-means++ initialization

    def __post_init__(self):
        check_bits(self.bits, BITS, "KVQuant")
        for f in ("pre_rope", "nuq", "fisher", "scale_weighted"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"KVQuant: {f} must be a bool, got {getattr(self, f)!r}")
        if self.qnorm is not None and not isinstance(self.qnorm, bool):
            raise ValueError(f"KVQuant: qnorm must be a bool or None, got {self.qnorm!r}")
        o = self.outliers
        if isinstance(o, bool) or not isinstance(o, int | float) or not 0 <= o < 0.5:
            raise ValueError(f"KVQuant: outliers must be a fraction in [0, 0.5), got {o!r}")
        for f, lo in (("sink", 0), ("kmeans_iters", 1), ("seed", 0)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"KVQuant: {f} must be an int >= {lo}, got {v!r}")

    @property
    def use_qnorm(self) -> bool:
        return self.bits == 2 if self.qnorm is None else self.qnorm


# ------------------------------------------------------------------------------- primitives


def _nearest(x: Array, levels: Array) -> Array:
    """Index of the nearest level (ties → the lower) for sorted ``levels [k]``."""
    mid = (levels[1:] + levels[:-1]) * 0.5
    return jnp.searchsorted(mid, x, side="left").astype(jnp.uint8)


def _fp16(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32).astype(jnp.float16).astype(jnp.float32)


def token_ranges(
    v: Float[Array, "*n C"], outliers: float
) -> tuple[Array, Float[Array, "*n 1"], Float[Array, "*n 1"]]:
    """Per-token dense-and-sparse split of ``v`` (reference ``get_outliers_dynamic`` and the
    dynamic branch of ``quant_fn_nuq_recon``): the outlier mask, and the fp16 zero point ``z``
    and half-range ``s`` of the inliers (outliers replaced by the token's lower median)."""
    C = v.shape[-1]
    if outliers > 0:
        hi = jnp.quantile(v, 1 - outliers / 2, axis=-1, keepdims=True)
        lo = jnp.quantile(v, outliers / 2, axis=-1, keepdims=True)
        mask = (v >= hi) | (v <= lo)
        med = jnp.sort(v, axis=-1)[..., (C - 1) // 2 : (C - 1) // 2 + 1]
        v = jnp.where(mask, med, v)
    else:
        mask = jnp.zeros(v.shape, bool)
    mx, mn = jnp.max(v, axis=-1, keepdims=True), jnp.min(v, axis=-1, keepdims=True)
    z, s = _fp16((mx + mn) / 2), _fp16((mx - mn) / 2)
    return mask, z, jnp.where(s > 0, s, jnp.float32(1.0))


def token_outliers(C: int, outliers: float) -> int:
    """Outliers per token of ``C`` distinct values: those at or beyond the two quantiles."""
    if outliers <= 0:
        return 0
    hi = (1 - outliers / 2) * (C - 1)
    lo = outliers / 2 * (C - 1)
    return int(C - np.ceil(hi - 1e-9)) + int(np.floor(lo + 1e-9)) + 1


# ------------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class Levels:
    """One layer-side's datatype: ``levels`` (sorted, what codes round to) and ``recon``
    (what they decode to: the levels, or after Q-Norm the normalized levels)."""

    levels: tuple[float, ...]
    recon: tuple[float, ...]


def fit_levels(
    x: Float[Array, " n"], w: Float[Array, " n"] | None, cfg: KVQuantConfig, layer: int
) -> Levels:
    """nuqX levels of normalized inliers ``x`` (weights ``w``: ``F·s²``, or None), or the
    uniform grid; then Q-Norm when ``cfg.use_qnorm``."""
    k = 2**cfg.bits
    x = jnp.asarray(x, jnp.float32)
    if x.size < k:
        raise ValueError(f"KVQuant: layer {layer} has {x.size} calibration inliers, need >= {k}")
    if cfg.nuq:
        key = jax.random.fold_in(jax.random.key(cfg.seed), layer)
        res = codebooks.kmeans(x, k, weights=w, iters=cfg.kmeans_iters, key=key)
        levels = jnp.sort(res.centroids)
    else:
        levels = jnp.linspace(-1.0, 1.0, k, dtype=jnp.float32)
    recon = levels
    if cfg.use_qnorm:
        q = levels[_nearest(x, levels).astype(jnp.int32)]
        m1, s1, m2, s2 = jnp.mean(x), jnp.std(x), jnp.mean(q), jnp.std(q)
        scale = jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)
        recon = levels * scale + (m1 - m2 * scale)
    as_tuple = lambda a: tuple(float(v) for v in np.asarray(a, np.float32))
    return Levels(as_tuple(levels), as_tuple(recon))


def _checked(A: Array, F: Array | None, side: str, layer: int) -> tuple[Array, Array | None]:
    A = _fp16(A)  # the codecs quantize fp16 activations (see the module docstring)
    if A.ndim != 2 or A.shape[0] < 2:
        raise ValueError(f"KVQuant: {side} calibration of layer {layer} must be [tokens >= 2, "
                         f"channels], got {A.shape}")  # fmt: skip
    if not bool(jnp.all(jnp.isfinite(A))):
        raise ValueError(f"KVQuant: {side} calibration of layer {layer} has NaN or Inf")
    if float(jnp.max(A) - jnp.min(A)) == 0:
        raise ValueError(f"KVQuant: {side} calibration of layer {layer} is constant (dead)")
    if F is not None:
        F = jnp.asarray(F, jnp.float32)
        if F.shape != A.shape or not bool(jnp.all(jnp.isfinite(F) & (F >= 0))):
            raise ValueError(f"KVQuant: {side} Fisher of layer {layer} must be finite, >= 0 "
                             f"and of shape {A.shape}, got {F.shape}")  # fmt: skip
        if float(jnp.sum(F)) <= 0:
            raise ValueError(f"KVQuant: {side} Fisher of layer {layer} is all zero")
    return A, F


def _weights(F: Array | None, s: Array, cfg: KVQuantConfig) -> Array | None:
    if not cfg.fisher or F is None:
        return None
    return F * jnp.square(s) if cfg.scale_weighted else F


def calibrate_keys(
    K: Float[Array, "n C"], F: Float[Array, "n C"] | None, cfg: KVQuantConfig, layer: int
) -> tuple[tuple[float, ...], tuple[float, ...], Levels, float]:
    """Per-channel fp16 thresholds ``(u, l)``, the layer's levels and the calibration's
    outlier fraction, from calibration keys ``K`` and their Fisher information ``F``."""
    K, F = _checked(K, F, "key", layer)
    if cfg.outliers > 0:
        u = jnp.quantile(K, 1 - cfg.outliers / 2, axis=0)
        lo = jnp.quantile(K, cfg.outliers / 2, axis=0)
    else:
        u, lo = jnp.max(K, axis=0), jnp.min(K, axis=0)
    u, lo = _fp16(u), _fp16(lo)
    z, s = (u + lo) / 2, _positive((u - lo) / 2)
    Kn = (K - z[None, :]) / s[None, :]
    inl = (K <= u[None, :]) & (K >= lo[None, :])
    w = _weights(F, jnp.broadcast_to(s[None, :], K.shape), cfg)
    levels = fit_levels(Kn[inl], None if w is None else w[inl], cfg, layer)
    as_tuple = lambda a: tuple(float(v) for v in np.asarray(a))
    return as_tuple(u), as_tuple(lo), levels, float(1.0 - jnp.mean(inl))


def _positive(s: Array) -> Array:
    """A zero half-range (a constant channel) → a tiny one, so the channel decodes to z."""
    return jnp.where(s > 0, s, jnp.float32(1e-6))


def calibrate_values(
    V: Float[Array, "n C"], F: Float[Array, "n C"] | None, cfg: KVQuantConfig, layer: int
) -> Levels:
    """The layer's value levels: each calibration token normalized as :class:`TokenValues`
    normalizes it online, then weighted k-means on the inliers."""
    V, F = _checked(V, F, "value", layer)
    mask, z, s = token_ranges(V, cfg.outliers)
    Vn = (V - z) / s
    w = _weights(F, jnp.broadcast_to(s, V.shape), cfg)
    return fit_levels(Vn[~mask], None if w is None else w[~mask], cfg, layer)


# ------------------------------------------------------------------------------- the codecs


def _flat(x: Array) -> Array:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def _table(levels: tuple[tuple[float, ...], ...], layer: int) -> Array:
    return jnp.asarray(levels[layer], jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelKeys(kvcache.KVCodec):
    """Keys ``[B, 1, kv, hd]`` per channel with offline fp16 thresholds ``upper[layer]`` /
    ``lower[layer]`` (``kv·hd`` each), the layer's levels, and fp16 outliers beyond them."""

    bits: int = 3
    kv_heads: int = 1  # the channels are kv_heads · head_dim
    upper: tuple[tuple[float, ...], ...] = ()
    lower: tuple[tuple[float, ...], ...] = ()
    levels: tuple[tuple[float, ...], ...] = ()
    recon: tuple[tuple[float, ...], ...] = ()
    sparse: bool = True  # dense-and-sparse: keep the elements beyond the thresholds
    outlier_frac: float = 0.0  # outliers per element on the calibration set (for the bits)

    def _zs(self, layer):
        u, lo = jnp.asarray(self.upper[layer]), jnp.asarray(self.lower[layer])
        return u, lo, (u + lo) / 2, _positive((u - lo) / 2)

    def encode(self, layer: int, x: Array) -> Any:
        c = _fp16(_flat(x))
        u, lo, z, s = (a.reshape((1,) * (c.ndim - 1) + a.shape) for a in self._zs(layer))
        codes = _nearest((c - z) / s, _table(self.levels, layer))
        out = {"codes": codes}
        if self.sparse:
            mask = (c > u) | (c < lo)
            out |= {"mask": mask, "values": jnp.where(mask, c, 0.0).astype(jnp.float16)}
        return out

    def decode(self, layer: int, code: Any) -> Array:
        codes = code["codes"]
        _, _, z, s = (a.reshape((1,) * (codes.ndim - 1) + a.shape) for a in self._zs(layer))
        c = _table(self.recon, layer)[codes.astype(jnp.int32)] * s + z
        if self.sparse:
            c = jnp.where(code["mask"], code["values"].astype(jnp.float32), c)
        return c.reshape(*codes.shape[:-1], self.kv_heads, -1)

    def element_bits(self, head_dim: int) -> float:
        C = self.kv_heads * head_dim
        if not self.sparse:
            return float(self.bits)
        return self.bits + self.outlier_frac * OUTLIER_BITS + POINTER_BITS / C


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenValues(kvcache.KVCodec):
    """Values ``[B, 1, kv, hd]`` per token (over all heads): online outliers, fp16 zero point
    and half-range of the inliers, the layer's levels."""

    bits: int = 3
    kv_heads: int = 1  # a token's scales cover all kv_heads · head_dim elements
    levels: tuple[tuple[float, ...], ...] = ()
    recon: tuple[tuple[float, ...], ...] = ()
    outliers: float = 0.01  # f: the per-token quantiles at f/2 and 1 − f/2

    def encode(self, layer: int, x: Array) -> Any:
        v = _fp16(_flat(x))
        mask, z, s = token_ranges(v, self.outliers)
        codes = _nearest((v - z) / s, _table(self.levels, layer))
        out = {"codes": codes, "z": z.astype(jnp.float16), "s": s.astype(jnp.float16)}
        if self.outliers > 0:
            out |= {"mask": mask, "values": jnp.where(mask, v, 0.0).astype(jnp.float16)}
        return out

    def decode(self, layer: int, code: Any) -> Array:
        codes = code["codes"]
        z, s = code["z"].astype(jnp.float32), code["s"].astype(jnp.float32)
        v = _table(self.recon, layer)[codes.astype(jnp.int32)] * s + z
        if self.outliers > 0:
            v = jnp.where(code["mask"], code["values"].astype(jnp.float32), v)
        return v.reshape(*codes.shape[:-1], self.kv_heads, -1)

    def element_bits(self, head_dim: int) -> float:
        C = self.kv_heads * head_dim
        n = token_outliers(C, self.outliers)
        sparse = (n * OUTLIER_BITS + POINTER_BITS) / C if n else 0.0
        return self.bits + 2 * SCALE_BITS / C + sparse
