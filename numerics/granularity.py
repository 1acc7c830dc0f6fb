"""Granularity: from a config to a block shape, and the blocked view of an array.

Every granularity (per-tensor, per-channel, groups along either axis, 2-D blocks,
per-token) is one *block shape* ``b`` with ``len(b) == x.ndim`` and ``b[i] | x.shape[i]``;
one scale (and zero point) per block. The blocked view of ``x[s0, s1, …]`` is
``x.reshape(n0, b0, n1, b1, …)`` with ``n_i = s_i / b_i``; per-block statistics reduce
the odd axes and have shape ``(n0, n1, …)``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array

from numerics.config import QuantConfig


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for an array of rank {ndim}")
    return axis % ndim


def block_shape(shape: tuple[int, ...], cfg: QuantConfig) -> tuple[int, ...]:
    """The block shape that ``cfg`` gives an array of ``shape`` (validated)."""
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("cannot quantize a 0-d array; reshape it to 1-d first")
    if cfg.granularity == "tensor":
        return tuple(shape)
    if cfg.granularity in ("channel", "group"):
        ax = _norm_axis(cfg.axis, ndim)
        size = shape[ax] if cfg.granularity == "channel" else cfg.group_size
        if shape[ax] % size:
            raise ValueError(
                f"group_size {size} does not divide axis {cfg.axis} of length {shape[ax]} "
                f"(array shape {tuple(shape)})"
            )
        return tuple(size if i == ax else 1 for i in range(ndim))
    bs = tuple(int(b) for b in cfg.block_shape)
    if len(bs) > ndim:
        raise ValueError(f"block_shape {bs} has more axes than the array shape {tuple(shape)}")
    bs = (1,) * (ndim - len(bs)) + bs
    bad = [(s, b) for s, b in zip(shape, bs, strict=True) if s % b]
    if bad:
        raise ValueError(f"block_shape {bs} does not divide array shape {tuple(shape)}")
    return bs


def num_blocks(shape: tuple[int, ...], bs: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // b for s, b in zip(shape, bs, strict=True))


def to_blocks(x: Array, bs: tuple[int, ...]) -> Array:
    """``x[s0, s1, …] → x[n0, b0, n1, b1, …]``."""
    nb = num_blocks(x.shape, bs)
    return x.reshape(tuple(d for pair in zip(nb, bs, strict=True) for d in pair))


def from_blocks(xb: Array, shape: tuple[int, ...]) -> Array:
    return xb.reshape(shape)


def block_axes(ndim: int) -> tuple[int, ...]:
    """The within-block axes (odd positions) of a blocked view of a rank-``ndim`` array."""
    return tuple(2 * i + 1 for i in range(ndim))


def expand_stat(stat: Array) -> Array:
    """Per-block statistic ``[n0, n1, …]`` → broadcastable ``[n0, 1, n1, 1, …]``."""
    return jnp.expand_dims(stat, block_axes(stat.ndim))


def block_size(bs: tuple[int, ...]) -> int:
    return math.prod(bs)
