"""Lossless packing of b-bit codes into words, and the bits-per-weight accounting.

``pack(codes, bits, axis, word_bits)`` lays the codes along ``axis`` out as one little-endian
bit stream (code i occupies bits ``[i·b, (i+1)·b)``) and cuts it into ``uint{word_bits}``
words. A run of ``L = lcm(b, w)/b`` codes fills exactly ``lcm(b, w)/w`` words, so 3-bit codes
pack 32 codes into three uint32 words (the GPTQ / AutoGPTQ layout) and 4-bit codes 8 per
uint32. The axis is zero-padded to a multiple of ``L``; ``unpack`` needs the original length.

``bits_per_weight`` counts everything a deployment stores: codes, scales (recursively for
scales of scales), zero points (at the code width for integer formats, as GPTQ packs them),
sparse outliers (value + index bits each; SpQR counts 32 per outlier) and lookup tables —
for every weight leaf, through the parts its ``storage_bits()`` lists (``numerics.leaves``).
Imports point one way: ``numerics.qarray`` builds on this module, never the reverse.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array

from numerics.formats import IntFormat

_WORDS = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def _trailing(v: Array, ndim: int) -> Array:
    """A 1-D vector shaped to broadcast along the last axis of a rank-``ndim`` array."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def _run(bits: int, word_bits: int) -> tuple[int, int]:
    l = math.lcm(bits, word_bits)
    return l // bits, l // word_bits


def _check(bits: int, word_bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"pack: bits must be in 1..8, got {bits}")
    if word_bits not in _WORDS:
        raise ValueError(f"pack: word_bits must be 8, 16 or 32, got {word_bits}")


def pack(codes: Array, bits: int, *, axis: int = -1, word_bits: int = 32) -> Array:
    """Pack uint8 ``codes`` (< 2**bits) along ``axis`` into words."""
    _check(bits, word_bits)
    if codes.dtype != jnp.uint8:
        raise TypeError(f"pack: codes must be uint8, got {codes.dtype}")
    return _pack(codes, bits, axis % codes.ndim, word_bits)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _pack(codes: Array, bits: int, axis: int, word_bits: int) -> Array:
    c = jnp.moveaxis(codes, axis, -1)
    n_codes, n_words = _run(bits, word_bits)
    pad = (-c.shape[-1]) % n_codes
    if pad:
        c = jnp.concatenate([c, jnp.zeros(c.shape[:-1] + (pad,), jnp.uint8)], axis=-1)
    runs = c.reshape(c.shape[:-1] + (-1, n_codes))
    # bit stream of each run: [..., runs, n_codes, bits] → [..., runs, n_words, word_bits]
    shifts = _trailing(jnp.arange(bits, dtype=jnp.uint8), runs.ndim + 1)
    stream = (runs[..., None] >> shifts) & jnp.uint8(1)
    stream = stream.reshape(runs.shape[:-1] + (n_words, word_bits))
    wt = _WORDS[word_bits]
    weights = jnp.left_shift(jnp.ones((), wt), jnp.arange(word_bits, dtype=wt))
    words = jnp.sum(stream.astype(wt) * _trailing(weights, stream.ndim), axis=-1, dtype=wt)
    words = words.reshape(words.shape[:-2] + (-1,))
    return jnp.moveaxis(words, -1, axis)


def unpack(words: Array, bits: int, *, axis: int = -1, length: int) -> Array:
    """Inverse of ``pack``: uint8 codes, ``length`` of them along ``axis``."""
    word_bits = jnp.dtype(words.dtype).itemsize * 8
    _check(bits, word_bits)
    w = jnp.moveaxis(words, axis, -1)
    n_codes, n_words = _run(bits, word_bits)
    if w.shape[-1] % n_words:
        raise ValueError(f"unpack: {w.shape[-1]} words is not a whole number of runs of {n_words}")
    if length > w.shape[-1] // n_words * n_codes:
        raise ValueError(f"unpack: length {length} exceeds the packed capacity")
    return jnp.moveaxis(_unpack(w, bits, length), -1, axis)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack(w: Array, bits: int, length: int) -> Array:
    word_bits = jnp.dtype(w.dtype).itemsize * 8
    n_codes, n_words = _run(bits, word_bits)
    wt = w.dtype
    runs = w.reshape(w.shape[:-1] + (-1, n_words))
    shifts = _trailing(jnp.arange(word_bits, dtype=wt), runs.ndim + 1)
    stream = ((runs[..., None] >> shifts) & jnp.ones((), wt)).astype(jnp.uint8)
    stream = stream.reshape(runs.shape[:-1] + (n_codes, bits))
    weights = jnp.left_shift(jnp.ones((), jnp.uint8), jnp.arange(bits, dtype=jnp.uint8))
    codes = jnp.sum(stream * _trailing(weights, stream.ndim), axis=-1, dtype=jnp.uint8)
    return codes.reshape(codes.shape[:-2] + (-1,))[..., :length]


