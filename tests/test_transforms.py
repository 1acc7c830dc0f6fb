"""Tests for numerics.transforms: Hadamard / random rotations, SmoothQuant, LoRC."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from numerics import transforms as T

# widths of SmolLM2 (576, 1536) and Gemma-3 (640, 2048), Paley orders, and DCT fall-backs
NON_POW2 = [12, 20, 28, 36, 56, 576, 1536, 640, 3, 9, 18, 22]
MODEL_WIDTHS = [576, 1536, 640, 2048]


def _rand(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# ------------------------------------------------------------------ Hadamard: structure


@given(k=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_fwht_equals_scipy_hadamard_product(k, seed):
    """Fast transform == dense Sylvester matrix of scipy (an independent oracle).
    (All tests use x [3, n] where they can: one compilation per n for the whole file.)"""
    n = 2**k
    x = _rand(seed, (3, n))
    want = _f64(x) @ scipy.linalg.hadamard(n).T / math.sqrt(n)
    got = _f64(T.hadamard_transform(x))
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, math.sqrt(k)), rtol=1e-5)


@pytest.mark.parametrize("lead", [(), (2, 5)])
def test_leading_shapes(lead):
    n = 32
    x = _rand(0, lead + (n,))
    want = _f64(x) @ scipy.linalg.hadamard(n).T / math.sqrt(n)
    got = _f64(T.hadamard_transform(x))
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 64, 1024] + NON_POW2 + [2048])
def test_hadamard_matrix_is_orthogonal(n):
    H = _f64(T.hadamard_matrix(n))
    np.testing.assert_allclose(H @ H.T, np.eye(n), atol=2e-6)  # square: also HᵀH = I


@pytest.mark.parametrize("n", NON_POW2 + [256])
def test_fast_transform_equals_dense_matrix(n):
    x = _rand(n, (3, n))
    H = _f64(T.hadamard_matrix(n))
    np.testing.assert_allclose(_f64(T.hadamard_transform(x)), _f64(x) @ H.T, atol=2e-5)
    np.testing.assert_allclose(_f64(T.inverse_hadamard_transform(x)), _f64(x) @ H, atol=2e-5)


@pytest.mark.parametrize("n", MODEL_WIDTHS + [12, 20, 28, 36])
def test_model_widths_get_true_hadamard_matrices(n):
    """Every entry is ±1/√n: the incoherence property QuaRot relies on."""
    f = T.hadamard_factors(n)
    assert f.is_hadamard and f.m * 2**f.k == n
    H = _f64(T.hadamard_matrix(n))
    np.testing.assert_allclose(np.abs(H), 1 / math.sqrt(n), rtol=1e-6)


def test_factor_choice_is_documented_one():
    assert T.hadamard_factors(576) == T.HadamardFactors(n=576, m=36, k=4, kind="paley2")
    assert T.hadamard_factors(1536) == T.HadamardFactors(n=1536, m=12, k=7, kind="paley1")
    assert T.hadamard_factors(640) == T.HadamardFactors(n=640, m=20, k=5, kind="paley1")
    assert T.hadamard_factors(6912) == T.HadamardFactors(n=6912, m=108, k=6, kind="paley1")
    assert T.hadamard_factors(18).kind == "dct"  # no Hadamard of order 9 or 18
    # layout: H_n = kron(Q_m, H_{2^k}) with x reshaped to [..., m, 2^k]
    n, f = 640, T.hadamard_factors(640)
    H = _f64(T.hadamard_matrix(n))
    Hp = scipy.linalg.hadamard(2**f.k) / math.sqrt(2**f.k)
    Q = H[:: 2**f.k, :: 2**f.k] / Hp[0, 0]  # blocks (a, a') scaled by H_p[0, 0]
    np.testing.assert_allclose(H, np.kron(Q, Hp), atol=1e-6)


# ------------------------------------------------------- Hadamard: norm, inverse, axis


@given(
    n=st.sampled_from([1, 2, 8, 128] + NON_POW2),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_norm_preserved_and_round_trip(n, seed, scale):
    x = _rand(seed, (3, n)) * np.float32(scale)
    y = T.hadamard_transform(x)
    np.testing.assert_allclose(
        np.linalg.norm(_f64(y), axis=-1), np.linalg.norm(_f64(x), axis=-1), rtol=1e-5
    )
    back = _f64(T.inverse_hadamard_transform(y))
    np.testing.assert_allclose(back, _f64(x), atol=2e-6 * scale * math.sqrt(n))


@given(k=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_power_of_two_transform_is_self_inverse(k, seed):
    x = _rand(seed, (3, 2**k))
    np.testing.assert_allclose(
        _f64(T.hadamard_transform(T.hadamard_transform(x))), _f64(x), atol=1e-5
    )
    np.testing.assert_array_equal(
        np.asarray(T.hadamard_transform(x)), np.asarray(T.inverse_hadamard_transform(x))
    )


@pytest.mark.parametrize("n", [64, 576])
def test_axis_argument(n):
    x = _rand(1, (n, 5, 3))
    got = T.hadamard_transform(x, axis=0)
    want = jnp.moveaxis(T.hadamard_transform(jnp.moveaxis(x, 0, -1)), -1, 0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(_f64(T.inverse_hadamard_transform(got, axis=-3)), _f64(x), atol=1e-5)


@pytest.mark.parametrize("n", [256, 1536])
def test_jit_matches_eager_and_bf16_is_close(n):
    x = _rand(2, (3, n))
    eager = T.hadamard_transform(x)
    np.testing.assert_allclose(
        np.asarray(jax.jit(T.hadamard_transform)(x)), np.asarray(eager), atol=1e-6
    )
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = T.hadamard_transform(xb)
    assert yb.dtype == jnp.bfloat16
    ref = _f64(T.hadamard_transform(np.asarray(xb, np.float32)))
    np.testing.assert_allclose(_f64(yb), ref, atol=2e-2 * np.abs(ref).max())


# ------------------------------------------------------- random Hadamard, orthogonal


@pytest.mark.parametrize("n", [128, 640])
def test_random_hadamard_orthogonal_fast_and_keyed(n):
    key = jax.random.PRNGKey(3)
    R = _f64(T.random_hadamard(n, key))
    np.testing.assert_allclose(R @ R.T, np.eye(n), atol=2e-6)
    d = T.random_signs(n, key)
    assert set(np.unique(np.asarray(d)).tolist()) == {-1.0, 1.0}
    x = _rand(4, (3, n))
    y = T.random_hadamard_transform(x, d)
    np.testing.assert_allclose(_f64(y), _f64(x) @ R.T, atol=2e-5)
    np.testing.assert_allclose(
        _f64(T.random_hadamard_transform(y, d, inverse=True)), _f64(x), atol=2e-5
    )
    np.testing.assert_array_equal(np.asarray(T.random_hadamard(n, key)), R.astype(np.float32))
    assert not np.array_equal(np.asarray(T.random_hadamard(n, jax.random.PRNGKey(4))), R)


@given(n=st.sampled_from([1, 3, 16, 48]), seed=st.integers(0, 2**31 - 1))
def test_random_orthogonal_is_orthogonal(n, seed):
    Q = _f64(T.random_orthogonal(n, jax.random.PRNGKey(seed)))
    np.testing.assert_allclose(Q.T @ Q, np.eye(n), atol=5e-6)
    assert abs(abs(np.linalg.det(Q)) - 1.0) < 1e-4


def test_random_orthogonal_is_haar_not_raw_qr():
    """Haar measure is invariant under Q ↦ -Q on any column, so every entry has mean 0.
    Raw Householder QR (no sign fix) has E[Q_ii] ≈ ∓0.5 for n = 3."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    Q = np.asarray(jax.vmap(lambda k: T.random_orthogonal(3, k))(keys), np.float64)
    se = math.sqrt(1 / 3 / len(keys))  # E[Q_ij²] = 1/n
    assert np.abs(Q.mean(axis=0)).max() < 5 * se
    np.testing.assert_array_equal(
        np.asarray(T.random_orthogonal(3, keys[0])), Q[0].astype(np.float32)
    )


