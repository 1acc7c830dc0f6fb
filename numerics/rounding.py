"""Rounding rules with gradients, for quantization-aware training.

* ``ste_fake_quant`` — straight-through estimator (Bengio et al. 2013): the forward pass is
  ``fake_quant(x)``; the backward pass is the identity inside the clipping range and zero
  outside it (the scale is treated as a constant, as in QAT practice).
* ``lsq_fake_quant`` — LSQ, learned step size (Esser et al., arXiv 1902.08153, eqs. 1–3):
  ``v̂ = round(clip(v/s, −Q_N, Q_P))·s`` with
  ``∂v̂/∂s = −v/s + round(v/s)`` inside, ``−Q_N`` below, ``Q_P`` above; ``∂v̂/∂v`` = 1 inside,
  0 outside; the step's gradient is multiplied by ``g = 1/√(N·Q_P)`` (N = elements per step).
* Nearest (ties to even) and stochastic rounding live in ``numerics.quantize``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics import granularity as G
from numerics import ranges
from numerics.config import QuantConfig
from numerics.quantize import quantize


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ste_fake_quant(x: Float[Array, "*s"], how: QuantConfig) -> Float[Array, "*s"]:
    """Fake quantization with the clipped straight-through gradient."""
    return quantize(x, how).dequantize(x.dtype)


def _ste_fwd(x, how):
    qa = quantize(x, how)
    # inside the representable range of each block ⇔ |grid value| not saturated
    xb = G.to_blocks(x.astype(jnp.float32), qa.block_shape)
    s = G.expand_stat(qa.scale_array())
    y = ranges.safe_div(xb, s)
    if qa.zero is not None:
        y = y + G.expand_stat(qa.zero)
    fmt = how.fmt
    lo, hi = float(fmt.finite_values()[0]), float(fmt.finite_values()[-1])
    if how.zero_point:
        lo, hi = float(fmt.qmin), float(fmt.qmax)
    inside = G.from_blocks((y >= lo - 0.5) & (y <= hi + 0.5), x.shape)
    return qa.dequantize(x.dtype), inside


def _ste_bwd(how, inside, g):
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


ste_fake_quant.defvjp(_ste_fwd, _ste_bwd)


def lsq_fake_quant(
    v: Float[Array, "*s"], s: Float[Array, "*t"], *, bits: int, signed: bool = True
) -> Float[Array, "*s"]:
    """LSQ fake quantization of ``v`` with learnable step ``s`` (broadcastable to ``v``).

    Q_N = 2^(b−1), Q_P = 2^(b−1) − 1 for signed; Q_N = 0, Q_P = 2^b − 1 for unsigned."""
    if not 2 <= bits <= 8:
        raise ValueError(f"lsq_fake_quant supports 2..8 bits, got {bits}")
    qn = 2 ** (bits - 1) if signed else 0
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    n_per_step = v.size // max(s.size, 1)
    g = 1.0 / jnp.sqrt(jnp.float32(n_per_step * qp))
    return _lsq(v, s, float(qn), float(qp), g)


@jax.custom_vjp
def _lsq(v, s, qn, qp, g):
    return jnp.round(jnp.clip(v / s, -qn, qp)) * s


def _lsq_fwd(v, s, qn, qp, g):
    return _lsq(v, s, qn, qp, g), (v, s, qn, qp, g)


def _lsq_bwd(res, ct):
    v, s, qn, qp, g = res
    r = v / s
    below, above = r <= -qn, r >= qp
    inside = ~(below | above)
    dv = jnp.where(inside, ct, jnp.zeros_like(ct))
    ds_elem = jnp.where(below, -qn, jnp.where(above, qp, jnp.round(r) - r)) * ct * g
    # sum over the broadcast axes back to s's shape
    ds = _unbroadcast(ds_elem, s.shape)
    return dv, ds, None, None, None


def _unbroadcast(x: Array, shape: tuple[int, ...]) -> Array:
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
