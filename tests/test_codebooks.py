"""Weighted k-means, VQ / RVQ / PQ and LUT decoding (numerics.codebooks).

Shapes are fixed per test (hypothesis varies the data), so each jitted core compiles once.
Float tolerances are float32 rounding of sums over the n points: rtol = n * eps(float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numerics import codebooks as cb

EPS = float(np.finfo(np.float32).eps)
seeds = st.integers(0, 2**32 - 1)


def _points(seed, n, d, discrete=False):
    rng = np.random.default_rng(seed)
    if discrete:  # few distinct values -> duplicate k-means++ picks and empty clusters
        return rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    centres = rng.normal(scale=4.0, size=(5, d))
    return (centres[rng.integers(0, 5, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _objective(x, w, c, a):
    """J = sum_ij w_ij (x_ij - c[a_i, j])^2 in float64."""
    x, w, c, a = (np.asarray(v, np.float64) for v in (x, w, c, a))
    return float(np.sum(w * (x - c[a.astype(np.int64)]) ** 2))


def _dists(x, w, c):
    x, w, c = (np.asarray(v, np.float64) for v in (x, w, c))
    return np.sum(w[:, None, :] * (x[:, None, :] - c[None, :, :]) ** 2, axis=-1)


# ----------------------------------------------------------------------------- k-means


@given(
    seed=seeds,
    init=st.sampled_from(["kmeans++", "random", "quantile"]),
    weighted=st.booleans(),
    discrete=st.booleans(),
)
def test_kmeans_objective_never_increases(seed, init, weighted, discrete):
    """Vectors (d = 2); the scalar case is the same code path (d = 1), see the batched test."""
    n, d, k, iters = 96, 2, 8, 8
    x = _points(seed, n, d, discrete)
    rng = np.random.default_rng(seed + 1)
    w = rng.gamma(0.5, size=(n, d)).astype(np.float32) if weighted else np.ones((n, d), np.float32)
    res = cb.kmeans(
        jnp.asarray(x), k, weights=jnp.asarray(w), iters=iters, key=jax.random.key(seed), init=init
    )
    h = np.asarray(res.history, np.float64)
    assert h.shape == (iters + 1,)
    assert np.all(h[1:] <= h[:-1] * (1 + n * EPS) + 1e-30), h
    # the last entry is the objective of the returned centroids and assignments ...
    J = _objective(x, w, res.centroids, res.assignments)
    np.testing.assert_allclose(h[-1], J, rtol=n * EPS, atol=1e-30)
    # ... and every point sits at a nearest centroid
    D = _dists(x, w, res.centroids)
    a = np.asarray(res.assignments)
    assert np.all(D[np.arange(n), a] <= D.min(axis=1) * (1 + 4 * d * EPS) + 1e-30)


@given(seed=seeds)
def test_kmeans_scalar_shape_and_per_point_weights(seed):
    x = _points(seed, 48, 1)  # the per-row shape of the batched test: no new compile
    w = np.random.default_rng(seed).uniform(0.1, 2.0, size=48).astype(np.float32)
    key = jax.random.key(seed)
    r1 = cb.kmeans(jnp.asarray(x[:, 0]), 4, weights=jnp.asarray(w), iters=6, key=key)
    r2 = cb.kmeans(jnp.asarray(x), 4, weights=jnp.asarray(w), iters=6, key=key)
    assert r1.centroids.shape == (4,) and r2.centroids.shape == (4, 1)
    np.testing.assert_array_equal(r1.centroids, r2.centroids[:, 0])
    np.testing.assert_array_equal(r1.assignments, r2.assignments)


@given(seed=seeds, heavy=st.floats(5.0, 1000.0))
def test_heavy_weight_pulls_its_centroid(seed, heavy):
    """Two groups 100 apart, k = 2: the converged centroid of group A is A's weighted mean, so a
    point with weight `heavy` > 1 ends closer to its centroid than with uniform weights:
    |p - c_w| = |S - (n-1)p| / (heavy + n - 1)  <  |S - (n-1)p| / n = |p - c_u|."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 1, 12), rng.uniform(100, 101, 12)
    x = np.concatenate([a, b]).astype(np.float32)
    i = int(rng.integers(0, 12))
    w = np.ones(24, np.float32)
    w[i] = heavy
    key = jax.random.key(seed)
    ru = cb.kmeans(jnp.asarray(x), 2, iters=6, key=key)
    rw = cb.kmeans(jnp.asarray(x), 2, weights=jnp.asarray(w), iters=6, key=key)
    for r in (ru, rw):  # both found the two groups
        lab = np.asarray(r.assignments)
        assert len(set(lab[:12])) == 1 and len(set(lab[12:])) == 1 and lab[0] != lab[12]
    cu = float(ru.centroids[ru.assignments[i]])
    cw = float(rw.centroids[rw.assignments[i]])
    np.testing.assert_allclose(cw, np.sum(w[:12] * a) / np.sum(w[:12]), rtol=1e-5)
    assert abs(x[i] - cw) < abs(x[i] - cu)


