"""The element-format contract: the grids that quantized codes live on.

Every format is a frozen, hashable dataclass (so it can be a static field of a
pytree or a ``jit`` static argument) with one contract, the abstract :class:`Format`:

* ``bits``      — storage bits per code (1..8); codes are unsigned bit patterns
                  in ``[0, 2**bits)`` held in ``uint8``.
* ``values()``  — float64 numpy array of length ``2**bits``: the real value of
                  every code (NaN for NaN / unused codes).
* ``max_abs``   — the largest finite magnitude; absmax scaling maps a block's
                  absolute maximum onto it.
* ``encode(y)`` — the code of the representable value nearest to ``y`` (``y`` is
                  already divided by its scale), saturating at ±``max_abs``.
* ``decode(c)`` — the float32 value of each code.
* ``bracket(y)``— the two representable neighbours ``lo <= y <= hi`` (stochastic
                  rounding uses them).
* ``symmetric`` — True when the value set is closed under negation (the
                  sign-symmetry property holds away from exact ties at 0).

This module is the bottom of the format family: ``numerics.formats`` (integers, tables and
the name registry ``get_format``) and ``numerics.minifloat`` (ExMy) both build on it, and
neither needs the other to define its formats.
"""

from __future__ import annotations

import abc
import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

MAX_BITS = 8


class Format(abc.ABC):
    """Abstract element format (see the module docstring for the contract)."""

    bits: int

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @abc.abstractmethod
    def values(self) -> np.ndarray:
        """float64 ``[2**bits]``: value of every code, NaN where unused."""

    @property
    def max_abs(self) -> float:
        return float(np.nanmax(np.abs(self.values())))

    @property
    def symmetric(self) -> bool:
        v = self.finite_values()
        return bool(np.array_equal(v, -v[::-1]))

    @property
    def has_zero(self) -> bool:
        return bool(np.any(self.finite_values() == 0.0))

    def finite_values(self) -> np.ndarray:
        """Sorted unique finite values (float64)."""
        v = self.values()
        return np.unique(v[np.isfinite(v)])

    def decode(self, codes: UInt8[Array, "*s"]) -> Float[Array, "*s"]:
        table = jnp.asarray(np.nan_to_num(self.values(), nan=np.nan).astype(np.float32))
        return table[codes.astype(jnp.int32)]

    def encode(self, y: Float[Array, "*s"]) -> UInt8[Array, "*s"]:
        return _nearest_code(self, y)

    def round(self, y: Float[Array, "*s"]) -> Float[Array, "*s"]:
        """Nearest representable value (saturating)."""
        return self.decode(self.encode(y)).astype(y.dtype)

    def bracket(self, y: Float[Array, "*s"]) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
        """Neighbours ``lo <= clip(y) <= hi`` on the grid (equal when y is on the grid)."""
        v = jnp.asarray(self.finite_values().astype(np.float32))
        yc = jnp.clip(y.astype(jnp.float32), v[0], v[-1])
        hi_i = jnp.clip(
            jnp.searchsorted(v, yc, side="left", method="compare_all"), 0, v.shape[0] - 1
        )
        hi = v[hi_i]
        lo = jnp.where(hi == yc, hi, v[jnp.maximum(hi_i - 1, 0)])
        return lo, hi


# --------------------------------------------------------------------------- nearest-code search


@functools.lru_cache(maxsize=256)
def _sorted_tables(fmt: Format) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vals = fmt.values()
    finite = np.isfinite(vals)
    codes = np.nonzero(finite)[0]
    order = np.argsort(vals[codes], kind="stable")
    v = vals[codes][order]
    # Keep one code per distinct value (e.g. +0 and -0): the first, i.e. the smaller code.
    keep = np.concatenate([[True], np.diff(v) > 0])
    v, c = v[keep], codes[order][keep]
    mid = (v[1:] + v[:-1]) / 2.0
    return v.astype(np.float32), c.astype(np.uint8), mid.astype(np.float32)


def _nearest_code(fmt: Format, y: Float[Array, "*s"]) -> UInt8[Array, "*s"]:
    """Code of the nearest finite value; exact ties go to the smaller magnitude
    (and, for ``±v`` around 0, to the positive one). Saturates at the ends.

    One pass over the midpoints: the index is the number of midpoints below ``y``, where a
    midpoint equal to ``y`` counts only for ``y <= 0`` (that moves ties toward zero)."""
    v, c, mid = _sorted_tables(fmt)
    y = y.astype(jnp.float32)
    m = jnp.asarray(mid).reshape((1,) * y.ndim + (-1,))
    yy = y[..., None]
    below = jnp.where(yy > 0, yy > m, yy >= m)
    idx = jnp.sum(below, axis=-1, dtype=jnp.int32)
    if np.array_equal(c, np.arange(c.size)):
        return idx.astype(jnp.uint8)  # codes in value order (NF, codebooks, bipolar)
    return jnp.asarray(c)[idx]