# ------------------------------------------------------------------------- SmoothQuant


@given(
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 1.0),
    shape=st.sampled_from([(5, 8, 16), (7, 32), (3, 2, 4, 8)]),
)
def test_smoothing_leaves_product_unchanged(seed, alpha, shape):
    rng = np.random.default_rng(seed)
    n_in = shape[-1]
    x = (rng.standard_normal(shape) * rng.lognormal(0, 2, n_in)).astype(np.float32)
    W = rng.standard_normal((11, n_in)).astype(np.float32)
    s = T.smooth_scales(np.abs(x).reshape(-1, n_in).max(0), np.abs(W).max(0), alpha)
    xs, Ws = T.apply_smoothing(x, W, s)
    want = _f64(x) @ _f64(W).T
    got = _f64(xs) @ _f64(Ws).T
    tol = 1e-5 * (np.abs(_f64(x)) @ np.abs(_f64(W)).T).max()
    np.testing.assert_allclose(got, want, atol=tol)


@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 1.0))
def test_smooth_scales_formula_and_balance(seed, alpha):
    """s = a^α / w^(1−α); after smoothing the channel maxima are (a·w)^(1−α) and (a·w)^α,
    equal at α = 0.5 (SmoothQuant §4: 'migration strength')."""
    rng = np.random.default_rng(seed)
    a = rng.lognormal(0, 2, 16)
    w = rng.lognormal(-2, 1, 16)
    s = _f64(T.smooth_scales(a.astype(np.float32), w.astype(np.float32), alpha))
    np.testing.assert_allclose(s, a**alpha / w ** (1 - alpha), rtol=1e-4)
    np.testing.assert_allclose(a / s, (a * w) ** (1 - alpha), rtol=1e-4)
    np.testing.assert_allclose(w * s, (a * w) ** alpha, rtol=1e-4)


