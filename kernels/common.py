"""In-kernel building blocks shared by the Pallas kernels, and the argument checks.

Everything here is written with the operations the Pallas Triton lowering accepts (shifts,
masks, selects, broadcasts, row-major reshapes, strided ``pl.ds`` loads), so the same code
runs in interpret mode on CPU and compiled on a GPU:

* :func:`load_codes` — the codes of a ``[bn, bk]`` weight tile read straight from the packed
  ``uint32`` words of ``numerics.packing`` (little-endian bit stream along K; a run of
  ``32/gcd(b, 32)`` codes fills ``b/gcd(b, 32)`` words). The ``n_words`` words of each run are
  read as ``n_words`` strided planes, then every code is cut out of its word (and, for the
  codes of a 3-bit run that straddle two words, the next word) with shifts and a mask.
* :func:`decode` — code → value of a format: integer formats arithmetically (two's complement
  sign extension), every other format (NF, minifloats such as FP4 E2M1, codebooks) by a
  ``2^b − 1``-way select tree over the code bits with the format's table baked in as
  constants: no gather, no table in memory.
* :func:`e8m0_to_f32` — an E8M0 power-of-two scale (MX) from its 8-bit pattern.
* :func:`expand_groups` — per-group scales ``[bn, bk/g]`` (or one per tile) → ``[bn, bk]``.
* tile selection and the ValueError checks shared by the wrappers.

Importing this module needs no GPU.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt32

from numerics.formats import Format, IntFormat

WORD_BITS = 32  # the kernels read uint32 words (numerics.packing, word_bits=32)


def run_shape(bits: int) -> tuple[int, int]:
    """``(codes, words)`` in one run of the packed bit stream: ``lcm(b, 32)/b`` and
    ``lcm(b, 32)/32``."""
    l = math.lcm(bits, WORD_BITS)
    return l // bits, l // WORD_BITS


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


# --------------------------------------------------------------------------- in-kernel helpers


def load_codes(w_ref, bits: int, step, bk: int, rows=slice(None)) -> Int[Array, "bn bk"]:
    """Codes of K-tile ``step`` (columns ``[step·bk, (step+1)·bk)``) of a packed weight ref.

    ``w_ref`` holds ``[bn, K·b/32]`` uint32 words of ``numerics.packing.pack(codes, b, axis=1,
    word_bits=32)``; ``rows`` optionally selects a row block (a ``pl.ds``)."""
    n_codes, n_words = run_shape(bits)
    runs = bk // n_codes  # runs per tile
    base = step * (runs * n_words)
    planes = [
        w_ref[rows, pl.ds(base + t, runs, stride=n_words)]
        if n_words > 1
        else w_ref[rows, pl.ds(base, runs)]
        for t in range(n_words)
    ]  # n_words × [bn, runs] uint32: word t of every run
    return codes_from_words(planes, bits)


def codes_from_words(planes: list[UInt32[Array, "bn r"]], bits: int) -> Int[Array, "bn rc"]:
    """Cut the ``n_codes`` codes of every run out of its ``n_words`` word planes.

    Code ``i`` of a run occupies stream bits ``[i·b, i·b + b)``: word ``t = i·b // 32`` from
    bit ``o = i·b mod 32``, spilling ``o + b − 32`` bits into word ``t + 1`` when it straddles."""
    n_codes, n_words = run_shape(bits)
    bn, runs = planes[0].shape
    i = lax.broadcasted_iota(jnp.int32, (1, 1, n_codes), 2)
    start = i * bits
    t = start // WORD_BITS  # word holding the code's low bits
    o = (start % WORD_BITS).astype(jnp.uint32)  # bit offset inside that word
    w3 = [p[:, :, None] for p in planes]  # [bn, runs, 1]

    def pick(idx):  # word ``idx`` of each run, per code position (select over n_words planes)
        out = w3[0]
        for k in range(1, n_words):
            out = jnp.where(idx == k, w3[k], out)
        return jnp.broadcast_to(out, (bn, runs, n_codes))

    lo = jnp.right_shift(pick(t), jnp.broadcast_to(o, (bn, runs, n_codes)))
    if n_words > 1:  # codes that straddle a word boundary take their high bits from word t+1
        spill = (o + np.uint32(bits)) > np.uint32(WORD_BITS)
        up = jnp.left_shift(pick(t + 1), (np.uint32(WORD_BITS) - o) % np.uint32(WORD_BITS))
        lo = jnp.where(spill, jnp.bitwise_or(lo, up), lo)
    codes = jnp.bitwise_and(lo, np.uint32(2**bits - 1)).astype(jnp.int32)
    return codes.reshape(bn, runs * n_codes)


def decode(codes: Int[Array, "*s"], fmt: Format) -> Float[Array, "*s"]:
    """Value of every code of ``fmt`` in float32 (bit-identical to ``fmt.decode``)."""
    if isinstance(fmt, IntFormat):
        if fmt.signed:
            half = 2 ** (fmt.bits - 1)
            codes = jnp.where(codes >= half, codes - 2**fmt.bits, codes)
        return codes.astype(jnp.float32)
    table = [np.float32(v) for v in fmt.values()]  # NaN entries stay NaN, as in fmt.decode
    level = [jnp.full(codes.shape, v, jnp.float32) for v in table]
    for b in range(fmt.bits):  # select tree: halve the candidates on each code bit
        bit = jnp.bitwise_and(jnp.right_shift(codes, b), 1) == 1
        level = [jnp.where(bit, level[2 * q + 1], level[2 * q]) for q in range(len(level) // 2)]
    return level[0]


def e8m0_to_f32(e: Int[Array, "*s"]) -> Float[Array, "*s"]:
    """``2^(e − 127)`` from an E8M0 bit pattern (int32), NaN for 0xFF (OCP MX v1.0 sec. 5.4)."""
    bits = jnp.where(e == 0, jnp.int32(0x00400000), jnp.left_shift(e, 23))  # 2^-127: subnormal
    v = lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(e == 255, jnp.float32(np.nan), v)


def expand_groups(s: Float[Array, "bn ns"], rep: int) -> Float[Array, "bn nsrep"]:
    """Repeat every per-group column ``rep`` times: ``[bn, ns] → [bn, ns·rep]``."""
    bn, ns = s.shape
    return jnp.broadcast_to(s[:, :, None], (bn, ns, rep)).reshape(bn, ns * rep)


def group_slice(step, bk: int, g: int):
    """``pl.ds`` of the scale columns that K-tile ``step`` needs, and how often each repeats."""
    if g <= bk:
        return pl.ds(step * (bk // g), bk // g), g
    return pl.ds(step // (g // bk), 1), bk


# --------------------------------------------------------------------------- host-side checks


FLOAT_ACTS = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_float_act(x, who: str) -> None:
    if not hasattr(x, "dtype") or x.dtype not in [jnp.dtype(d) for d in FLOAT_ACTS]:
        raise ValueError(
            f"{who}: activations must be bfloat16, float16 or float32, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.ndim != 2:
        raise ValueError(f"{who}: activations must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{who}: empty activations of shape {tuple(x.shape)}")


def pick_block(n: int, requested: int | None, candidates: tuple[int, ...], who: str, what: str):
    """A power-of-two tile dividing ``n``: ``requested`` (validated) or the largest candidate."""
    if requested is not None:
        if not is_pow2(requested):
            raise ValueError(f"{who}: {what} must be a power of two, got {requested}")
        if n % requested:
            raise ValueError(f"{who}: {what}={requested} does not divide the axis of length {n}")
        return requested
    for c in candidates:
        if n % c == 0:
            return c
    raise ValueError(
        f"{who}: axis of length {n} is not a multiple of any tile in {candidates}; "
        "pad it (the compiled kernels need power-of-two tiles that divide the axis)"
    )


def pad_rows(x: Array, bm: int) -> Array:
    m = x.shape[0]
    pad = (-m) % bm
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)


def block_m_for(m: int, requested: int | None, who: str) -> int:
    """Row tile: at least 16 (the smallest Triton ``dot``), at most 64; rows are zero-padded."""
    if requested is not None:
        if not is_pow2(requested) or requested < 16:
            raise ValueError(f"{who}: block_m must be a power of two >= 16, got {requested}")
        return requested
    return min(64, max(16, 1 << max(0, (m - 1).bit_length())))


# --------------------------------------------------------------------------- tolerances


def dot_error_bound(
    abs_product: np.ndarray, y_ref: np.ndarray, K: int, out_dtype, *, products_exact: bool
) -> np.ndarray:
    """Largest possible ``|kernel − reference|`` of two float32-accumulated dots of the same
    operands that differ only in summation order, then both rounded to ``out_dtype``.

    ``abs_product = |x| @ |W|ᵀ`` (float64), ``y_ref`` the reference output (float64). Each
    computed sum is within ``γ_K · Σ|x_k w_k|`` of the exact one, ``γ_K = K·u/(1 − K·u)``,
    ``u = 2^-24`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5;
    any order, so split-K and tiling are covered), plus ``u·Σ|x_k w_k|`` when the products
    themselves round (float32 × float32; bf16 / f16 products are exact in float32). Rounding
    to ``out_dtype`` (unit roundoff ``u_out``) moves each side by at most ``u_out`` relative."""
    u = 2.0**-24
    k = K + (0 if products_exact else 1)
    gamma = k * u / (1 - k * u)
    u_out = float(jnp.finfo(out_dtype).eps) / 2
    d = 2 * gamma * abs_product
    return d + 2 * u_out * (np.abs(y_ref) + d)
