# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""Orthogonal and diagonal transforms that make weights and activations easier to quantize.

Contents
--------
* **Walsh–Hadamard transforms** (as used by QuaRot, arXiv 2404.00456).
  ``hadamard_transform(x, axis=-1)`` applies the orthonormal ``H_n`` to one axis in
  ``O(n log n)`` for ``n = 2^k`` (constant-geometry butterflies written as reshapes, no
  dense matmul) and, for ``n = m·2^k``, the Kronecker product ``H_n = Q_m ⊗ H_{2^k}``:

      x[..., n]  --reshape-->  x[..., m, 2^k]   (row-major: index i = a·2^k + b)
      FWHT on the last axis (size 2^k), then the small m×m matrix Q_m on axis -2.

  so ``hadamard_matrix(n) == kron(Q_m, H_{2^k})`` (both factors orthonormal) and
  ``hadamard_transform(x) == x @ hadamard_matrix(n).T``.  ``Q_m`` is a true Hadamard
  matrix (scaled by 1/√m) when one is known for ``m`` (Paley I: m = q+1, q ≡ 3 mod 4
  prime; Paley II: m = 2(q+1), q ≡ 1 mod 4 prime), otherwise the orthonormal DCT-II of
  the odd part of ``n``.  ``hadamard_factors(n)`` says which.  The model widths of this
  project all get true Hadamard matrices: 576 = 36·16 (Paley II, q=17),
  1536 = 12·128 (Paley I, q=11), 640 = 20·32 (Paley I, q=19), 2048 = 2^11.
  The Sylvester ordering is used: ``H[i, j] = (-1)^popcount(i & j) / √n`` (equal to
  ``scipy.linalg.hadamard(n) / √n``); it is symmetric, hence self-inverse.  A Paley I or
  DCT factor is not symmetric: use ``inverse_hadamard_transform`` (it applies ``Hᵀ``).
* **Randomised Hadamard** ``random_hadamard(n, key) = H · diag(d)`` with random signs
  ``d`` (QuaRot's randomised Hadamard: the signs make ``H`` behave like a random
  rotation, the Hadamard structure keeps it fast) and ``random_hadamard_transform``
  (the fast form, ``x ↦ H (d ⊙ x)``).
* **Haar-random orthogonal matrices** ``random_orthogonal(n, key)``: QR of a Gaussian
  matrix with the signs of ``diag(R)`` folded into ``Q`` (Mezzadri 2007, math-ph/0609050).
* **SmoothQuant channel smoothing** (arXiv 2211.10438, Eq. 4):
  ``s_j = max|X_j|^α / max|W_j|^(1−α)``; ``apply_smoothing`` returns ``(x / s, W * s)`` for
  ``W [out, in]`` and ``y = x @ W.T``, so the product is unchanged.
* **LoRC low-rank error compensation** (ZeroQuant-V2, arXiv 2303.08302):
  ``low_rank_compensation(W, W_hat, r) -> (U [out, r], V [r, in])``, the truncated SVD of
  ``E = W − Ŵ`` with ``√σ`` split to both sides, the best rank-r correction (Eckart–Young).

Conventions: all functions are pure and jit-compatible (sizes, ``axis`` and ``rank`` are
static).  Arithmetic runs in float32 for bfloat16/float16 inputs (cast back at the end)
and in the input dtype otherwise.  Bad input raises ``TypeError`` (non-float arrays) or
``ValueError`` (empty arrays, unsupported sizes, shape mismatches, and — when the array is
concrete, i.e. not traced under ``jit`` — NaN/Inf values).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

#: Largest non-power-of-two factor m handled with a dense m×m matrix.
MAX_SMALL_ORDER = 256

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- checks


def _as_float(x, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    h = _host(x)
    if h is not None and not np.isfinite(h).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _host(x: Array) -> np.ndarray | None:
    """A numpy view of a concrete array (None under tracing), for value checks on the
    host: no per-shape compilation of check ops."""
    if isinstance(x, jax.core.Tracer):
        return None
    h = np.asarray(x)
    return h.astype(np.float32) if h.dtype.itemsize < 4 else h


def _compute_dtype(*dtypes) -> jnp.dtype:
    """The widest of the given float dtypes, at least float32 (no implicit promotion)."""
    bits = max(jnp.finfo(d).bits for d in dtypes)
    return jnp.dtype(jnp.float64) if bits >= 64 else jnp.dtype(jnp.float32)


# ----------------------------------------------------------------- small factor matrices


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i) with χ the quadratic character of GF(q), q prime."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Hadamard matrix of order q+1, q ≡ 3 (mod 4) prime: H = I + [[0, 1ᵀ], [−1, Q]]."""
    m = q + 1
    s = np.zeros((m, m), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(m, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Hadamard matrix of order 2(q+1), q ≡ 1 (mod 4) prime, from the symmetric
    conference matrix C = [[0, 1ᵀ], [1, Q]]: H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, 1], [1, -1]], dtype=np.int64)
    b = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)