# --------------------------------------------------------------------------- accounting
#
# The one copy of the bits-per-weight arithmetic. Weight leaves (numerics.leaves.WeightLeaf)
# list their stored parts in ``storage_bits()`` with the helpers below and count themselves with
# ``bits_per_weight(self)``. This module sits below ``numerics.qarray`` (which packs its codes
# with it), so it knows a QArray only by its fields: codes, scale (an array or a QArray),
# zero and format.


def array_bits(a) -> int:
    """Bits of a plain array at its storage width: ``size · itemsize · 8``."""
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize * 8


def storage_bits(qa) -> dict[str, int]:
    """Bits stored for a QArray, by part: codes, scales, zeros (recursive over scale QArrays).

    Codes count ``format.bits`` each (packed, whatever their word); scales their storage dtype;
    integer-valued zero points the code width for integer formats (as GPTQ packs them), else 16.
    """
    s = qa.scale
    if hasattr(s, "codes") and hasattr(s, "format"):  # scales of scales: a QArray of them
        scales = sum(storage_bits(s).values())
    else:  # a float array (or anything with shape and dtype, e.g. a jax.ShapeDtypeStruct)
        scales = array_bits(s)
    zeros = 0
    if qa.zero is not None:
        zbits = qa.format.bits if isinstance(qa.format, IntFormat) else 16
        zeros = math.prod(qa.zero.shape) * zbits
    return {"codes": math.prod(qa.shape) * qa.format.bits, "scales": scales, "zeros": zeros}


def bits_per_weight(leaf, *, n_outliers: int = 0, bits_per_outlier: int = 32) -> float:
    """Average stored bits per weight element of a weight leaf (a QArray or any
    ``numerics.leaves`` leaf): the sum of its ``storage_bits()`` parts (codes, scales, zero
    points, outliers, lookup tables) plus ``n_outliers · bits_per_outlier``, over the number of
    weights."""
    if n_outliers < 0:
        raise ValueError("n_outliers must be >= 0")
    if not callable(getattr(leaf, "storage_bits", None)):
        raise TypeError(
            f"bits_per_weight: {type(leaf).__name__} is not a weight leaf (no storage_bits())"
        )
    parts = leaf.storage_bits()
    return (sum(parts.values()) + n_outliers * bits_per_outlier) / math.prod(leaf.shape)


# --------------------------------------------------------------------------- bit planes


def _check_parts(parts: tuple[int, ...]) -> int:
    if not parts or any(not isinstance(p, int) or p < 1 for p in parts) or sum(parts) > 8:
        raise ValueError(f"parts must be positive ints summing to at most 8, got {parts!r}")
    return sum(parts)


def pack_planes(
    codes: Array, parts: tuple[int, ...], *, axis: int = -1, word_bits: int = 32
) -> tuple[Array, ...]:
    """Split ``sum(parts)``-bit codes into bit fields, most significant first, and ``pack``
    each field on its own (ZeroQuant(4+2), arXiv 2312.08583: a 6-bit code stored as a 4-bit
    and a 2-bit plane, ``parts=(4, 2)``, so every plane's words hold a power-of-two number of
    codes). Lossless: :func:`unpack_planes` inverts it."""
    total = _check_parts(parts)
    if codes.dtype != jnp.uint8:
        raise TypeError(f"pack_planes: codes must be uint8, got {codes.dtype}")
    out, shift = [], total
    for p in parts:
        shift -= p
        field = (codes >> jnp.uint8(shift)) & jnp.uint8(2**p - 1)
        out.append(pack(field, p, axis=axis, word_bits=word_bits))
    return tuple(out)


def unpack_planes(
    planes: tuple[Array, ...], parts: tuple[int, ...], *, axis: int = -1, length: int
) -> Array:
    """Inverse of :func:`pack_planes`: the uint8 codes, ``length`` of them along ``axis``."""
    total = _check_parts(parts)
    if len(planes) != len(parts):
        raise ValueError(f"unpack_planes: {len(planes)} planes for {len(parts)} parts")
    codes, shift = None, total
    for words, p in zip(planes, parts, strict=True):
        shift -= p
        field = unpack(words, p, axis=axis, length=length) << jnp.uint8(shift)
        codes = field if codes is None else codes | field
    return codes
