"""Sign-scale, residual and BCQ binarization (numerics.binarization).

Shapes are fixed per test (hypothesis varies the data), so each jitted core compiles once.
Errors are compared per group in float64 from the returned codes; "never increases" allows
float32 rounding of the reconstruction: rtol = 8 * g * eps(float32) of the group's ||w||^2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numerics import binarization as bz

EPS = float(np.finfo(np.float32).eps)
seeds = st.integers(0, 2**32 - 1)
ROWS, COLS, G = 8, 64, 16  # the shape used throughout; groups of 16


def _weights(seed, shape=(ROWS, COLS)):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=shape) * rng.uniform(0.01, 10)).astype(np.float32)


def _group_err(W, code, g=G):
    """Per-group squared error of reconstruct(code), float64, shape [..., groups]."""
    W_hat = np.asarray(bz.reconstruct(code), np.float64)
    d = (np.asarray(W, np.float64) - W_hat) ** 2
    return d.reshape(d.shape[:-1] + (-1, g)).sum(-1)


def _group_norm(W, g=G):
    W = np.asarray(W, np.float64)
    return (W**2).reshape(W.shape[:-1] + (-1, g)).sum(-1)


def _leq(a, b, W, g=G):
    """a <= b per group, up to float32 rounding relative to the group's ||w||^2."""
    return np.all(a <= b + 8 * g * EPS * _group_norm(W, g) + 1e-30)


# ----------------------------------------------------------------------------- one plane


