"""Granularity: from a config to a block shape, and the blocked view of an array.

Every granularity (per-tensor, per-channel, groups along either axis, 2-D blocks,
per-token) is one *block shape* ``b`` with ``len(b) == x.ndim`` and ``b[i] | x.shape[i]``;
one scale (and zero point) per block. The blocked view of ``x[s0, s1, …]`` is
``x.reshape(n0, b0, n1, b1, …)`` with ``n_i = s_i / b_i``; per-block statistics reduce
the odd axes and have shape ``(n0, n1, …)``.

Ragged groups (``QuantConfig.ragged``): ``b_i`` need not divide ``s_i``; then
``n_i = ceil(s_i / b_i)`` and the last block along that axis is shorter. :func:`to_blocks`
zero-pads such an array to whole blocks and :func:`from_blocks` cuts the padding off, which is
exact for anything computed element-wise (dequantization). Statistics over a padded block would
see the zeros, so :func:`numerics.quantize.quantize` never computes them there: it quantizes the
whole blocks and the short tail separately (:func:`split_ragged`).
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
        if shape[ax] % size and not cfg.ragged:
            raise ValueError(
                f"group_size {size} does not divide axis {cfg.axis} of length {shape[ax]} "
                f"(array shape {tuple(shape)}); pass ragged=True for a shorter last group"
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
    """Blocks per axis, ``ceil(s / b)`` (a ragged last block counts as one)."""
    return tuple(-(-s // b) for s, b in zip(shape, bs, strict=True))


def is_ragged(shape: tuple[int, ...], bs: tuple[int, ...]) -> bool:
    return any(s % b for s, b in zip(shape, bs, strict=True))


def to_blocks(x: Array, bs: tuple[int, ...]) -> Array:
    """``x[s0, s1, …] → x[n0, b0, n1, b1, …]``; a ragged array is zero-padded to whole blocks."""
    nb = num_blocks(x.shape, bs)
    if is_ragged(x.shape, bs):
        x = jnp.pad(x, [(0, n * b - s) for s, n, b in zip(x.shape, nb, bs, strict=True)])
    return x.reshape(tuple(d for pair in zip(nb, bs, strict=True) for d in pair))


def from_blocks(xb: Array, shape: tuple[int, ...]) -> Array:
    """The inverse of :func:`to_blocks` (padding cut off)."""
    flat = xb.reshape(tuple(xb.shape[i] * xb.shape[i + 1] for i in range(0, xb.ndim, 2)))
    if flat.shape != tuple(shape):
        flat = flat[tuple(slice(0, s) for s in shape)]
    return flat


def split_ragged(shape: tuple[int, ...], bs: tuple[int, ...]) -> tuple[int, int, int]:
    """``(axis, whole, tail)`` of an array whose blocks are ragged along one axis: elements
    ``[:whole]`` along ``axis`` form whole blocks, the last ``tail`` one short block."""
    axes = [i for i, (s, b) in enumerate(zip(shape, bs, strict=True)) if s % b]
    if len(axes) != 1:
        raise ValueError(f"block shape {bs} is ragged along {len(axes)} axes of {shape}; need 1")
    ax = axes[0]
    tail = shape[ax] % bs[ax]
    return ax, shape[ax] - tail, tail


def block_axes(ndim: int) -> tuple[int, ...]:
    """The within-block axes (odd positions) of a blocked view of a rank-``ndim`` array."""
    return tuple(2 * i + 1 for i in range(ndim))


def expand_stat(stat: Array) -> Array:
    """Per-block statistic ``[n0, n1, …]`` → broadcastable ``[n0, 1, n1, 1, …]``."""
    return jnp.expand_dims(stat, block_axes(stat.ndim))


def block_size(bs: tuple[int, ...]) -> int:
    return math.prod(bs)
