"""numerics.second_order: the shared OBS column loop against plain numpy loops of the same
algorithm (scalar and 2-column vector steps), its algebraic identities, and the Hessian checks.

The references below are float64 and unblocked (every OBS update applied to every later column
at once); the compiled loop is float32 with lazy blocks, so a value on a rounding boundary may
round the other way: at most 0.1% of codes may differ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import second_order as so


def hessian(n=64, N=512, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, n)) @ (rng.normal(size=(n, n)) / np.sqrt(n)) + 0.3 * rng.normal(
        size=(N, n)
    )
    X[:, :2] *= 10.0
    X[:, list(dead)] = 0.0
    return ((2.0 / N) * X.T @ X).astype(np.float32)


def weights(rows=24, n=64, seed=1):
    return (np.random.default_rng(seed).normal(size=(rows, n)) / np.sqrt(n)).astype(np.float32)


def factor64(H, percdamp):
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * np.mean(np.diag(H)) * np.eye(len(H))
    return np.linalg.cholesky(np.linalg.inv(H)).T


# ------------------------------------------------------------------------------ the factor


@pytest.mark.parametrize("symmetrize", [True, False])
def test_inverse_hessian_factor(symmetrize):
    H = hessian(dead=(7,))
    U = np.asarray(so.inverse_hessian_factor(jnp.asarray(H), 0.01, symmetrize=symmetrize))
    assert np.all(np.tril(U, -1) == 0)
    np.testing.assert_allclose(U, factor64(H, 0.01), rtol=0, atol=2e-4 * np.abs(U).max())
    # the dead input is decoupled: its row of U is e_j / sqrt(1 + λ)
    assert np.count_nonzero(U[7]) == 1 and U[7, 7] > 0


def test_fix_dead_and_padding():
    H = hessian(dead=(3, 5))
    Hf, dead = so.fix_dead(jnp.asarray(H))
    assert np.flatnonzero(np.asarray(dead)).tolist() == [3, 5]
    assert float(Hf[3, 3]) == 1.0 and float(jnp.sum(jnp.abs(Hf[3]))) == 1.0
    W, U = so.pad_decoupled(jnp.ones((2, 64)), jnp.eye(64) * 2.0, 80)
    assert W.shape == (2, 80) and float(jnp.sum(W[:, 64:])) == 0.0
    np.testing.assert_array_equal(np.diag(np.asarray(U))[62:66], [2.0, 2.0, 1.0, 1.0])


# ------------------------------------------------------------------------- scalar steps


def grid_choose(maxq):
    """Per-row asymmetric min-max grid of each group, fitted on its current weights."""

    def fit(Wg):
        lo = jnp.minimum(jnp.min(Wg, axis=1), 0.0)
        hi = jnp.maximum(jnp.max(Wg, axis=1), 0.0)
        s = jnp.where(hi > lo, (hi - lo) / maxq, 1.0)
        return s, jnp.round(-lo / s)

    return fit


def test_scalar_loop_matches_plain_numpy():
    """k = 1, a group grid fitted on the current weights at each group start (SpQR's cadence)."""
    maxq, g = 7, 8
    W, H = weights(), hessian()
    U = so.inverse_hessian_factor(jnp.asarray(H), 0.01)
    fit = grid_choose(maxq)

    def choose(Wg, Wc, j0, st):
        return fit(Wg)

    def step(w, j, d, st):
        s, z = st
        c = jnp.clip(jnp.round(w[:, 0] / s + z), 0, maxq)
        return ((c - z) * s)[:, None], c.astype(jnp.uint8)[:, None]

    st0 = (jnp.ones((24,), jnp.float32), jnp.zeros((24,), jnp.float32))
    r = so.obs_loop(jnp.asarray(W), U, step, block_size=16, group=g, choose=choose, state=st0)

    Wr, Ur = np.array(W, np.float64), factor64(H, 0.01)
    C, err = np.zeros(W.shape), np.zeros(24)
    for j in range(64):
        if j % g == 0:
            Wg = Wr[:, j : j + g]
            lo, hi = np.minimum(Wg.min(1), 0), np.maximum(Wg.max(1), 0)
            s = np.where(hi > lo, (hi - lo) / maxq, 1.0)
            z = np.round(-lo / s)
        C[:, j] = np.clip(np.round(Wr[:, j] / s + z), 0, maxq)
        e = (Wr[:, j] - (C[:, j] - z) * s) / Ur[j, j]
        Wr[:, j:] -= np.outer(e, Ur[j, j:])
        err += e * e
    diff = np.abs(np.asarray(r.out, np.int64) - C)
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3
    np.testing.assert_allclose(np.asarray(r.err), err, rtol=1e-3)


# ------------------------------------------------------------------------- vector steps

CODEBOOK = np.array(
    [[x, y] for x in (-0.3, -0.1, 0.1, 0.3) for y in (-0.25, 0.0, 0.25)], np.float32
)  # 12 fixed 2-D points


def vq_step(w, j, d, st):
    """Nearest codeword of a fixed 2-D codebook for each row's pair of columns."""
    cb = jnp.asarray(CODEBOOK)
    idx = jnp.argmin(jnp.sum(jnp.square(w[:, None, :] - cb[None]), axis=-1), axis=1)
    return cb[idx], jnp.broadcast_to(idx.astype(jnp.uint8)[:, None], w.shape)


def vq_reference(W, U):
    """Plain numpy: quantize 2 columns jointly, E = (W_S − Q_S) U_SS⁻¹, update every later
    column at once."""
    W = np.array(W, np.float64)
    rows, n = W.shape
    codes, err = np.zeros((rows, n // 2), np.int64), np.zeros(rows)
    for j in range(0, n, 2):
        S = slice(j, j + 2)
        dist = ((W[:, None, S] - CODEBOOK[None].astype(np.float64)) ** 2).sum(-1)
        idx = dist.argmin(1)
        Q = CODEBOOK[idx].astype(np.float64)
        E = (W[:, S] - Q) @ np.linalg.inv(U[S, S])
        W[:, j + 2 :] -= E @ U[S, j + 2 :]
        W[:, S] = Q
        codes[:, j // 2] = idx
        err += (E * E).sum(1)
    return W, codes, err


@pytest.mark.parametrize("block_size", [8, 64])
def test_vector_step_matches_plain_numpy(block_size):
    W, H = weights(), hessian()
    U = so.inverse_hessian_factor(jnp.asarray(H), 0.01)
    r = so.obs_loop(jnp.asarray(W), U, vq_step, block_size=block_size, k=2)
    W_ref, codes_ref, err_ref = vq_reference(W, factor64(H, 0.01))
    codes = np.asarray(r.out)[:, ::2].astype(np.int64)
    np.testing.assert_array_equal(np.asarray(r.out)[:, ::2], np.asarray(r.out)[:, 1::2])
    assert np.mean(codes != codes_ref) <= 1e-3
    same = np.repeat(codes == codes_ref, 2, axis=1)
    np.testing.assert_allclose(np.asarray(r.W)[same], W_ref[same], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.err), err_ref, rtol=2e-3)
    # the error feedback helps: lower ‖(W − Ŵ)X‖ than plain nearest-codeword VQ
    plain = np.asarray(vq_step(jnp.asarray(W).reshape(-1, 2), 0, None, None)[0]).reshape(W.shape)
    out_err = lambda Wh: np.einsum("ij,jk,ik->", W - Wh, H.astype(np.float64), W - Wh)
    assert out_err(np.asarray(r.W)) < out_err(plain)


def test_joint_step_equals_scalar_steps_with_fixed_values():
    """A k-column step is forward substitution: with the values fixed in advance, k = 1, 2, 4
    give the same errors (and the same Ŵ: the fixed values)."""
    W, H = weights(), hessian()
    T = jnp.asarray(np.round(W * 8) / 8)  # any fixed targets
    U = so.inverse_hessian_factor(jnp.asarray(H), 0.01)

    def fixed(k):
        def step(w, j, d, st):
            return jax.lax.dynamic_slice_in_dim(T, j, k, axis=1), jnp.zeros_like(w)

        return so.obs_loop(jnp.asarray(W), U, step, block_size=16, k=k)

    runs = [fixed(k) for k in (1, 2, 4)]
    for r in runs[1:]:
        np.testing.assert_allclose(np.asarray(r.err), np.asarray(runs[0].err), rtol=1e-4)
        np.testing.assert_array_equal(np.asarray(r.W), np.asarray(T))


def test_loop_is_compiled_and_rejects_bad_shapes():
    W, H = weights(), hessian()
    U = so.inverse_hessian_factor(jnp.asarray(H), 0.01)
    f = jax.jit(lambda W, U: so.obs_loop(W, U, vq_step, block_size=16, k=2).W)
    np.testing.assert_array_equal(
        np.asarray(f(jnp.asarray(W), U)),
        np.asarray(so.obs_loop(jnp.asarray(W), U, vq_step, block_size=16, k=2).W),
    )
    for kw in (dict(block_size=48), dict(block_size=16, group=6), dict(block_size=16, k=3)):
        with pytest.raises(ValueError, match="block_size"):
            so.obs_loop(jnp.asarray(W), U, vq_step, **kw)


# ------------------------------------------------------------------------------ the checks


def with_eigenvalue(H, lam):
    """``H`` with its smallest eigenvalue moved to ``lam`` (same eigenvector)."""
    Hd = np.asarray(H, np.float64)
    mu, V = np.linalg.eigh(Hd)
    v = V[:, 0]
    return (Hd + (lam - mu[0]) * np.outer(v, v)).astype(np.float32)


def test_check_hessian():
    H = hessian(dead=(3, 9, 10))
    assert so.check_hessian(jnp.asarray(H), who="t") == 3
    assert so.check_hessian(jnp.asarray(hessian()), who="t") == 0
    with pytest.raises(ValueError, match=r"t: the Hessian H has 1 NaN/Inf .* \(2, 5\)"):
        so.check_hessian(jnp.asarray(H).at[2, 5].set(jnp.inf), who="t")
    with pytest.raises(ValueError, match="calibration inputs of this layer are all zero"):
        so.check_hessian(jnp.zeros((8, 8)), who="t")
    with pytest.raises(ValueError, match=r"not positive semi-definite: H\[4, 4\]"):
        so.check_hessian(jnp.asarray(H).at[4, 4].set(-1.0), who="t")
    H = hessian()  # no dead inputs: the smallest eigenvector is not a dead axis
    tr = float(np.trace(H))
    with pytest.raises(ValueError, match="not positive semi-definite: it has an eigenvalue"):
        so.check_hessian(jnp.asarray(with_eigenvalue(H, -2 * so.PSD_RTOL * tr)), who="t")
    # rounding-size negatives are not flagged
    assert so.check_hessian(jnp.asarray(with_eigenvalue(H, -1e-7 * tr)), who="t") == 0
    # under jit nothing is checked; the count is traced
    n = jax.jit(lambda H: so.check_hessian(H, who="t"))(jnp.zeros((8, 8)))
    assert int(n) == 8


def test_check_solved():
    so.check_solved(jnp.ones(3), who="t", percdamp=0.01)
    with pytest.raises(ValueError, match="not positive definite in float32 even after damping"):
        so.check_solved(jnp.array([1.0, jnp.nan]), who="t", percdamp=0.01)
    jax.jit(lambda x: (so.check_solved(x, who="t", percdamp=0.01), x)[1])(jnp.array([jnp.nan]))