def _hadamard_kind(m: int) -> str | None:
    """Which construction gives a Hadamard matrix of order m (m not a power of two)."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _dct2(m: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: C[k, j] = c_k cos(π (2j+1) k / 2m)."""
    k = np.arange(m)[:, None]
    j = np.arange(m)[None, :]
    c = np.cos(np.pi * (2 * j + 1) * k / (2 * m)) * math.sqrt(2.0 / m)
    c[0, :] = math.sqrt(1.0 / m)
    return c


@dataclasses.dataclass(frozen=True, kw_only=True)
class HadamardFactors:
    """How ``hadamard_transform`` splits ``n = m · 2^k``."""

    n: int  # transform size
    m: int  # size of the dense factor Q_m (1 when n is a power of two)
    k: int  # log2 of the fast-Walsh–Hadamard factor
    kind: str  # Q_m: "sylvester" (m = 1), "paley1", "paley2" (Hadamard) or "dct" (DCT-II)

    @property
    def is_hadamard(self) -> bool:
        """True when every entry of the matrix is ±1/√n."""
        return self.kind != "dct"


@functools.cache
def hadamard_factors(n: int) -> HadamardFactors:
    """Choose ``n = m·2^k``: the smallest m with a known Hadamard matrix, else the odd part
    of n with a DCT-II factor.  Raises ValueError when that factor exceeds ``MAX_SMALL_ORDER``."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"transform size must be a positive integer, got {n!r}")
    n = int(n)
    k_max = (n & -n).bit_length() - 1  # exponent of the largest power of two dividing n
    if n == 1 << k_max:
        return HadamardFactors(n=n, m=1, k=k_max, kind="sylvester")
    for k in range(k_max, -1, -1):  # m = n / 2^k increasing
        m = n >> k
        if m > MAX_SMALL_ORDER:
            break
        kind = _hadamard_kind(m)
        if kind is not None:
            return HadamardFactors(n=n, m=m, k=k, kind=kind)
    m = n >> k_max
    if m > MAX_SMALL_ORDER:
        raise ValueError(
            f"no supported Hadamard factorization for n={n} = {m}·2^{k_max}: the odd factor "
            f"{m} exceeds MAX_SMALL_ORDER={MAX_SMALL_ORDER} and no known Hadamard order "
            f"{m}·2^j ≤ {MAX_SMALL_ORDER} exists"
        )
    return HadamardFactors(n=n, m=m, k=k_max, kind="dct")


@functools.cache
def _small_factor(n: int) -> np.ndarray:
    """The orthonormal float64 matrix Q_m of ``hadamard_factors(n)``."""
    f = hadamard_factors(n)
    if f.kind == "sylvester":
        return np.ones((1, 1))
    if f.kind == "dct":
        return _dct2(f.m)
    h = _paley1(f.m - 1) if f.kind == "paley1" else _paley2(f.m // 2 - 1)
    return h.astype(np.float64) / math.sqrt(f.m)


# ------------------------------------------------------------------ Hadamard transforms


def _fwht_last(x: Array) -> Array:
    """Unnormalised Walsh–Hadamard transform along the last axis (size n = 2^k).

    Constant-geometry butterflies (Pease 1968): every stage maps pairs (2i, 2i+1) to
    (i, i + n/2) as (a + b, a − b); k identical stages give the Sylvester-ordered H_n.
    One ``fori_loop`` body for all k keeps compile time flat in k; O(n log n) work."""
    n = x.shape[-1]

    def stage(_, y):
        y = y.reshape(y.shape[:-1] + (n // 2, 2))
        return jnp.concatenate([y[..., 0] + y[..., 1], y[..., 0] - y[..., 1]], axis=-1)

    return jax.lax.fori_loop(0, n.bit_length() - 1, stage, x) if n > 1 else x


def _hadamard_last(x: Array, transpose: bool) -> Array:
    n = x.shape[-1]
    f = hadamard_factors(n)
    cdt = _compute_dtype(x.dtype)
    y = x.astype(cdt)
    p = 1 << f.k
    if f.m == 1:
        y = _fwht_last(y)
    else:
        y = _fwht_last(y.reshape(x.shape[:-1] + (f.m, p)))
        q = _small_factor(n).T if transpose else _small_factor(n)
        y = jnp.einsum("ab,...bp->...ap", jnp.asarray(q, cdt), y, precision=_HIGHEST)
        y = y.reshape(x.shape)
    return (y * jnp.asarray(1.0 / math.sqrt(p), cdt)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("axis", "transpose"))
def _hadamard_along(x: Array, axis: int, transpose: bool) -> Array:
    return jnp.moveaxis(_hadamard_last(jnp.moveaxis(x, axis, -1), transpose), -1, axis)


def _check_axis(x: Array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} out of range for an array of rank {x.ndim}")
    hadamard_factors(x.shape[axis])  # raises on unsupported sizes before tracing
    return axis % x.ndim


def hadamard_transform(x: Float[Array, "*batch n"], *, axis: int = -1) -> Float[Array, "*batch n"]:
    """Orthonormal Hadamard transform ``x ↦ H_n x`` along ``axis`` (QuaRot, arXiv 2404.00456).

    Equals ``x @ hadamard_matrix(n).T`` for ``axis=-1``; O(n log n) for n = 2^k, plus
    ``O(n·m)`` for the dense factor when n = m·2^k (see the module docstring).
    """
    x = _as_float(x, "x")
    return _hadamard_along(x, _check_axis(x, axis), False)


def inverse_hadamard_transform(
    x: Float[Array, "*batch n"], *, axis: int = -1
) -> Float[Array, "*batch n"]:
    """``x ↦ H_nᵀ x``, the inverse of ``hadamard_transform`` (the same map when n = 2^k)."""
    x = _as_float(x, "x")
    return _hadamard_along(x, _check_axis(x, axis), True)


def hadamard_matrix(n: int, *, dtype=jnp.float32) -> Float[Array, "n n"]:
    """Dense orthonormal ``H_n = Q_m ⊗ H_{2^k}`` (Sylvester order), built independently of
    the fast transform with ``np.kron``; for tests and for folding into weights."""
    f = hadamard_factors(n)
    h = np.ones((1, 1))
    for _ in range(f.k):
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(np.kron(_small_factor(n), h / math.sqrt(1 << f.k)), dtype)


def random_signs(n: int, key: Array, *, dtype=jnp.float32) -> Float[Array, " n"]:
    """``n`` independent Rademacher signs ±1."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(dtype)


