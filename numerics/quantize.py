"""``quantize(x, how) -> QArray`` and ``fake_quant`` — the front door of the numerics core.

    qa = quantize(W, QuantConfig(format="int4", granularity="group", group_size=128))
    W_hat = qa.dequantize()

Steps: validate → block view (``numerics.granularity``) → per-block scale / zero point
(``numerics.ranges``) → round onto the format's grid (nearest, or stochastic with a key) →
``QArray``. Pure and jit-able (``cfg`` is static).

Bad input: integer or empty arrays raise ``TypeError``/``ValueError``. NaN/Inf raise
``ValueError`` when ``x`` is concrete; under ``jit`` (values unknown at trace time) every block
that holds one gets a NaN scale, on every shape and range, so that whole block dequantizes to
NaN instead of to garbage and every other block is unchanged. (A max-reduction alone cannot be
trusted to carry a NaN: XLA's vectorized CPU max drops it on shapes beyond a few rows; the
range statistics therefore read NaN as +Inf, see ``_quantize``.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from numerics import granularity as G
from numerics import ranges
from numerics.config import QuantConfig, np_scale_dtype
from numerics.qarray import QArray


def check_input(x, who: str = "quantize") -> None:
    """Raise on non-float, empty, or (when concrete) non-finite input."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{who}: expected a floating-point array, got {getattr(x, 'dtype', type(x))}"
        )
    if x.size == 0:
        raise ValueError(f"{who}: empty array of shape {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(jnp.asarray(x, jnp.float32)))
        if bad.any():
            idx = tuple(int(i[0]) for i in np.nonzero(bad))
            raise ValueError(
                f"{who}: input has {int(bad.sum())} NaN/Inf value(s), first at index {idx}"
            )


def _stochastic(fmt, y: Array, key: Array) -> Array:
    lo, hi = fmt.bracket(y)
    width = hi - lo
    p_up = jnp.where(width > 0, (y - lo) / jnp.where(width > 0, width, 1.0), 0.0)
    u = jax.random.uniform(key, y.shape, jnp.float32)
    return jnp.where(u < p_up, hi, lo)


def quantize(x: Float[Array, "*shape"], how: QuantConfig, *, key: Array | None = None) -> QArray:
    """Quantize ``x`` as ``how`` says. ``key`` is required for stochastic rounding."""
    check_input(x)
    if how.rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: quantize(x, cfg, key=key)")
    bs = G.block_shape(tuple(x.shape), how)  # validates divisibility eagerly
    if not G.is_ragged(tuple(x.shape), bs):
        return _quantize(x, how, bs, key)
    # Ragged groups: the whole blocks and the short last block, each with its own statistics.
    ax, whole, tail = G.split_ragged(tuple(x.shape), bs)
    tail_bs = tuple(tail if i == ax else b for i, b in enumerate(bs))
    k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
    parts = [_quantize(jax.lax.slice_in_dim(x, whole, x.shape[ax], axis=ax), how, tail_bs, k2)]
    if whole:
        parts.insert(0, _quantize(jax.lax.slice_in_dim(x, 0, whole, axis=ax), how, bs, k1))
    cat = lambda f: jnp.concatenate([f(p) for p in parts], axis=ax)
    return dataclasses.replace(
        parts[0],
        codes=cat(lambda p: p.codes),
        scale=cat(lambda p: p.scale),
        zero=None if parts[0].zero is None else cat(lambda p: p.zero),
        block_shape=bs,
        shape=tuple(x.shape),
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(x: Array, how: QuantConfig, bs: tuple[int, ...], key: Array | None) -> QArray:
    fmt = how.fmt
    xb = G.to_blocks(x.astype(jnp.float32), bs)
    # Every block holding NaN/Inf must get a NaN scale. A reduction cannot be trusted to carry
    # a NaN: XLA's CPU max-reduction drops it once it vectorizes (64 x 256 does, 2 x 16 does
    # not), so s came out finite and the block decoded to garbage. An Inf survives max, min
    # and mean, and an infinite scale is stored as NaN (``ranges._store`` / ``_pow2``): so the
    # min-max and absmean statistics see NaN as +Inf (fused into their one reduction pass;
    # finite blocks are untouched bit for bit). Percentile and MSE ranges sort or search, so
    # they get an explicit per-block finiteness test instead.
    if how.range in ("percentile", "mse"):
        s, z = ranges.choose_params(xb, how)
        finite = jnp.all(jnp.isfinite(xb), axis=G.block_axes(x.ndim))
        s = jnp.where(finite, s, jnp.nan)
    else:
        s, z = ranges.choose_params(jnp.where(jnp.isnan(xb), jnp.inf, xb), how)

    y = ranges.safe_div(xb, G.expand_stat(s))
    if how.rounding == "stochastic":
        if z is not None:
            y = y + G.expand_stat(z)  # z is an integer: the grid stays aligned
        y = _stochastic(fmt, y, key)
    elif z is not None:
        y = jnp.round(y) + G.expand_stat(z)
    codes = G.from_blocks(fmt.encode(y), tuple(x.shape))

    if how.scale_kind == "pow2":
        s_stored = s.astype(jnp.float8_e8m0fnu)
    else:
        s_stored = s.astype(np_scale_dtype(how.scale_dtype))
    return QArray(
        codes=codes,
        scale=s_stored,
        zero=z,
        format=fmt,
        block_shape=bs,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def fake_quant(x: Float[Array, "*shape"], how: QuantConfig, *, key: Array | None = None) -> Array:
    """``quantize(x).dequantize()`` in ``x``'s dtype (no gradient rule: ``numerics.rounding``)."""
    return quantize(x, how, key=key).dequantize(x.dtype)


def quant_error(x: Array, how: QuantConfig) -> dict[str, float]:
    """MSE, relative Frobenius error and SQNR (dB) of ``fake_quant(x)`` (eager helper)."""
    x32 = jnp.asarray(x, jnp.float32)
    e = fake_quant(x32, how) - x32
    mse = float(jnp.mean(e**2))
    sig = float(jnp.mean(x32**2))
    rel = float(jnp.sqrt(jnp.sum(e**2) / jnp.maximum(jnp.sum(x32**2), 1e-30)))
    sqnr = float(10 * np.log10(sig / mse)) if mse > 0 else float("inf")
    return {"mse": mse, "rel_err": rel, "sqnr_db": sqnr}