@given(seed=seeds, zero_half=st.booleans())
def test_kmeanspp_picks_distinct_positive_weight_points(seed, zero_half):
    n, k = 40, 12
    x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    w = np.ones(n, np.float32)
    if zero_half:
        w[::2] = 0.0
    c = np.asarray(
        cb.init_centroids(jnp.asarray(x), k, weights=jnp.asarray(w), key=jax.random.key(seed))
    )
    assert len({tuple(r) for r in c}) == k  # distinct
    idx = [int(np.flatnonzero(np.all(x == r, axis=1))[0]) for r in c]  # each is a data point
    assert all(w[i] > 0 for i in idx)


@given(seed=seeds)
def test_k_equal_n_fits_exactly(seed):
    x = np.random.default_rng(seed).normal(size=(10, 2)).astype(np.float32)
    res = cb.kmeans(jnp.asarray(x), 10, iters=2, key=jax.random.key(seed))
    assert float(res.history[0]) == 0.0 and float(res.history[-1]) == 0.0
    assert sorted(map(tuple, np.asarray(res.centroids))) == sorted(map(tuple, x))


def test_quantile_init_is_weighted_quantiles():
    x = jnp.arange(100, dtype=jnp.float32)[:, None]
    c = cb.init_centroids(x, 4, init="quantile")
    np.testing.assert_array_equal(c[:, 0], [12.0, 37.0, 62.0, 87.0])
    w = jnp.ones(100, jnp.float32).at[99].set(1000.0)  # all weight at 99 -> every level there
    c = cb.init_centroids(x, 4, weights=w, init="quantile")
    np.testing.assert_array_equal(c[:, 0], [99.0] * 4)
    # kmeans from this degenerate start re-seeds the 3 empty clusters and still descends
    res = cb.kmeans(x[:, 0], 4, weights=w, iters=5, init="quantile")
    h = np.asarray(res.history)
    assert len(set(np.asarray(res.centroids).tolist())) == 4
    assert np.all(h[1:] <= h[:-1] * (1 + 100 * EPS)) and h[-1] < h[0]


