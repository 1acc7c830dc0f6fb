# ruff: noqa: F722, F821, UP037  (jaxtyping shape strings are not forward references)
"""Analysis helpers for the numerics reproductions in ``notebooks/``.

Contents
--------
* Error statistics: ``error_stats(x, x_hat)`` (eager summary: MSE, SQNR, relative and maximum
  error) and ``group_mse(x, x_hat, group_size)`` (mean squared error of every group of
  ``group_size`` consecutive elements along the last axis).
* Per-group datatype selection (BitMoD, arXiv 2411.11745, Sec. "fine-grained data type
  adaptation"): ``select_per_group(x, candidates)`` quantizes every group of the last axis with
  each candidate config and keeps, per group, the one with the least squared error (the first
  candidate wins ties). ``BITMOD_VALUES`` / ``bitmod_format(name)`` are the candidate value sets
  of the official repository (abdelfattah-lab/BitMoD-HPCA-25,
  ``bitmod_quant/quant_utils/quant_weight.py``): FP3 = {0, ±1, ±2, ±4} and FP4 = E2M1 ×2 =
  {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}, whose redundant negative-zero code is re-used for one special
  value — extra resolution (ER: +3 / −3 for FP3, +10 / −10 for FP4) or extra asymmetry
  (EA: +6 / −6 for FP3, +16 / −16 for FP4). ``selector_bits_per_weight`` is the cost of storing
  the per-group choice.
* Bit-plane dot products (bipolar-INT, arXiv 2409.17870): ``bit_planes(codes, bits)``;
  ``bipolar_dot_bitplanes`` computes ``Σ_k a_k w_k`` for bipolar-INT codes as
  ``Σ_i Σ_j 2^(i+j) (n − 2·popcount(A_i XOR W_j))`` — the ±1 product of two bit planes is
  ``n`` minus twice the number of disagreeing bits — and ``int_dot_bitplanes`` does the same for
  two's-complement (or unsigned) integers with AND-popcounts and a negative weight on the sign
  plane. Both pack the planes into uint32 words and use ``lax.population_count``; both are exact
  in int32 (a ValueError is raised when the worst case could overflow). ``bipolar_values`` /
  ``int_values`` are the direct decodings, and ``int_to_bipolar_codes`` the lossless map between
  the two: a k-bit two's-complement integer ``x`` with code ``c`` equals ``(v − 1) / 2`` where
  ``v`` is the bipolar value of the code ``c XOR 2^(k−1)`` (flip the sign bit).
* Closed forms of the two quantization scaling laws (``numerics.scaling_laws``):
  ``qid_tokens_for_loss`` inverts ΔqLoss = k·D^β / (N^α·P^γ) for D (arXiv 2411.17691, the form
  of its Table 1); ``fp_critical_data_size`` is the D that minimises the floating-point
  quantization-training loss of arXiv 2501.02423 (Eq. 26) at fixed N, E, M, B; and
  ``fp_best_exponent_split`` the integer (E, M) with E + M fixed that minimises its quantization
  term. ``QID_FIXED_P_LAW`` is the degradation law at one bit width, ΔqLoss = k·D^β / N^α
  (inputs N, D; parameters k, α, β), for fitting each bit width on its own with
  ``numerics.scaling_laws.fit_law`` (the unified law's γ is not identifiable at a single P).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt8

from numerics.config import QuantConfig
from numerics.formats import TableFormat, codebook_format
from numerics.packing import pack
from numerics.quantize import check_input, fake_quant
from numerics.scaling_laws import ParametricLaw

# --------------------------------------------------------------------------- error statistics


def _float_pair(x, x_hat, who: str) -> tuple[np.ndarray, np.ndarray]:
    x, x_hat = np.asarray(x), np.asarray(x_hat)
    for name, a in (("x", x), ("x_hat", x_hat)):
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{who}: {name} must be a floating-point array, got {a.dtype}")
        if a.size == 0:
            raise ValueError(f"{who}: {name} is empty")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{who}: {name} contains NaN or Inf")
    if x.shape != x_hat.shape:
        raise ValueError(f"{who}: shapes differ, {x.shape} vs {x_hat.shape}")
    return x.astype(np.float64), x_hat.astype(np.float64)


def error_stats(x, x_hat) -> dict[str, float]:
    """MSE, SQNR (dB, ``10·log10(mean x² / MSE)``), relative Frobenius error and max |error|
    of a reconstruction ``x_hat`` of ``x`` (eager, float64 accumulation)."""
    x, x_hat = _float_pair(x, x_hat, "error_stats")
    e = x_hat - x
    mse = float(np.mean(e**2))
    sig = float(np.mean(x**2))
    return {
        "mse": mse,
        "sqnr_db": float(10 * np.log10(sig / mse)) if mse > 0 else float("inf"),
        "rel_err": float(np.sqrt(np.sum(e**2) / max(np.sum(x**2), 1e-300))),
        "max_err": float(np.max(np.abs(e))),
    }


def group_mse(
    x: Float[Array, "*rows n"], x_hat: Float[Array, "*rows n"], group_size: int
) -> Float[Array, "*rows groups"]:
    """Mean squared error of each group of ``group_size`` consecutive elements of the last
    axis (float32)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"group_mse: shapes differ, {x.shape} vs {x_hat.shape}")
    if x.ndim == 0:
        raise ValueError("group_mse: needs at least one axis")
    if not isinstance(group_size, int) or group_size < 1 or x.shape[-1] % group_size:
        raise ValueError(
            f"group_mse: group_size {group_size!r} must be a positive int dividing the last "
            f"axis ({x.shape[-1]})"
        )
    e = (x_hat.astype(jnp.float32) - x.astype(jnp.float32)) ** 2
    e = e.reshape(x.shape[:-1] + (x.shape[-1] // group_size, group_size))
    return jnp.mean(e, axis=-1)


# --------------------------------------------------------------------------- BitMoD datatypes

# Value sets of arXiv 2411.11745's 3- and 4-bit types, as listed in the official repository
# (bitmod_quant/quant_utils/quant_weight.py); scales are absmax / max|value| per group.
BITMOD_VALUES: Mapping[str, tuple[float, ...]] = {
    "int3": (-3, -2, -1, 0, 1, 2, 3),
    "fp3": (-4, -2, -1, 0, 1, 2, 4),
    "fp3_er_pos": (-4, -2, -1, 0, 1, 2, 3, 4),
    "fp3_er_neg": (-4, -3, -2, -1, 0, 1, 2, 4),
    "fp3_ea_pos": (-4, -2, -1, 0, 1, 2, 4, 6),
    "fp3_ea_neg": (-6, -4, -2, -1, 0, 1, 2, 4),
    "int4": tuple(range(-7, 8)),
    "flint4": (-16, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 16),
    "fp4": (-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12),
    "fp4_er_pos": (-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 10, 12),
    "fp4_er_neg": (-12, -10, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12),
    "fp4_ea_pos": (-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12, 16),
    "fp4_ea_neg": (-16, -12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12),
}

# Candidate sets of the repository's ``search_datatype`` (``mixed_bitmod`` and ``mixed_ant``).
BITMOD_CANDIDATES: Mapping[str, tuple[str, ...]] = {
    "bitmod3": ("fp3_er_pos", "fp3_er_neg", "fp3_ea_pos", "fp3_ea_neg"),
    "bitmod4": ("fp4_er_pos", "fp4_er_neg", "fp4_ea_pos", "fp4_ea_neg"),
    "ant3": ("int3", "fp3"),
    "ant4": ("int4", "flint4"),
}


def bitmod_format(name: str, *, special: float | None = None) -> TableFormat:
    """The BitMoD value set ``name`` (a key of ``BITMOD_VALUES``) as a table format.

    ``special`` replaces the magnitude of the extra value of an ``fp3_ea_*`` type (6 in the
    paper; the authors' repository profiles 5..9), e.g. ``bitmod_format("fp3_ea_pos",
    special=8)`` is {0, ±1, ±2, ±4} ∪ {+8}."""
    if name not in BITMOD_VALUES:
        raise ValueError(f"unknown BitMoD type {name!r}; known: {sorted(BITMOD_VALUES)}")
    v = list(BITMOD_VALUES[name])
    if special is not None:
        if not name.startswith("fp3_ea"):
            raise ValueError(f"special= only applies to fp3_ea_pos / fp3_ea_neg, not {name!r}")
        if not (math.isfinite(special) and special > 4):
            raise ValueError(f"special must be a finite magnitude > 4, got {special!r}")
        v = [x for x in v if abs(x) != 6] + [math.copysign(special, 1 if "pos" in name else -1)]
        name = f"{name}_{special:g}"
    return codebook_format(sorted(float(x) for x in v), label=name)


def selector_bits_per_weight(n_candidates: int, group_size: int) -> float:
    """Bits per weight of storing which of ``n_candidates`` types a group uses."""
    if n_candidates < 1 or group_size < 1:
        raise ValueError("n_candidates and group_size must be positive")
    return math.ceil(math.log2(n_candidates)) / group_size


def select_per_group(
    x: Float[Array, "*rows n"], candidates: Sequence[QuantConfig]
) -> tuple[Float[Array, "*rows n"], Int[Array, "*rows groups"]]:
    """Per-group datatype selection: ``(x_hat, choice)`` where each group of the last axis is
    reconstructed with the candidate of least squared error (BitMoD's ``search_datatype``).

    Every candidate must use ``granularity="group"`` along the last axis with one common
    ``group_size``; ``choice[..., g]`` is the index of the candidate chosen for group ``g``."""
    check_input(x, "select_per_group")
    if len(candidates) == 0:
        raise ValueError("select_per_group: needs at least one candidate config")
    sizes = set()
    for c in candidates:
        if not isinstance(c, QuantConfig):
            raise TypeError(f"select_per_group: candidates must be QuantConfig, got {type(c)}")
        if c.granularity != "group" or c.axis % x.ndim != x.ndim - 1:
            raise ValueError("select_per_group: every candidate must group the last axis")
        sizes.add(c.group_size)
    if len(sizes) != 1:
        raise ValueError(f"select_per_group: candidates use different group sizes {sizes}")
    g = sizes.pop()
    x32 = x.astype(jnp.float32)
    recon = jnp.stack([fake_quant(x32, c) for c in candidates])  # [C, *rows, n]
    err = jnp.stack([group_mse(x32, r, g) for r in recon])  # [C, *rows, groups]
    choice = jnp.argmin(err, axis=0).astype(jnp.int32)
    pick = jnp.repeat(choice, g, axis=-1)[None]  # [1, *rows, n]
    x_hat = jnp.take_along_axis(recon, pick, axis=0)[0]
    return x_hat.astype(x.dtype), choice


# --------------------------------------------------------------------------- bit planes


def _check_codes(codes, bits: int, who: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"{who}: bits must be an int in 1..8, got {bits!r}")
    if not jnp.issubdtype(jnp.asarray(codes).dtype, jnp.integer):
        raise TypeError(f"{who}: codes must be integers, got {jnp.asarray(codes).dtype}")
    if not isinstance(codes, jax.core.Tracer):
        c = np.asarray(codes)
        if c.size and (c.min() < 0 or c.max() >= 2**bits):
            raise ValueError(f"{who}: codes must lie in [0, 2**{bits})")


def bit_planes(codes: UInt8[Array, "*s"], bits: int) -> UInt8[Array, "bits *s"]:
    """Bit planes of unsigned codes: ``planes[i] = (codes >> i) & 1`` (so that
    ``codes == Σ_i 2^i planes[i]``)."""
    _check_codes(codes, bits, "bit_planes")
    c = jnp.asarray(codes).astype(jnp.uint8)
    shifts = jnp.arange(bits, dtype=jnp.uint8).reshape((bits,) + (1,) * c.ndim)
    return (c[None] >> shifts) & jnp.uint8(1)


def bipolar_values(codes, bits: int) -> Int[Array, "*s"]:
    """Bipolar-INT value of each code: ``Σ_i 2^i (2 c_i − 1) = 2c − (2^bits − 1)``."""
    _check_codes(codes, bits, "bipolar_values")
    return 2 * jnp.asarray(codes).astype(jnp.int32) - (2**bits - 1)


def int_values(codes, bits: int, *, signed: bool = True) -> Int[Array, "*s"]:
    """Two's-complement (``signed``) or unsigned integer value of each code."""
    _check_codes(codes, bits, "int_values")
    c = jnp.asarray(codes).astype(jnp.int32)
    return jnp.where(c >= 2 ** (bits - 1), c - 2**bits, c) if signed else c


def int_to_bipolar_codes(codes, bits: int) -> UInt8[Array, "*s"]:
    """Codes ``c XOR 2^(bits−1)``: the k-bit signed integer of code ``c`` equals
    ``(bipolar_values(c XOR 2^(bits−1)) − 1) / 2`` — a lossless affine map."""
    _check_codes(codes, bits, "int_to_bipolar_codes")
    return jnp.bitwise_xor(jnp.asarray(codes).astype(jnp.uint8), jnp.uint8(2 ** (bits - 1)))


def _packed_planes(codes: Array, bits: int) -> Array:
    """``codes [r, n]`` → bit planes packed along n: uint32 ``[bits, r, words]``."""
    return pack(bit_planes(codes, bits), 1, axis=-1, word_bits=32)


def _check_dot(a_codes, w_codes, bits_a: int, bits_w: int, bound: int, who: str) -> int:
    _check_codes(a_codes, bits_a, who)
    _check_codes(w_codes, bits_w, who)
    if jnp.ndim(a_codes) != 2 or jnp.ndim(w_codes) != 2:
        raise ValueError(f"{who}: expects a_codes [m, n] and w_codes [n, p]")
    n = a_codes.shape[1]
    if w_codes.shape[0] != n or n == 0:
        raise ValueError(f"{who}: inner dimensions {a_codes.shape} @ {w_codes.shape} do not match")
    if n * bound >= 2**31:
        raise ValueError(f"{who}: n={n} at these bit widths could overflow int32")
    return n


@functools.partial(jax.jit, static_argnums=(2, 3))
def _bipolar_dot(a_codes, w_codes, bits_a: int, bits_w: int):
    n = a_codes.shape[1]
    A = _packed_planes(a_codes, bits_a)  # [ba, m, words]
    W = _packed_planes(w_codes.T, bits_w)  # [bw, p, words]
    mism = jax.lax.population_count(A[:, None, :, None, :] ^ W[None, :, None, :, :])
    plane_dot = n - 2 * jnp.sum(mism.astype(jnp.int32), axis=-1)  # [ba, bw, m, p] ±1 products
    wgt = 2 ** (
        jnp.arange(bits_a, dtype=jnp.int32)[:, None] + jnp.arange(bits_w, dtype=jnp.int32)[None, :]
    )
    return jnp.sum(wgt[:, :, None, None] * plane_dot, axis=(0, 1))


def bipolar_dot_bitplanes(
    a_codes: UInt8[Array, "m n"], w_codes: UInt8[Array, "n p"], bits_a: int, bits_w: int
) -> Int[Array, "m p"]:
    """``bipolar_values(a) @ bipolar_values(w)`` from XOR-popcounts of packed bit planes:
    ``Σ_i Σ_j 2^(i+j) (n − 2·popcount(A_i XOR W_j))`` (arXiv 2409.17870). Exact, int32."""
    _check_dot(a_codes, w_codes, bits_a, bits_w, (2**bits_a - 1) * (2**bits_w - 1), "bipolar_dot")
    return _bipolar_dot(jnp.asarray(a_codes), jnp.asarray(w_codes), bits_a, bits_w)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _int_dot(a_codes, w_codes, bits_a: int, bits_w: int, signed_a: bool, signed_w: bool):
    A = _packed_planes(a_codes, bits_a)
    W = _packed_planes(w_codes.T, bits_w)
    both = jax.lax.population_count(A[:, None, :, None, :] & W[None, :, None, :, :])
    plane_dot = jnp.sum(both.astype(jnp.int32), axis=-1)  # [ba, bw, m, p]

    def plane_weights(bits: int, signed: bool):
        w = 2 ** jnp.arange(bits, dtype=jnp.int32)
        return w.at[bits - 1].multiply(-1) if signed else w

    wgt = plane_weights(bits_a, signed_a)[:, None] * plane_weights(bits_w, signed_w)[None, :]
    return jnp.sum(wgt[:, :, None, None] * plane_dot, axis=(0, 1))


def int_dot_bitplanes(
    a_codes: UInt8[Array, "m n"],
    w_codes: UInt8[Array, "n p"],
    bits_a: int,
    bits_w: int,
    *,
    signed_a: bool = True,
    signed_w: bool = True,
) -> Int[Array, "m p"]:
    """``int_values(a) @ int_values(w)`` from AND-popcounts of packed bit planes:
    ``Σ_i Σ_j s_i s_j 2^(i+j) popcount(A_i AND W_j)`` with ``s = −1`` on a signed number's top
    plane (two's complement) and ``+1`` elsewhere. Exact, int32."""
    _check_dot(a_codes, w_codes, bits_a, bits_w, 2**bits_a * 2**bits_w, "int_dot")
    return _int_dot(jnp.asarray(a_codes), jnp.asarray(w_codes), bits_a, bits_w, signed_a, signed_w)


# --------------------------------------------------------------------------- scaling-law forms


def _pos(name: str, v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} must be finite and > 0")
    return a


def qid_tokens_for_loss(
    dloss, N, P, *, k: float, alpha: float, beta: float, gamma: float
) -> np.ndarray:
    """Training tokens D at which ΔqLoss(N, D, P) = k·D^β / (N^α·P^γ) reaches ``dloss``:
    ``D = (dloss · N^α · P^γ / k)^(1/β)`` (arXiv 2411.17691; its Table 1 tabulates this)."""
    dl, n, p = _pos("dloss", dloss), _pos("N", N), _pos("P", P)
    if not (k > 0 and beta > 0):
        raise ValueError("k and beta must be > 0")
    return (dl * n**alpha * p**gamma / k) ** (1.0 / beta)


QID_FIXED_P_LAW = ParametricLaw(
    name="qid at a fixed bit width (arXiv 2411.17691)",
    param_names=("k", "alpha", "beta"),
    input_names=("N", "D"),
    f=lambda p, X: p["k"] * X["D"] ** p["beta"] / X["N"] ** p["alpha"],
    p0={"k": 1e-3, "alpha": 0.3, "beta": 0.5},
    bounds={"k": (1e-15, 1e6), "alpha": (-5.0, 5.0), "beta": (-5.0, 5.0)},
    log_params=frozenset({"k"}),
)


def fp_critical_data_size(
    N, E, M, B, *, d: float, alpha: float, beta: float, gamma: float, delta: float, nu: float
) -> np.ndarray:
    """The D minimising L(N, D, E, M, B) of arXiv 2501.02423 (Eq. 26) at fixed N, E, M, B.

    L = … + d/D^β + D^β·K with K = log2(B) / (N^α γ (E+½)^δ (M+½)^ν); dL/dD = 0 gives
    D^(2β) = d/K, i.e. ``D_crit = (d γ (E+½)^δ (M+½)^ν N^α / log2 B)^(1/(2β))``.
    More data than D_crit raises the predicted loss. Needs B > 1 (B = 1: no quantization term)."""
    n = _pos("N", N)
    e, m, b = (np.asarray(v, dtype=np.float64) for v in (E, M, B))
    if np.any(e < 0) or np.any(m < 0) or not np.all(np.isfinite(e + m)):
        raise ValueError("E and M must be finite and >= 0")
    if not np.all(np.isfinite(b)) or np.any(b <= 1):
        raise ValueError("B must be finite and > 1")
    K = np.log2(b) / (n**alpha * gamma * (e + 0.5) ** delta * (m + 0.5) ** nu)
    return (d / K) ** (1.0 / (2.0 * beta))


def fp_best_exponent_split(bits: int, *, delta: float, nu: float, signed: bool = True):
    """Integer (E, M) with E + M = bits − sign that maximises (E+½)^δ (M+½)^ν, i.e. minimises
    the quantization term of arXiv 2501.02423's law at a fixed storage width (E ≥ 1, M ≥ 0)."""
    if not isinstance(bits, int) or bits < 2 + int(signed):
        raise ValueError(f"bits must be an int >= {2 + int(signed)}, got {bits!r}")
    if not (delta >= 0 and nu >= 0):
        raise ValueError("delta and nu must be >= 0")
    total = bits - int(signed)
    splits = [(E, total - E) for E in range(1, total + 1)]
    score = [delta * math.log(E + 0.5) + nu * math.log(M + 0.5) for E, M in splits]
    return splits[int(np.argmax(score))]