def random_hadamard(n: int, key: Array, *, dtype=jnp.float32) -> Float[Array, "n n"]:
    """Randomised Hadamard matrix ``H_n · diag(d)`` with random signs d (QuaRot):
    first flip signs, then rotate.  Orthogonal; ``x ↦ x @ R.T`` equals
    ``random_hadamard_transform(x, random_signs(n, key))``."""
    d = random_signs(n, key, dtype=dtype)
    return hadamard_matrix(n, dtype=dtype) * d[None, :]


def random_hadamard_transform(
    x: Float[Array, "*batch n"], signs: Float[Array, " n"], *, inverse: bool = False
) -> Float[Array, "*batch n"]:
    """Fast ``x ↦ H (d ⊙ x)`` along the last axis (``inverse=True``: ``d ⊙ (Hᵀ x)``)."""
    x = _as_float(x, "x")
    signs = _as_float(signs, "signs")
    if signs.shape != (x.shape[-1],):
        raise ValueError(f"signs must have shape ({x.shape[-1]},), got {signs.shape}")
    d = signs.astype(x.dtype).reshape((1,) * (x.ndim - 1) + signs.shape)
    if inverse:
        return inverse_hadamard_transform(x) * d
    return hadamard_transform(x * d)


def random_orthogonal(n: int, key: Array, *, dtype=jnp.float32) -> Float[Array, "n n"]:
    """Haar-distributed orthogonal matrix: ``G = QR`` with ``G`` Gaussian, then the signs of
    ``diag(R)`` moved into ``Q`` so that the distribution is exactly Haar (Mezzadri 2007)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return _random_orthogonal(key, n, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_orthogonal(key: Array, n: int, dtype) -> Array:
    cdt = _compute_dtype(dtype)
    g = jax.random.normal(key, (n, n), cdt)
    q, r = jnp.linalg.qr(g)
    sign = jnp.where(jnp.diagonal(r) >= 0, 1.0, -1.0).astype(cdt)
    return (q * sign[None, :]).astype(dtype)


# ------------------------------------------------------------------------- SmoothQuant


def smooth_scales(
    act_absmax: Float[Array, " in"], w_absmax: Float[Array, " in"], alpha: float = 0.5
) -> Float[Array, " in"]:
    """SmoothQuant migration scales (arXiv 2211.10438, Eq. 4):
    ``s_j = max|X_j|^α / max|W_j|^(1−α)``.

    ``act_absmax[j]`` is the calibration max of |x_j| over tokens, ``w_absmax[j]`` the max of
    |W[:, j]| over output channels.  A channel where either maximum is 0 (dead channel) gets
    ``s_j = 1``: there is nothing to migrate and dividing by 0 would be meaningless.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    a = _as_float(act_absmax, "act_absmax")
    w = _as_float(w_absmax, "w_absmax")
    if a.ndim != 1 or a.shape != w.shape:
        raise ValueError(
            f"act_absmax and w_absmax must be 1-D of equal length: {a.shape}, {w.shape}"
        )
    for arr, name in ((a, "act_absmax"), (w, "w_absmax")):
        h = _host(arr)
        if h is not None and (h < 0).any():
            raise ValueError(f"{name} must be non-negative")
    cdt = _compute_dtype(a.dtype, w.dtype)
    return _smooth_scales(a.astype(cdt), w.astype(cdt), jnp.asarray(alpha, cdt))