def test_smooth_scales_dead_channels_get_one():
    a = np.array([0.0, 2.0, 4.0, 0.0], np.float32)
    w = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    s = np.asarray(T.smooth_scales(a, w, 0.5))
    np.testing.assert_allclose(s, [1.0, 1.0, 2.0, 1.0])
    assert np.all(np.isfinite(s))


# -------------------------------------------------------------------------------- LoRC


@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(8, 12), (12, 8)]))
def test_lorc_full_rank_recovers_and_error_decreases(seed, shape):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape).astype(np.float32)
    W_hat = (np.round(W * 2) / 2).astype(np.float32)  # a coarse quantization
    E = _f64(W) - _f64(W_hat)
    sigma = np.linalg.svd(E, compute_uv=False)
    errors = []
    for r in range(1, min(shape) + 1):
        U, V = T.low_rank_compensation(W, W_hat, r)
        assert U.shape == (shape[0], r) and V.shape == (r, shape[1])
        err = np.linalg.norm(E - _f64(U) @ _f64(V))
        # Eckart–Young: the residual is the tail of the spectrum
        np.testing.assert_allclose(err, np.sqrt(np.sum(sigma[r:] ** 2)), atol=1e-5 * sigma[0] * 10)
        errors.append(err)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))
    U, V = T.low_rank_compensation(W, W_hat, min(shape))
    np.testing.assert_allclose(_f64(W_hat) + _f64(U) @ _f64(V), _f64(W), atol=1e-5)


def test_lorc_splits_sqrt_sigma_evenly():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 20)).astype(np.float32)
    U, V = T.low_rank_compensation(W, np.zeros_like(W), 3)
    np.testing.assert_allclose(
        np.linalg.norm(_f64(U), axis=0), np.linalg.norm(_f64(V), axis=1), rtol=1e-5
    )


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises():
    with pytest.raises(TypeError, match="floating"):
        T.hadamard_transform(np.arange(8))
    with pytest.raises(ValueError, match="NaN"):
        T.hadamard_transform(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="empty"):
        T.hadamard_transform(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="no supported Hadamard factorization"):
        T.hadamard_transform(np.ones(514, np.float32))  # 257·2, 257 > MAX_SMALL_ORDER
    with pytest.raises(ValueError, match="no supported Hadamard factorization"):
        T.hadamard_matrix(1021)
    with pytest.raises(ValueError, match="positive integer"):
        T.hadamard_factors(0)
    with pytest.raises(ValueError, match="axis"):
        T.hadamard_transform(np.ones(8, np.float32), axis=2)
    with pytest.raises(ValueError, match="signs"):
        T.random_hadamard_transform(np.ones((2, 8), np.float32), np.ones(4, np.float32))
    a = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="alpha"):
        T.smooth_scales(a, a, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        T.smooth_scales(-a, a, 0.5)
    with pytest.raises(ValueError, match="equal length"):
        T.smooth_scales(a, np.ones(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        T.smooth_scales(np.array([1, np.inf, 1, 1], np.float32), a, 0.5)
    with pytest.raises(ValueError, match="need x"):
        T.apply_smoothing(np.ones((2, 4), np.float32), np.ones((3, 5), np.float32), a)
    with pytest.raises(ValueError, match="positive"):
        T.apply_smoothing(np.ones((2, 4), np.float32), np.ones((3, 4), np.float32), -a)
    W = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="rank"):
        T.low_rank_compensation(W, W, 5)
    with pytest.raises(TypeError, match="rank"):
        T.low_rank_compensation(W, W, 2.0)
    with pytest.raises(ValueError, match="equal shape"):
        T.low_rank_compensation(W, W.T, 2)
    with pytest.raises(TypeError, match="floating"):
        T.low_rank_compensation(W.astype(np.int32), W, 2)