@given(seed=seeds, grouped=st.booleans(), delta=st.floats(0.01, 0.5), sign=st.sampled_from([-1, 1]))
def test_binarize_alpha_is_mean_abs_and_optimal(seed, grouped, delta, sign):
    W = _weights(seed)
    g = G if grouped else COLS
    code = bz.binarize(jnp.asarray(W), group_size=g if grouped else None)
    assert code.alphas.shape == (ROWS, COLS // g, 1) and code.planes.shape == (1, ROWS, COLS)
    assert code.planes.dtype == np.int8
    Wg = W.astype(np.float64).reshape(ROWS, -1, g)
    np.testing.assert_allclose(code.alphas[..., 0], np.abs(Wg).mean(-1), rtol=4 * g * EPS)
    np.testing.assert_array_equal(code.planes[0], np.where(W >= 0, 1, -1))
    # alpha is the minimiser: err(alpha) = ||w||^2 - g alpha^2, and any other alpha is worse
    err = _group_err(W, code, g)
    np.testing.assert_allclose(err, (Wg**2).sum(-1) - g * np.abs(Wg).mean(-1) ** 2, rtol=1e-4)
    moved = bz.BinaryCode(code.alphas * (1 + sign * delta), code.planes)
    assert np.all(_group_err(W, moved, g) > err)


def test_sign_of_zero_is_plus_one():
    W = jnp.asarray([[0.0, -0.0, 1.0, -2.0]], jnp.float32)
    np.testing.assert_array_equal(bz.sign_pm1(W), [[1, 1, 1, -1]])
    np.testing.assert_array_equal(bz.binarize(W).planes[0], [[1, 1, 1, -1]])
    np.testing.assert_allclose(bz.binarize(W).alphas, [[[0.75]]])


# ----------------------------------------------------------------------------- more planes


@given(seed=seeds)
def test_residual_binarization_error_never_increases(seed):
    W = _weights(seed)
    codes = [bz.residual_binarize(jnp.asarray(W), n_planes=n, group_size=G) for n in range(1, 6)]
    errs = [_group_norm(W)] + [_group_err(W, c) for c in codes]
    for a, b in zip(errs, errs[1:], strict=False):
        assert _leq(b, a, W)
    # greedy: plane n of an n-plane run is the same as in any longer run, and lowers the
    # error by g * alpha_n^2
    np.testing.assert_array_equal(codes[4].planes[:3], codes[2].planes)
    np.testing.assert_array_equal(codes[4].alphas[..., :3], codes[2].alphas)
    a = np.asarray(codes[4].alphas, np.float64)
    drop = errs[4] - errs[5]
    np.testing.assert_allclose(drop, G * a[..., 4] ** 2, rtol=1e-3, atol=1e-5 * errs[0].max())


@given(seed=seeds)
def test_bcq_error_never_increases_with_planes(seed):
    W = _weights(seed)
    errs = [_group_norm(W)]
    for n in range(1, 5):
        code = bz.bcq(jnp.asarray(W), n_planes=n, group_size=G, rounds=4)
        assert code.alphas.shape == (ROWS, COLS // G, n) and code.planes.shape == (n, ROWS, COLS)
        errs.append(_group_err(W, code))
    for a, b in zip(errs, errs[1:], strict=False):
        assert _leq(b, a, W)


@given(seed=seeds, pow2=st.booleans())
def test_alternation_never_worse_than_greedy_init(seed, pow2):
    W = _weights(seed)
    n = 3
    greedy = bz.residual_binarize(jnp.asarray(W), n_planes=n, group_size=G)
    if pow2:  # the pow2 init is the greedy code with its alphas rounded (module docstring)
        greedy = bz.BinaryCode(bz.round_pow2(greedy.alphas), greedy.planes)
    e0 = _group_err(W, greedy)
    for warm in (False, True):
        code = bz.bcq(
            jnp.asarray(W), n_planes=n, group_size=G, rounds=4, pow2_alpha=pow2, warm_start=warm
        )
        assert _leq(_group_err(W, code), e0, W)


@given(seed=seeds)
def test_warm_start_never_worse_than_plain_bcq(seed):
    W = _weights(seed)
    plain = bz.bcq(jnp.asarray(W), n_planes=3, group_size=G, rounds=4, warm_start=False)
    warm = bz.bcq(jnp.asarray(W), n_planes=3, group_size=G, rounds=4)
    assert _leq(_group_err(W, warm), _group_err(W, plain), W)


def test_alternation_improves_a_known_case():
    """w = (0, 0, 0, 4): greedy gives alphas (1, 1.5) and w-hat = (-0.5, -0.5, -0.5, 2.5),
    error 3; one least-squares step on those planes gives alphas (2, 2), whose levels
    {-4, 0, 4} hold w exactly."""
    W = jnp.asarray([[0.0, 0.0, 0.0, 4.0]], jnp.float32)
    greedy = bz.residual_binarize(W, n_planes=2)
    np.testing.assert_allclose(greedy.alphas, [[[1.0, 1.5]]])
    np.testing.assert_allclose(bz.reconstruct(greedy), [[-0.5, -0.5, -0.5, 2.5]])
    code = bz.bcq(W, n_planes=2, rounds=3, warm_start=False)
    np.testing.assert_allclose(bz.reconstruct(code), W, atol=1e-6)


@given(seed=seeds)
def test_one_plane_bcq_is_binarize(seed):
    W = jnp.asarray(_weights(seed))
    a, b = bz.bcq(W, n_planes=1, group_size=G, rounds=4), bz.binarize(W, group_size=G)
    np.testing.assert_allclose(a.alphas, b.alphas, rtol=4 * G * EPS)
    np.testing.assert_array_equal(a.planes, b.planes)


# ----------------------------------------------------------------------------- powers of two


@given(seed=seeds)
def test_pow2_alphas_are_powers_of_two(seed):
    W = jnp.asarray(_weights(seed))
    code = bz.bcq(W, n_planes=3, group_size=G, rounds=4, pow2_alpha=True)
    a = np.asarray(code.alphas, np.float64)
    assert np.all(a >= 0)
    pos = a[a > 0]
    np.testing.assert_array_equal(pos, 2.0 ** np.round(np.log2(pos)))
    assert np.all(np.diff(a, axis=-1) <= 0)  # sorted by decreasing magnitude


@given(
    a=hnp.arrays(np.float32, (32,), elements=st.floats(-1e4, 1e4, allow_subnormal=False, width=32))
)
def test_round_pow2(a):
    p = np.asarray(bz.round_pow2(jnp.asarray(a)), np.float64)
    a64 = a.astype(np.float64)
    nz = a64 != 0
    assert np.all(p[~nz] == 0)
    np.testing.assert_array_equal(np.sign(p), np.sign(a64))
    np.testing.assert_array_equal(np.abs(p[nz]), 2.0 ** np.round(np.log2(np.abs(p[nz]))))
    ratio = np.abs(a64[nz] / p[nz])
    assert np.all((ratio >= 2**-0.5 * (1 - 1e-6)) & (ratio <= 2**0.5 * (1 + 1e-6)))
    np.testing.assert_array_equal(bz.round_pow2(jnp.asarray(p, jnp.float32)), p)  # idempotent
    # two additive terms: the remainder after the first term is itself rounded to a power of 2
    p2 = np.asarray(bz.round_pow2(jnp.asarray(a), terms=2), np.float64)
    rest = p2 - p
    rz = rest[rest != 0]
    np.testing.assert_array_equal(np.abs(rz), 2.0 ** np.round(np.log2(np.abs(rz))))
    assert np.all(np.abs(a64 - p2) <= np.abs(a64 - p) * (1 + 1e-6))


# ----------------------------------------------------------------------------- layout


@given(seed=seeds)
def test_bits_round_trip_and_batch_dims(seed):
    W = _weights(seed, (2, 4, COLS))
    code = bz.residual_binarize(jnp.asarray(W), n_planes=2, group_size=G)
    assert code.alphas.shape == (2, 4, COLS // G, 2) and code.planes.shape == (2, 2, 4, COLS)
    bits = bz.planes_to_bits(code.planes)
    assert bits.dtype == np.bool_
    np.testing.assert_array_equal(bz.bits_to_planes(bits), code.planes)
    np.testing.assert_array_equal(
        bz.reconstruct(bz.BinaryCode(code.alphas, bits)), bz.reconstruct(code)
    )
    flat = bz.residual_binarize(jnp.asarray(W.reshape(ROWS, COLS)), n_planes=2, group_size=G)
    np.testing.assert_array_equal(flat.alphas, code.alphas.reshape(ROWS, COLS // G, 2))
    np.testing.assert_array_equal(flat.planes, code.planes.reshape(2, ROWS, COLS))


def test_jit_and_dtype():
    W = jnp.asarray(_weights(0))
    eager = bz.bcq(W, n_planes=2, group_size=G, rounds=4)
    jitted = jax.jit(lambda w: bz.bcq(w, n_planes=2, group_size=G, rounds=4))(W)
    np.testing.assert_allclose(jitted.alphas, eager.alphas, rtol=1e-6)
    np.testing.assert_array_equal(jitted.planes, eager.planes)
    code = bz.residual_binarize(W.astype(jnp.bfloat16), n_planes=2, group_size=G)
    assert code.alphas.dtype == jnp.bfloat16 and bz.reconstruct(code).dtype == jnp.bfloat16


def test_bad_input_raises():
    W = jnp.ones((4, 8), jnp.float32)
    with pytest.raises(TypeError, match="floating"):
        bz.binarize(jnp.ones((4, 8), jnp.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bz.bcq(W.at[0, 0].set(jnp.nan), n_planes=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bz.residual_binarize(W.at[0, 0].set(-jnp.inf), n_planes=2)
    with pytest.raises(ValueError, match="does not divide"):
        bz.binarize(W, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        bz.binarize(W, group_size=0)
    with pytest.raises(ValueError, match="n_planes"):
        bz.residual_binarize(W, n_planes=0)
    with pytest.raises(ValueError, match=r"n_planes must be an integer in \[1, 4\]"):
        bz.bcq(W, n_planes=5)
    with pytest.raises(ValueError, match="rounds"):
        bz.bcq(W, n_planes=2, rounds=-1)
    with pytest.raises(ValueError, match="pow2_terms"):
        bz.bcq(W, n_planes=2, pow2_alpha=True, pow2_terms=0)
    with pytest.raises(ValueError, match="non-empty"):
        bz.binarize(jnp.zeros((0,), jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        bz.round_pow2(jnp.asarray([1, 2]))
    code = bz.residual_binarize(W, n_planes=2)
    with pytest.raises(ValueError, match="do not match"):
        bz.reconstruct(bz.BinaryCode(code.alphas[..., :1], code.planes))