@jax.jit
def _smooth_scales(a: Array, w: Array, alpha: Array) -> Array:
    live = (a > 0) & (w > 0)
    one = jnp.ones_like(a)
    a_safe, w_safe = jnp.where(live, a, one), jnp.where(live, w, one)
    return jnp.where(live, a_safe**alpha / w_safe ** (1.0 - alpha), one)


def apply_smoothing(
    x: Float[Array, "*batch in"], W: Float[Array, "out in"], s: Float[Array, " in"]
) -> tuple[Float[Array, "*batch in"], Float[Array, "out in"]]:
    """``(x / s, W * s)`` for ``y = x @ W.T``: ``(x diag(s)⁻¹) (diag(s) Wᵀ) = x Wᵀ``
    (SmoothQuant Eq. 3).  In a model the division is folded into the previous
    LayerNorm / linear layer."""
    x = _as_float(x, "x")
    W = _as_float(W, "W")
    s = _as_float(s, "s")
    if W.ndim != 2 or s.shape != (W.shape[1],) or x.shape[-1] != W.shape[1]:
        raise ValueError(
            f"need x [..., in], W [out, in], s [in]: got {x.shape}, {W.shape}, {s.shape}"
        )
    h = _host(s)
    if h is not None and (h <= 0).any():
        raise ValueError("smoothing scales s must be positive")
    return _apply_smoothing(x, W, s)


@jax.jit
def _apply_smoothing(x: Array, W: Array, s: Array) -> tuple[Array, Array]:
    s_x = s.astype(x.dtype).reshape((1,) * (x.ndim - 1) + s.shape)
    return x / s_x, W * s.astype(W.dtype)[None, :]


# -------------------------------------------------------------------------------- LoRC


def low_rank_compensation(
    W: Float[Array, "out in"], W_hat: Float[Array, "out in"], rank: int
) -> tuple[Float[Array, "out r"], Float[Array, "r in"]]:
    """ZeroQuant-V2 LoRC (arXiv 2303.08302): ``E = W − Ŵ = U Σ Vᵀ``,
    ``Û = U_r Σ_r^{1/2}``, ``V̂ = Σ_r^{1/2} V_rᵀ``; ``Ŵ + Û V̂`` is the best rank-r
    correction of Ŵ in Frobenius and spectral norm (Eckart–Young).

    Returns ``(Û [out, r], V̂ [r, in])`` in the dtype of ``W`` (SVD in float32 or wider).
    """
    W = _as_float(W, "W")
    W_hat = _as_float(W_hat, "W_hat")
    if W.ndim != 2 or W.shape != W_hat.shape:
        raise ValueError(f"W and W_hat must be 2-D of equal shape: {W.shape}, {W_hat.shape}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must lie in [1, {min(W.shape)}], got {rank}")
    U, V = _lorc_all_ranks(W, W_hat)
    return U[:, :rank], V[:rank]


@jax.jit
def _lorc_all_ranks(W: Array, W_hat: Array) -> tuple[Array, Array]:
    """``(U Σ^{1/2}, Σ^{1/2} Vᵀ)`` for every rank (sliced by the caller: one compilation
    per shape, not per rank)."""
    cdt = _compute_dtype(W.dtype, W_hat.dtype)
    E = W.astype(cdt) - W_hat.astype(cdt)
    U, S, Vt = jnp.linalg.svd(E, full_matrices=False)
    root = jnp.sqrt(S)
    return (U * root[None, :]).astype(W.dtype), (root[:, None] * Vt).astype(W.dtype)