@given(seed=seeds)
def test_kmeans_batched_is_per_row_kmeans(seed):
    rows, n, k = 4, 48, 4
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, n)).astype(np.float32)
    fisher = (x**2 + 0.01).astype(np.float32)  # SqueezeLLM-style per-element weights
    key = jax.random.key(seed)
    res = cb.kmeans_batched(jnp.asarray(x), k, weights=jnp.asarray(fisher), iters=6, key=key)
    assert res.centroids.shape == (rows, k) and res.history.shape == (rows, 7)
    keys = jax.random.split(key, rows)
    for r in range(rows):
        one = cb.kmeans(jnp.asarray(x[r]), k, weights=jnp.asarray(fisher[r]), iters=6, key=keys[r])
        np.testing.assert_allclose(res.centroids[r], one.centroids, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(res.assignments[r], one.assignments)
    h = np.asarray(res.history, np.float64)
    assert np.all(h[:, 1:] <= h[:, :-1] * (1 + n * EPS))


def test_kmeans_is_jittable_and_deterministic():
    x = jnp.asarray(_points(0, 96, 2))  # the shapes of the monotonicity test: no new compile
    key = jax.random.key(3)
    eager = cb.kmeans(x, 8, iters=8, key=key)
    jitted = jax.jit(lambda x: cb.kmeans(x, 8, iters=8, key=key))(x)
    again = cb.kmeans(x, 8, iters=8, key=key)
    np.testing.assert_allclose(jitted.centroids, eager.centroids, rtol=1e-6)
    np.testing.assert_array_equal(again.centroids, eager.centroids)


def test_large_k_uses_blocked_distances():
    """k * d above the block size: the lax.map path must agree with a direct argmin."""
    x = jnp.asarray(_points(1, 600, 4))
    c = x[:300] + 0.01
    a, dist = cb.assign(x, c, max_block=300 * 4 * 16)  # blocks of 16 points, 600 = 37.5 blocks
    D = _dists(x, np.ones_like(x), c)
    np.testing.assert_array_equal(a, np.argmin(D, axis=1))
    np.testing.assert_allclose(dist, D.min(axis=1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- VQ / RVQ / PQ


def test_code_dtype():
    assert cb.code_dtype(2) == np.uint8 and cb.code_dtype(256) == np.uint8
    assert cb.code_dtype(257) == np.uint16 and cb.code_dtype(65536) == np.uint16
    assert cb.code_dtype(65537) == np.int32


@given(seed=seeds, per_column=st.booleans())
def test_vq_encode_decode(seed, per_column):
    rows, cols, d, k = 16, 32, 4, 16
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(rows, cols)).astype(np.float32)
    h = rng.uniform(0.1, 3.0, size=cols).astype(np.float32)  # Hessian diagonal per column
    weights = h if per_column else np.broadcast_to(h, W.shape).copy()
    v = cb.vq_encode(jnp.asarray(W), d=d, k=k, weights=jnp.asarray(weights), iters=6,
                     key=jax.random.key(seed))  # fmt: skip
    assert v.codes.shape == (rows, cols // d) and v.codes.dtype == np.uint8
    assert v.codebook.shape == (k, d) and v.codebook.dtype == np.float32
    W_hat = np.asarray(cb.vq_decode(v.codes, v.codebook))
    assert W_hat.shape == W.shape
    err = float(np.sum(h[None, :].astype(np.float64) * (W - W_hat) ** 2))
    np.testing.assert_allclose(float(v.history[-1]), err, rtol=(rows * cols // d) * EPS)
    # each sub-vector decodes to one codebook entry
    np.testing.assert_array_equal(
        W_hat.reshape(-1, d), np.asarray(v.codebook)[np.asarray(v.codes).reshape(-1)]
    )


@given(seed=seeds, weighted=st.booleans())
def test_rvq_error_never_increases_with_stages(seed, weighted):
    rows, cols, d, k, M = 16, 32, 4, 16, 4
    rng = np.random.default_rng(seed)
    W = rng.standard_t(4, size=(rows, cols)).astype(np.float32)
    h = (
        rng.uniform(0.1, 3.0, size=cols).astype(np.float32)
        if weighted
        else np.ones(cols, np.float32)
    )
    key = jax.random.key(seed)
    r = cb.rvq_encode(jnp.asarray(W), d=d, k=k, stages=M, weights=jnp.asarray(h), iters=5, key=key)
    assert r.codes.shape == (M, rows, cols // d) and r.codebooks.shape == (M, k, d)
    errs = [float(np.sum(h * W.astype(np.float64) ** 2))]
    for m in range(1, M + 1):
        W_hat = np.asarray(cb.rvq_decode(r.codes[:m], r.codebooks[:m]), np.float64)
        errs.append(float(np.sum(h * (W - W_hat) ** 2)))
        np.testing.assert_allclose(float(r.history[m - 1, -1]), errs[-1], rtol=1e-4)
    n = rows * cols // d
    assert all(b <= a * (1 + n * EPS) for a, b in zip(errs, errs[1:], strict=False)), errs
    # stage keys are fold_in(key, m): the first 2 stages are a 2-stage run
    r2 = cb.rvq_encode(jnp.asarray(W), d=d, k=k, stages=2, weights=jnp.asarray(h), iters=5, key=key)
    np.testing.assert_array_equal(r2.codes, r.codes[:2])


@given(seed=seeds)
def test_pq_encode_decode(seed):
    rows, cols, m, k = 32, 24, 4, 8
    W = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    p = cb.pq_encode(jnp.asarray(W), m=m, k=k, iters=6, key=jax.random.key(seed))
    assert p.codes.shape == (rows, m) and p.codes.dtype == np.uint8
    assert p.codebooks.shape == (m, k, cols // m) and p.history.shape == (m, 7)
    W_hat = np.asarray(cb.pq_decode(p.codes, p.codebooks))
    assert W_hat.shape == W.shape
    for j in range(m):  # subspace j decodes from its own codebook
        sl = slice(j * 6, (j + 1) * 6)
        np.testing.assert_array_equal(
            W_hat[:, sl], np.asarray(p.codebooks[j])[np.asarray(p.codes[:, j])]
        )
    err = float(np.sum((W.astype(np.float64) - W_hat) ** 2))
    np.testing.assert_allclose(float(jnp.sum(p.history[:, -1])), err, rtol=rows * EPS * m)
    h = np.asarray(p.history, np.float64)
    assert np.all(h[:, 1:] <= h[:, :-1] * (1 + rows * EPS))


@given(
    codes=hnp.arrays(np.int32, (3, 5), elements=st.integers(0, 6)),
    book=hnp.arrays(np.float32, (7, 3), elements=st.floats(-10, 10, width=32)),
)
def test_lut_decode_equals_gather(codes, book):
    out = np.asarray(cb.lut_decode(jnp.asarray(codes), jnp.asarray(book)))
    np.testing.assert_array_equal(out, book[codes])
    for dt in (np.uint8, np.uint16):
        np.testing.assert_array_equal(
            cb.lut_decode(jnp.asarray(codes.astype(dt)), jnp.asarray(book)), out
        )
    one_hot = np.eye(7, dtype=np.float64)[codes]  # the same as a one-hot matmul
    np.testing.assert_allclose(out, one_hot @ book.astype(np.float64), rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises():
    key = jax.random.key(0)
    x = jnp.ones((10, 2), jnp.float32).at[:, 0].set(jnp.arange(10.0))
    with pytest.raises(TypeError, match="floating"):
        cb.kmeans(jnp.arange(10), 2, key=key)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cb.kmeans(x.at[3, 1].set(jnp.nan), 2, key=key)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cb.kmeans(x.at[3, 1].set(jnp.inf), 2, key=key)
    with pytest.raises(ValueError, match="larger than the number of points"):
        cb.kmeans(x, 11, key=key)
    with pytest.raises(ValueError, match="positive integer"):
        cb.kmeans(x, 0, key=key)
    with pytest.raises(ValueError, match="empty"):
        cb.kmeans(jnp.zeros((0, 2), jnp.float32), 1, key=key)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        cb.kmeans(x, 2)
    with pytest.raises(ValueError, match="init must be"):
        cb.kmeans(x, 2, key=key, init="kmeans")
    with pytest.raises(ValueError, match="iters"):
        cb.kmeans(x, 2, key=key, iters=0)
    with pytest.raises(ValueError, match="non-negative"):
        cb.kmeans(x, 2, key=key, weights=-jnp.ones(10, jnp.float32))
    with pytest.raises(ValueError, match="sum to zero"):
        cb.kmeans(x, 2, key=key, weights=jnp.zeros(10, jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        cb.kmeans(x, 2, key=key, weights=jnp.ones(9, jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        cb.kmeans(x, 2, key=key, weights=jnp.ones(10, jnp.int32))
    W = jnp.ones((4, 6), jnp.float32)
    with pytest.raises(ValueError, match="does not divide"):
        cb.vq_encode(W, d=4, k=2, key=key)
    with pytest.raises(ValueError, match="does not divide"):
        cb.pq_encode(W, m=4, k=2, key=key)
    with pytest.raises(ValueError, match="larger than the number of points"):
        cb.pq_encode(W, m=2, k=5, key=key)
    with pytest.raises(ValueError, match="matrix"):
        cb.vq_encode(jnp.ones(8, jnp.float32), d=2, k=2, key=key)
    with pytest.raises(TypeError, match="floating"):
        cb.rvq_encode(jnp.ones((4, 6), jnp.int8), d=2, k=2, stages=2, key=key)
    with pytest.raises(ValueError, match="stages"):
        cb.rvq_encode(W, d=2, k=2, stages=0, key=key)
    with pytest.raises(TypeError, match="integer"):
        cb.lut_decode(jnp.zeros(3, jnp.float32), jnp.ones((4, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cb.lut_decode(jnp.asarray([0, 4]), jnp.ones((4, 2), jnp.float32))
