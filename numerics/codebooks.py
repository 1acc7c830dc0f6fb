# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""Codebooks: weighted k-means, vector / residual / product quantization, lookup-table decoding.

Contents
* ``kmeans`` / ``kmeans_batched`` -- weighted Lloyd k-means on scalars (``x [n]``) or vectors
  (``x [n, d]``); ``kmeans_batched`` runs one independent k-means per row (``x [rows, n]``), e.g.
  SqueezeLLM's per-output-channel non-uniform levels (arXiv 2306.07629: the levels minimise the
  Fisher-weighted objective ``sum_i F_ii (w_i - Q(w_i))^2``).
* ``init_centroids`` (``"kmeans++"``, ``"random"``, ``"quantile"``) and ``assign``.
* ``vq_encode`` / ``vq_decode`` -- one codebook of ``d``-dim sub-vectors of the rows of a matrix
  (VPTQ, arXiv 2409.17066, uses Hessian-weighted k-means on such vectors);
  ``rvq_encode`` / ``rvq_decode`` -- residual (multi-stage) VQ, stage m quantizes what stages
  0..m-1 left over; ``pq_encode`` / ``pq_decode`` -- product quantization (Jegou et al. 2011):
  the columns are split into ``m`` subspaces, each with its own codebook.
* ``lut_decode`` -- codes -> vectors, a gather from the codebook; ``code_dtype``.

The objective. With per-element weights ``w`` (Fisher or Hessian diagonal; shape ``[n]`` -- one
weight per point -- or ``[n, d]`` -- one per coordinate) k-means minimises

    J(C, a) = sum_i sum_j w_ij (x_ij - C[a_i, j])^2 .

Lloyd iteration t: assign every point to its nearest centroid under the weighted distance (ties ->
the lowest index), record J, then move each centroid to the weighted mean of its points
(coordinate-wise; a coordinate whose weights sum to zero keeps its old value).

Empty clusters (no points, or points whose weights are all zero) are re-seeded deterministically:
the e-th empty cluster (in index order) moves onto the point with the e-th largest weighted
distance to its centroid in the assignment just made. The moved cluster had no weight in that
assignment, so J(C_{t+1}, a_t) <= J(C_t, a_t) still holds, and the next assignment can only lower
J: the recorded objective never increases (up to float32 rounding of the means).
``history`` has ``iters + 1`` entries: J after each of the ``iters`` assignments, then J of the
returned centroids with the returned assignments.

