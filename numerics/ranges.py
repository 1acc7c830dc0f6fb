"""Range selection: the per-block scale ``s`` (and zero point ``z``) of a quantizer.

All functions take the *blocked* view ``xb[n0, b0, n1, b1, …]`` (``numerics.granularity``)
and return per-block ``(s, z)`` of shape ``(n0, n1, …)`` (``z`` is None when symmetric).

* ``minmax``     — symmetric: ``s = max|x| / max_abs``; asymmetric (GPTQ's ``find_params``):
                   ``[min(x,0), max(x,0)]`` onto ``[qmin, qmax]``, ``z = qmin − round(lo/s)``.
* ``percentile`` — like minmax with the extremes replaced by percentiles (outlier clipping).
* ``absmean``    — ``s = mean|x| / max_abs``: the L2-optimal α of binarization and the γ of
                   BitNet b1.58 / TriLM ternary weights.
* ``mse``        — grid search of a clipping ratio ρ per block minimising Σ|Q(x) − x|^p
                   (GPTQ's ``find_params(mse=True)``: grid 100, max shrink 0.8, p = 2.4).
* ``pow2`` scales (MX, BFP, block minifloat): ``s = 2^(⌊log2 amax⌋ − e_max)`` where
  ``e_max = ⌊log2 max_abs⌋`` of the element format (OCP MX v1.0 §6.3), E8M0-clamped.

Zero blocks: a block whose range is 0 gets ``s = 0`` and every element is encoded as if it
were 0 (``safe_div``), so it dequantizes to exact zeros — also in formats without a zero
level (binary, bipolar) — and nothing is ever divided by zero. E8M0 has no zero, so power-of-
two scales use their minimum 2^-127 instead (formats without a zero level then dequantize an
all-zero block to ±2^-127·level). Scales are rounded to the storage dtype *before* codes are
computed, so codes are consistent with the stored scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics import granularity as G
from numerics.config import QuantConfig, np_scale_dtype
from numerics.formats import Format, IntFormat

E8M0_MIN, E8M0_MAX = -127, 127


def _reduce(fn, xb: Array) -> Array:
    return fn(xb, axis=G.block_axes(xb.ndim // 2))


def _percentile(xb: Array, q: float) -> Array:
    """Per-block percentile (flattens the within-block axes)."""
    nd = xb.ndim // 2
    perm = tuple(range(0, 2 * nd, 2)) + G.block_axes(nd)
    flat = jnp.transpose(xb, perm).reshape(tuple(xb.shape[i] for i in range(0, 2 * nd, 2)) + (-1,))
    return jnp.percentile(flat, q, axis=-1)


def _store(s: Array, cfg: QuantConfig) -> Array:
    """Keep zero scales (zero blocks), poison non-finite ones (→ NaN: the block had NaN/Inf),
    clip into the storage dtype's range and round to it (returned as float32)."""
    dt = np_scale_dtype(cfg.scale_dtype)
    tiny = float(jnp.finfo(dt).tiny)
    big = float(jnp.finfo(dt).max)
    s = jnp.where(s == 0, 0.0, jnp.where(jnp.isinf(s), jnp.nan, jnp.clip(s, tiny, big)))
    return s.astype(dt).astype(jnp.float32)


def _pow2(amax: Array, fmt: Format) -> Array:
    emax = jnp.floor(jnp.log2(jnp.float32(fmt.max_abs)))
    e = jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - emax
    e = jnp.clip(e, E8M0_MIN, E8M0_MAX)
    s = jnp.where(amax > 0, jnp.exp2(e), 2.0**E8M0_MIN)
    return jnp.where(jnp.isfinite(amax), s, jnp.nan).astype(jnp.float32)


def safe_div(x: Array, s: Array) -> Array:
    """``x / s``, and 0 where ``s == 0`` (a zero block: every element encodes as 0)."""
    ok = s != 0
    return jnp.where(ok, x / jnp.where(ok, s, 1.0), 0.0)


def symmetric_scale(amax: Array, cfg: QuantConfig) -> Array:
    if cfg.scale_kind == "pow2":
        return _pow2(amax, cfg.fmt)
    return _store(amax / cfg.fmt.max_abs, cfg)


def asymmetric_params(lo: Array, hi: Array, cfg: QuantConfig) -> tuple[Array, Array]:
    """GPTQ-style asymmetric grid: ``lo <= 0 <= hi`` mapped onto ``[qmin, qmax]``."""
    fmt = cfg.fmt
    assert isinstance(fmt, IntFormat)
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    s = _store((hi - lo) / (fmt.qmax - fmt.qmin), cfg)
    z = jnp.clip(fmt.qmin - jnp.round(safe_div(lo, s)), fmt.qmin, fmt.qmax)
    return s, z


def fake_quant_blocks(xb: Array, s: Array, z: Array | None, fmt: Format) -> Array:
    """``(decode(encode(x/s + z)) − z)·s`` on a blocked view, per-block ``s``/``z``."""
    sb = G.expand_stat(s)
    y = safe_div(xb, sb)
    if z is not None:
        zb = G.expand_stat(z)
        return (fmt.decode(fmt.encode(jnp.round(y) + zb)) - zb) * sb
    return fmt.decode(fmt.encode(y)) * sb


def choose_params(xb: Float[Array, ...], cfg: QuantConfig) -> tuple[Array, Array | None]:
    """Per-block ``(scale, zero)`` for the blocked view ``xb`` (float32)."""
    if cfg.range == "mse":
        return _mse_search(xb, cfg)
    if cfg.zero_point:
        if cfg.range == "percentile":
            lo, hi = _percentile(xb, 100.0 - cfg.percentile), _percentile(xb, cfg.percentile)
        else:
            lo, hi = _reduce(jnp.min, xb), _reduce(jnp.max, xb)
        return asymmetric_params(lo, hi, cfg)
    a = jnp.abs(xb)
    if cfg.range == "percentile":
        amax = _percentile(a, cfg.percentile)
    elif cfg.range == "absmean":
        amax = _reduce(jnp.mean, a) * cfg.fmt.max_abs  # so that s = mean|x|
    else:
        amax = _reduce(jnp.max, a)
    return symmetric_scale(amax, cfg), None


def _mse_search(xb: Array, cfg: QuantConfig) -> tuple[Array, Array | None]:
    fmt = cfg.fmt
    if cfg.zero_point:
        lo0, hi0 = _reduce(jnp.min, xb), _reduce(jnp.max, xb)
    else:
        amax0 = _reduce(jnp.max, jnp.abs(xb))
    n = int(cfg.mse_max_shrink * cfg.mse_grid)

    def params(p):
        if cfg.zero_point:
            return asymmetric_params(p * lo0, p * hi0, cfg)
        return symmetric_scale(p * amax0, cfg), None

    def err(p):
        s, z = params(p)
        q = fake_quant_blocks(xb, s, z, fmt)
        return _reduce(jnp.sum, jnp.abs(q - xb) ** cfg.mse_norm)

    def body(i, best):
        best_err, best_p = best
        p = 1.0 - i.astype(jnp.float32) / cfg.mse_grid
        e = err(p)
        better = e < best_err
        return jnp.where(better, e, best_err), jnp.where(better, p, best_p)

    per_block = tuple(xb.shape[0::2])
    init = (jnp.full(per_block, jnp.inf, jnp.float32), jnp.ones(per_block, jnp.float32))
    _, p = jax.lax.fori_loop(0, n, body, init)
    return params(p)