Everything is computed in float32; centroids come back in the input's dtype. Distances are formed
in blocks of at most ``_MAX_BLOCK`` elements of ``[points, k, d]`` (``lax.map``), so large k fits.
The public functions check their input (and raise ValueError / TypeError) and then call jitted
cores; iteration counts, k, d and the init method are static.
"""

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

Init = Literal["kmeans++", "random", "quantile"]
_INITS = ("kmeans++", "random", "quantile")
_MAX_BLOCK = 1 << 22  # elements of the [points, k, d] distance block formed at once


class KMeansResult(NamedTuple):
    centroids: Float[Array, "..."]  # [*rows, k, d] cluster centres; [*rows, k] for scalar input
    assignments: Int[Array, "*rows n"]  # int32 index of each point's centroid
    history: Float[Array, "*rows iters_plus_1"]  # objective J per Lloyd iteration (float32)


class VQCodes(NamedTuple):
    codes: Integer[Array, "rows m"]  # code of each d-dim sub-vector (uint8 / uint16 / int32)
    codebook: Float[Array, "k d"]
    history: Float[Array, "iters_plus_1"]  # k-means objective per iteration


class RVQCodes(NamedTuple):
    codes: Integer[Array, "stages rows m"]
    codebooks: Float[Array, "stages k d"]
    history: Float[Array, "stages iters_plus_1"]  # per stage: objective on that stage's residual


class PQCodes(NamedTuple):
    codes: Integer[Array, "rows m"]  # code of each row in each of the m subspaces
    codebooks: Float[Array, "m k s"]  # s = cols // m
    history: Float[Array, "m iters_plus_1"]


def code_dtype(k: int) -> np.dtype:
    """Smallest code dtype that holds indices 0..k-1: uint8 (k <= 256), uint16 (<= 65536), int32."""
    if k <= 256:
        return np.dtype(np.uint8)
    if k <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


# ----------------------------------------------------------------------------- input checks


def _float_array(x, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _weights(weights, shape: tuple[int, ...], name: str = "weights") -> Array:
    """Validate weights of shape ``shape`` (per element) or ``shape[:-1]`` (per point).

    Returns float32 weights broadcast to ``shape``; negative weights or a zero total per fit
    (over the last two axes) are rejected.
    """
    if weights is None:
        return jnp.ones(shape, jnp.float32)
    w = _float_array(weights, name)
    if w.shape == shape[:-1]:
        w = jnp.broadcast_to(jnp.expand_dims(w, -1), shape)
    elif w.shape != shape:
        raise ValueError(f"{name} must have shape {shape} or {shape[:-1]}, got {w.shape}")
    w = w.astype(jnp.float32)
    if not isinstance(w, jax.core.Tracer):
        if bool(jnp.any(w < 0)):
            raise ValueError(f"{name} must be non-negative")
        if bool(jnp.any(jnp.sum(w, axis=(-2, -1)) <= 0)):
            raise ValueError(f"{name} sum to zero: nothing to fit")
    return w


def _check_k_iters(k: int, n: int, iters: int, init: str, key) -> Array:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of points n={n}")
    if not isinstance(iters, int | np.integer) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if key is None:
        if init != "quantile":
            raise ValueError(f"init={init!r} needs a PRNG key")
        return jax.random.key(0)  # unused by the quantile init
    return key


def _matrix(W, name: str = "W") -> Array:
    W = _float_array(W, name)
    if W.ndim != 2:
        raise ValueError(f"{name} must be a matrix [rows, cols], got shape {W.shape}")
    return W


def _divides(d: int, cols: int, what: str) -> None:
    if not isinstance(d, int | np.integer) or d < 1:
        raise ValueError(f"{what} must be a positive integer, got {d!r}")
    if cols % d:
        raise ValueError(f"{what}={d} does not divide the width {cols}")


# ----------------------------------------------------------------------------- k-means core


def _log(p: Float[Array, " n"]) -> Float[Array, " n"]:
    return jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)


def _dist_to(x: Float[Array, "n d"], w: Float[Array, "n d"], c: Float[Array, " d"]):
    diff = x - c[None, :]
    return jnp.sum(w * diff * diff, axis=-1)


def _assign(
    x: Float[Array, "n d"], w: Float[Array, "n d"], c: Float[Array, "k d"], max_block=_MAX_BLOCK
):
    """Nearest centroid of every point (ties -> lowest index) and its weighted distance."""
    n, d = x.shape
    k = c.shape[0]

    def one(args):
        xi, wi = args
        diff = c - xi[None, :]
        dist = jnp.sum(wi[None, :] * diff * diff, axis=-1)
        j = jnp.argmin(dist)
        return j.astype(jnp.int32), dist[j]

    block = max(1, max_block // (k * d))
    if n <= block:
        return jax.vmap(one)((x, w))
    return jax.lax.map(one, (x, w), batch_size=block)


def _update(x, w, c, a, dmin):
    """Weighted means; empty clusters re-seeded on the farthest points (see module docstring)."""
    k = c.shape[0]
    sw = jax.ops.segment_sum(w, a, num_segments=k)  # [k, d]
    swx = jax.ops.segment_sum(w * x, a, num_segments=k)
    has = sw > 0
    mean = jnp.where(has, swx / jnp.where(has, sw, 1.0), c)
    empty = jnp.sum(sw, axis=-1) <= 0
    far = jax.lax.top_k(dmin, k)[1]
    rank = jnp.clip(jnp.cumsum(empty.astype(jnp.int32)) - 1, 0, k - 1)
    return jnp.where(empty[:, None], x[far[rank]], mean)


def _kmeanspp(x, w, key, k):
    """Weighted k-means++ (Arthur & Vassilvitskii 2007): P(pick i) ~ weighted D(x_i)^2."""
    n, d = x.shape
    omega = jnp.sum(w, axis=-1)
    first = jax.random.categorical(jax.random.fold_in(key, 0), _log(omega))
    C = jnp.zeros((k, d), jnp.float32).at[0].set(x[first])
    D = _dist_to(x, w, x[first])

    def body(j, carry):
        C, D = carry
        p = jnp.where(jnp.sum(D) > 0, D, omega)  # all remaining mass zero: duplicates unavoidable
        i = jax.random.categorical(jax.random.fold_in(key, j), _log(p))
        return C.at[j].set(x[i]), jnp.minimum(D, _dist_to(x, w, x[i]))

    C, _ = jax.lax.fori_loop(1, k, body, (C, D))
    return C


def _quantile_init(x, w, k):
    """Per-coordinate weighted quantiles at levels (j + 1/2) / k."""
    n = x.shape[0]
    levels = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k

    def column(xj, wj):
        order = jnp.argsort(xj)
        cw = jnp.cumsum(wj[order])
        idx = jnp.searchsorted(cw, levels * cw[-1], side="left")
        return xj[order][jnp.clip(idx, 0, n - 1)]

    return jax.vmap(column, in_axes=(1, 1), out_axes=1)(x, w)


def _init(x, w, key, k, init):
    if init == "kmeans++":
        return _kmeanspp(x, w, key, k)
    if init == "random":
        return x[jax.random.permutation(key, x.shape[0])[:k]]
    return _quantile_init(x, w, k)


def _kmeans_impl(x, w, key, k, iters, init):
    x = x.astype(jnp.float32)

    def step(c, _):
        a, dmin = _assign(x, w, c)
        return _update(x, w, c, a, dmin), jnp.sum(dmin)

    c, hist = jax.lax.scan(step, _init(x, w, key, k, init), None, length=iters)
    a, dmin = _assign(x, w, c)
    return c, a, jnp.concatenate([hist, jnp.sum(dmin)[None]])


_kmeans_core = jax.jit(_kmeans_impl, static_argnames=("k", "iters", "init"))
_init_core = jax.jit(_init, static_argnames=("k", "init"))
_assign_core = jax.jit(_assign, static_argnames=("max_block",))


@functools.partial(jax.jit, static_argnames=("k", "iters", "init"))
def _kmeans_batched_core(x, w, keys, k, iters, init):
    f = functools.partial(_kmeans_impl, k=k, iters=iters, init=init)
    return jax.vmap(f)(x, w, keys)


# ----------------------------------------------------------------------------- k-means API


def kmeans(
    x: Float[Array, "n *d"],
    k: int,
    *,
    weights: Float[Array, "n *d"] | None = None,
    iters: int = 25,
    key: Array | None = None,
    init: Init = "kmeans++",
) -> KMeansResult:
    """Weighted k-means (Lloyd) on scalars ``x [n]`` or vectors ``x [n, d]``.

    ``weights``: ``[n]`` (one per point) or the shape of ``x`` (one per element); default 1.
    ``key``: PRNG key, needed by ``"kmeans++"`` and ``"random"`` (``"quantile"`` is deterministic).
    Returns centroids ``[k]`` / ``[k, d]`` (dtype of x), int32 assignments ``[n]`` and the
    objective history ``[iters + 1]``, non-increasing (see the module docstring).
    """
    x = _float_array(x, "x")
    if x.ndim not in (1, 2):
        raise ValueError(f"x must be [n] or [n, d], got shape {x.shape}")
    xv = x[:, None] if x.ndim == 1 else x
    w = _weights(weights, xv.shape)
    key = _check_k_iters(k, xv.shape[0], iters, init, key)
    c, a, h = _kmeans_core(xv, w, key, k=int(k), iters=int(iters), init=init)
    c = c.astype(x.dtype)
    return KMeansResult(c[:, 0] if x.ndim == 1 else c, a, h)


def kmeans_batched(
    x: Float[Array, "rows n *d"],
    k: int,
    *,
    weights: Float[Array, "rows n *d"] | None = None,
    iters: int = 25,
    key: Array | None = None,
    init: Init = "kmeans++",
) -> KMeansResult:
    """One independent weighted k-means per row (vmap), e.g. per-output-channel levels.

    ``x [rows, n]`` gives scalar codebooks, centroids ``[rows, k]`` (SqueezeLLM, arXiv 2306.07629,
    with ``weights`` = the Fisher diagonal of the same shape); ``x [rows, n, d]`` gives vector
    codebooks ``[rows, k, d]``. Row r uses ``jax.random.split(key, rows)[r]``.
    """
    x = _float_array(x, "x")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be [rows, n] or [rows, n, d], got shape {x.shape}")
    xv = x[..., None] if x.ndim == 2 else x
    w = _weights(weights, xv.shape)
    key = _check_k_iters(k, xv.shape[1], iters, init, key)
    keys = jax.random.split(key, xv.shape[0])
    c, a, h = _kmeans_batched_core(xv, w, keys, k=int(k), iters=int(iters), init=init)
    c = c.astype(x.dtype)
    return KMeansResult(c[..., 0] if x.ndim == 2 else c, a, h)


def init_centroids(
    x: Float[Array, "n d"],
    k: int,
    *,
    weights: Float[Array, "n *d"] | None = None,
    key: Array | None = None,
    init: Init = "kmeans++",
) -> Float[Array, "k d"]:
    """The initial centroids ``kmeans`` starts from (vector form ``x [n, d]``).

    ``"kmeans++"``: weighted k-means++; every pick is a data point with positive weight whose
    weighted distance to the centroids chosen so far is positive, so the k centroids are distinct
    whenever x has k distinct positive-weight points. ``"random"``: k distinct indices, uniform.
    ``"quantile"``: per-coordinate weighted quantiles (natural for d = 1; deterministic).
    """
    x = _matrix(x, "x")
    w = _weights(weights, x.shape)
    key = _check_k_iters(k, x.shape[0], 1, init, key)
    return _init_core(x.astype(jnp.float32), w, key, k=int(k), init=init).astype(x.dtype)


def assign(
    x: Float[Array, "n d"],
    centroids: Float[Array, "k d"],
    *,
    weights: Float[Array, "n *d"] | None = None,
    max_block: int = _MAX_BLOCK,
) -> tuple[Int[Array, " n"], Float[Array, " n"]]:
    """Nearest centroid of each point under the weighted distance, and that distance.

    ``max_block``: most elements of the ``[points, k, d]`` difference block formed at once.
    """
    x = _matrix(x, "x")
    c = _matrix(centroids, "centroids")
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have d={c.shape[1]}, points d={x.shape[1]}")
    w = _weights(weights, x.shape)
    return _assign_core(x.astype(jnp.float32), w, c.astype(jnp.float32), max_block=max_block)


# ----------------------------------------------------------------------------- VQ / RVQ / PQ


def lut_decode(
    codes: Integer[Array, "*s"], codebook: Float[Array, "k *d"]
) -> Float[Array, "..."]:  # [*s, d], or [*s] for a scalar codebook
    """Lookup-table decoding: ``codebook[codes]`` (a gather along the codebook's first axis)."""
    codes = jnp.asarray(codes)
    codebook = jnp.asarray(codebook)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be an integer array, got dtype {codes.dtype}")
    if not isinstance(codes, jax.core.Tracer) and codes.size:
        if int(jnp.min(codes)) < 0 or int(jnp.max(codes)) >= codebook.shape[0]:
            raise ValueError(f"codes must lie in [0, {codebook.shape[0]})")
    return jnp.take(codebook, codes.astype(jnp.int32), axis=0)


def _prepare_matrix(W, weights) -> tuple[Array, Array]:
    """W [rows, cols] and its weights, given as [rows, cols] or per column [cols]."""
    W = _matrix(W)
    if weights is None:
        return W, jnp.ones(W.shape, jnp.float32)
    w = _float_array(weights, "weights")
    if w.shape == (W.shape[1],):
        w = jnp.broadcast_to(w[None, :], W.shape)
    elif w.shape != W.shape:
        raise ValueError(f"weights must be [rows, cols] = {W.shape} or [cols], got {w.shape}")
    return W, _weights(w, W.shape)


def vq_encode(
    W: Float[Array, "rows cols"],
    *,
    d: int,
    k: int,
    weights: Float[Array, "rows cols"] | Float[Array, " cols"] | None = None,
    iters: int = 25,
    key: Array | None = None,
    init: Init = "kmeans++",
) -> VQCodes:
    """Vector quantization: rows of W cut into d-dim sub-vectors, one k-entry codebook for all.

    ``weights`` per element ``[rows, cols]`` or per input column ``[cols]`` (a Hessian diagonal).
    """
    W, w = _prepare_matrix(W, weights)
    rows, cols = W.shape
    _divides(d, cols, "d")
    n = rows * cols // d
    key = _check_k_iters(k, n, iters, init, key)
    c, a, h = _kmeans_core(
        W.reshape(n, d), w.reshape(n, d), key, k=int(k), iters=int(iters), init=init
    )
    return VQCodes(a.astype(code_dtype(k)).reshape(rows, cols // d), c.astype(W.dtype), h)


def vq_decode(codes: Integer[Array, "rows m"], codebook: Float[Array, "k d"]):
    """Inverse of ``vq_encode``: ``[rows, m]`` codes -> ``[rows, m * d]`` matrix."""
    v = lut_decode(codes, codebook)
    return v.reshape(v.shape[:-2] + (v.shape[-2] * v.shape[-1],))


@functools.partial(jax.jit, static_argnames=("k", "iters", "init", "stages"))
def _rvq_core(x, w, key, k, iters, init, stages):
    def stage(r, m):
        c, a, h = _kmeans_impl(r, w, jax.random.fold_in(key, m), k, iters, init)
        return r - c[a], (c, a, h)

    _, out = jax.lax.scan(stage, x.astype(jnp.float32), jnp.arange(stages))
    return out


def rvq_encode(
    W: Float[Array, "rows cols"],
    *,
    d: int,
    k: int,
    stages: int,
    weights: Float[Array, "rows cols"] | Float[Array, " cols"] | None = None,
    iters: int = 25,
    key: Array | None = None,
    init: Init = "kmeans++",
) -> RVQCodes:
    """Residual VQ: stage m runs weighted k-means on R_m = W - sum_{l<m} decode_l (R_0 = W).

    Stage m uses ``jax.random.fold_in(key, m)``, so the first M stages of a run equal a run with
    ``stages=M``. Since every stage does >= 1 Lloyd update, its objective is at most that of the
    all-zero codebook, ``||R_m||_w^2``: the weighted error never grows with more stages.
    """
    W, w = _prepare_matrix(W, weights)
    rows, cols = W.shape
    _divides(d, cols, "d")
    if not isinstance(stages, int | np.integer) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    n = rows * cols // d
    key = _check_k_iters(k, n, iters, init, key)
    c, a, h = _rvq_core(
        W.reshape(n, d),
        w.reshape(n, d),
        key,
        k=int(k),
        iters=int(iters),
        init=init,
        stages=int(stages),
    )
    codes = a.astype(code_dtype(k)).reshape(stages, rows, cols // d)
    return RVQCodes(codes, c.astype(W.dtype), h)


def rvq_decode(codes: Integer[Array, "stages rows m"], codebooks: Float[Array, "stages k d"]):
    """Sum of the stages' decodings; pass ``codes[:M], codebooks[:M]`` for the first M stages."""
    codes, codebooks = jnp.asarray(codes), jnp.asarray(codebooks)
    if codes.ndim != 3 or codebooks.ndim != 3 or codes.shape[0] != codebooks.shape[0]:
        raise ValueError(
            f"need codes [M, rows, m], codebooks [M, k, d]; got {codes.shape}, {codebooks.shape}"
        )
    parts = [vq_decode(codes[m], codebooks[m]) for m in range(codes.shape[0])]
    return functools.reduce(jnp.add, parts)


@functools.partial(jax.jit, static_argnames=("k", "iters", "init"))
def _pq_core(x, w, key, k, iters, init):
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(x.shape[0]))
    f = functools.partial(_kmeans_impl, k=k, iters=iters, init=init)
    return jax.vmap(f)(x, w, keys)


def pq_encode(
    W: Float[Array, "rows cols"],
    *,
    m: int,
    k: int,
    weights: Float[Array, "rows cols"] | Float[Array, " cols"] | None = None,
    iters: int = 25,
    key: Array | None = None,
    init: Init = "kmeans++",
) -> PQCodes:
    """Product quantization (Jegou, Douze, Schmid 2011, "Product quantization for nearest
    neighbor search"): columns split into m subspaces of width s = cols/m; subspace j's
    rows are clustered with their own k-entry codebook (key ``fold_in(key, j)``)."""
    W, w = _prepare_matrix(W, weights)
    rows, cols = W.shape
    _divides(m, cols, "m")
    key = _check_k_iters(k, rows, iters, init, key)
    s = cols // m
    xs = W.reshape(rows, m, s).transpose(1, 0, 2)
    ws = w.reshape(rows, m, s).transpose(1, 0, 2)
    c, a, h = _pq_core(xs, ws, key, k=int(k), iters=int(iters), init=init)
    return PQCodes(a.T.astype(code_dtype(k)), c.astype(W.dtype), h)


def pq_decode(codes: Integer[Array, "rows m"], codebooks: Float[Array, "m k s"]):
    """Inverse of ``pq_encode``: ``[rows, m]`` codes -> ``[rows, m * s]`` matrix."""
    codes, codebooks = jnp.asarray(codes), jnp.asarray(codebooks)
    if codes.ndim != 2 or codebooks.ndim != 3 or codes.shape[1] != codebooks.shape[0]:
        raise ValueError(
            f"need codes [rows, m], codebooks [m, k, s]; got {codes.shape}, {codebooks.shape}"
        )
    parts = [lut_decode(codes[:, j], codebooks[j]) for j in range(codes.shape[1])]
    return jnp.concatenate(parts, axis=-1)
