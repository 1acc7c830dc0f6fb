"""Tests for numerics.scaling_laws: the log-space least-squares fitter, its bootstrap, and
the two paper laws (arXiv 2411.17691, arXiv 2501.02423)."""

import math
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numerics import scaling_laws as S

# ------------------------------------------------------------------------- designs


def _qid_design():
    """Pythia-like grid: 6 sizes × 6 token counts × 3 bit-widths (2411.17691 §3)."""
    Ns = np.array([1.6e8, 4.1e8, 1.0e9, 2.8e9, 6.9e9, 1.2e10])
    Ds = np.geomspace(1e9, 2e11, 6)
    Ps = np.array([2.0, 3.0, 4.0])
    return [a.ravel() for a in np.meshgrid(Ns, Ds, Ps, indexing="ij")]


def _fp_design():
    """The paper's grid (2501.02423 App. F, Table 3): 4 sizes × 4 token counts ×
    17 ExMy layouts × 4 block sizes."""
    Ns = np.array([40894464.0, 84934656.0, 1.54e8, 6.79e8])
    Ds = np.array([1.048576e10, 2.097152e10, 5.24288e10, 1.048576e11])
    em = [(0, 7), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (2, 1), (2, 3), (3, 1),
          (3, 2), (4, 1), (4, 3), (4, 5), (5, 1), (5, 2), (6, 1)]  # fmt: skip
    rows = [(n, d, e, m, b) for n in Ns for d in Ds for e, m in em for b in (32, 128, 512, 2048)]
    return list(np.array(rows, dtype=np.float64).T)


def _noisy(y, sigma, seed):
    """Multiplicative log-normal noise: log y + N(0, σ²), the fitter's noise model."""
    return y * np.exp(sigma * np.random.default_rng(seed).standard_normal(y.shape))


def _ols(N, D, P, y):
    """Reference: ordinary least squares of log y on (1, −log N, log D, −log P)."""
    A = np.stack([np.ones_like(N), -np.log(N), np.log(D), -np.log(P)], axis=1)
    coef, *_ = np.linalg.lstsq(A, np.log(y), rcond=None)
    r = np.log(y) - A @ coef
    cov = r @ r / (len(y) - 4) * np.linalg.inv(A.T @ A)
    return coef, cov


# --------------------------------------------------------------------------- QiD law


def test_paper_constants_are_read_only_and_complete():
    assert set(S.PAPER_QID_PARAMS) == set(S.QID_LAW.param_names)
    assert set(S.PAPER_FP_PARAMS) == set(S.FP_QUANT_LAW.param_names)
    assert isinstance(S.PAPER_FP_PARAMS, types.MappingProxyType)
    with pytest.raises(TypeError):
        S.PAPER_QID_PARAMS["k"] = 1.0


@given(
    N=st.floats(1e7, 1e11),
    D=st.floats(1e8, 1e13),
    P=st.sampled_from([2.0, 3.0, 4.0, 8.0]),
    f=st.floats(1.01, 10.0),
)
def test_qid_trends(N, D, P, f):
    """With the paper's positive exponents, QiD grows with D and shrinks with N and P."""
    q = dict(S.PAPER_QID_PARAMS)
    base = S.qid_loss(N, D, P, **q)
    assert S.qid_loss(N, D * f, P, **q) > base
    assert S.qid_loss(N * f, D, P, **q) < base
    assert S.qid_loss(N, D, P + 1, **q) < base
    assert base == pytest.approx(q["k"] * D ** q["beta"] / (N ** q["alpha"] * P ** q["gamma"]))


def test_qid_fit_is_ordinary_least_squares_in_log_space():
    """The QiD law is linear in (log k, α, β, γ): the fit and its covariance must equal OLS."""
    N, D, P = _qid_design()
    y = _noisy(S.qid_loss(N, D, P, **S.PAPER_QID_PARAMS), 0.1, seed=0)
    fit = S.fit_qid_law(N, D, P, y)
    coef, cov = _ols(N, D, P, y)
    got = [math.log(fit.params["k"]), fit.params["alpha"], fit.params["beta"], fit.params["gamma"]]
    np.testing.assert_allclose(got, coef, rtol=1e-7, atol=1e-9)
    k = fit.params["k"]
    se = np.sqrt(np.diag(cov)) * np.array([k, 1, 1, 1])  # delta method for k = exp(log k)
    np.testing.assert_allclose(list(fit.stderr.values()), se, rtol=1e-5)
    r = np.log(y) - np.log(fit.predict({"N": N, "D": D, "P": P}))
    assert fit.rms_log == pytest.approx(np.sqrt(np.mean(r**2)))
    assert fit.r2_log == pytest.approx(
        1 - np.sum(r**2) / np.sum((np.log(y) - np.log(y).mean()) ** 2)
    )


@given(
    k=st.floats(1e-3, 1.0),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 8.0),
)
def test_qid_noiseless_recovery(k, alpha, beta, gamma):
    N, D, P = _qid_design()
    true = {"k": k, "alpha": alpha, "beta": beta, "gamma": gamma}
    fit = S.fit_qid_law(N, D, P, S.qid_loss(N, D, P, **true), n_starts=2)
    for name, v in true.items():
        assert fit.params[name] == pytest.approx(v, rel=1e-6, abs=1e-8)
    assert fit.rms_log < 1e-8


def test_qid_bootstrap_ci_coverage():
    """Calibration of the percentile bootstrap: over 16 synthetic data sets (10% noise) the
    90% intervals must contain the true value about 90% of the time.  With 64 interval/
    truth pairs the count is ≈ Binomial(64, 0.9): mean 57.6, sd 2.4; the accepted range
    [48, 63] excludes only ≲ 0.2% of a well-calibrated fitter's outcomes on either side."""
    N, D, P = _qid_design()
    true = dict(S.PAPER_QID_PARAMS)
    clean = S.qid_loss(N, D, P, **true)
    hits = 0
    for s in range(16):
        fit = S.fit_qid_law(N, D, P, _noisy(clean, 0.1, 1000 + s), n_starts=1, n_boot=80,
                            ci_level=0.9, seed=s)  # fmt: skip
        hits += sum(fit.ci[name][0] <= v <= fit.ci[name][1] for name, v in true.items())
    assert 48 <= hits <= 63, hits


# ----------------------------------------------------------------------------- FP law


def test_fp_law_value_and_trends():
    q = dict(S.PAPER_FP_PARAMS)
    L = S.fp_quant_loss(4.1e7, 1.05e10, 4, 3, 128, **q)
    manual = (q["n"] / 4.1e7 ** q["alpha"] + q["d"] / 1.05e10 ** q["beta"] + q["epsilon"]
              + 1.05e10 ** q["beta"] / 4.1e7 ** q["alpha"] * 7
              / (q["gamma"] * 4.5 ** q["delta"] * 3.5 ** q["nu"]))  # fmt: skip
    assert L == pytest.approx(manual)
    assert 2.5 < L < 4.0  # the range of the paper's Fig. 14 for 41M models
    N, D, E, M, B = _fp_design()
    L = S.fp_quant_loss(N, D, E, M, B, **q)
    # more bits in E or M, or a finer scaling block, can only lower the loss
    assert np.all(S.fp_quant_loss(N, D, E + 1, M, B, **q) < L)
    assert np.all(S.fp_quant_loss(N, D, E, M + 1, B, **q) < L)
    assert np.all(S.fp_quant_loss(N, D, E, M, B / 2, **q) < L)
    assert np.all(S.fp_quant_loss(N, D, E, M, np.ones_like(B), **q) > q["epsilon"])


def test_fp_noiseless_recovery_from_generic_start():
    """From the law's generic start plus random starts, not from the paper's values."""
    N, D, E, M, B = _fp_design()
    true = dict(S.PAPER_FP_PARAMS)
    fit = S.fit_fp_quant_law(N, D, E, M, B, S.fp_quant_loss(N, D, E, M, B, **true), seed=0)
    for name, v in true.items():
        assert fit.params[name] == pytest.approx(v, rel=1e-3), name
    assert fit.rms_log < 1e-6


def test_fp_noisy_recovery_within_bootstrap_uncertainty():
    """0.5% multiplicative noise.  Every estimate must lie within 4 bootstrap standard
    deviations of the truth (≈ 6e-5 chance per parameter for a consistent estimator), the
    true value must lie inside the 95% percentile interval of the well-determined
    parameters, and the bootstrap spread must agree with the asymptotic standard error
    (B = 100 estimates a standard deviation to ≈ 7%; the bound allows ±40%)."""
    N, D, E, M, B = _fp_design()
    true = dict(S.PAPER_FP_PARAMS)
    y = _noisy(S.fp_quant_loss(N, D, E, M, B, **true), 0.005, seed=7)
    fit = S.fit_fp_quant_law(N, D, E, M, B, y, n_boot=100, seed=0)
    assert fit.n_boot_failed == 0 and fit.boot_params.shape == (100, 8)
    sd = fit.boot_params.std(axis=0)
    for j, name in enumerate(fit.law.param_names):
        assert abs(fit.params[name] - true[name]) <= 4 * sd[j], name
        assert 0.6 < sd[j] / fit.stderr[name] < 1.4, name
    for name in ("alpha", "beta", "epsilon", "delta", "nu"):
        lo, hi = fit.ci[name]
        assert lo <= true[name] <= hi, name
    assert fit.rms_log == pytest.approx(0.005, rel=0.1)  # the noise level is recovered
    assert fit.r2_log > 0.99


# -------------------------------------------------------------------------- generic fitter


def test_generic_law_with_offset():
    """A user-defined law y = a·x^(−b) + c (Chinchilla-like, not log-linear)."""
    law = S.ParametricLaw(
        name="power+offset",
        param_names=("a", "b", "c"),
        input_names=("x",),
        f=lambda p, X: p["a"] * X["x"] ** (-p["b"]) + p["c"],
        p0={"a": 1.0, "b": 0.5, "c": 1.0},
        bounds={"a": (1e-6, 1e6), "b": (0.0, 3.0), "c": (1e-6, 10.0)},
        log_params=frozenset({"a", "c"}),
    )
    x = np.geomspace(1e6, 1e10, 25)
    true = {"a": 400.0, "b": 0.34, "c": 1.7}
    fit = S.fit_law(law, {"x": x}, law.f(true, {"x": x}), n_starts=6, seed=3)
    for name, v in true.items():
        assert fit.params[name] == pytest.approx(v, rel=1e-5)


def test_bootstrap_is_reproducible_under_seed():
    N, D, P = _qid_design()
    y = _noisy(S.qid_loss(N, D, P, **S.PAPER_QID_PARAMS), 0.1, seed=1)
    a = S.fit_qid_law(N, D, P, y, n_boot=30, seed=5)
    b = S.fit_qid_law(N, D, P, y, n_boot=30, seed=5)
    c = S.fit_qid_law(N, D, P, y, n_boot=30, seed=6)
    np.testing.assert_array_equal(a.boot_params, b.boot_params)
    assert dict(a.ci) == dict(b.ci) and a.ci_level == 0.95
    assert not np.array_equal(a.boot_params, c.boot_params)
    np.testing.assert_allclose(list(a.params.values()), list(c.params.values()), rtol=1e-6)
    assert a.ci is not None and S.fit_qid_law(N, D, P, y).ci is None
    with pytest.raises(ValueError):
        a.boot_params[0, 0] = 1.0  # read-only


# ------------------------------------------------------------------------------ bad input


def test_bad_input_raises():
    N, D, P = _qid_design()
    y = S.qid_loss(N, D, P, **S.PAPER_QID_PARAMS)
    with pytest.raises(ValueError, match="y must be > 0"):
        S.fit_qid_law(N, D, P, np.where(np.arange(y.size) == 3, 0.0, y))
    with pytest.raises(ValueError, match="y must be > 0"):
        S.fit_qid_law(N, D, P, -y)
    with pytest.raises(ValueError, match="NaN"):
        S.fit_qid_law(N, D, P, np.where(np.arange(y.size) == 3, np.nan, y))
    with pytest.raises(ValueError, match="NaN"):
        S.fit_qid_law(np.where(np.arange(y.size) == 0, np.inf, N), D, P, y)
    with pytest.raises(ValueError, match="N must be > 0"):
        S.fit_qid_law(-N, D, P, y)
    with pytest.raises(ValueError, match="points"):
        S.fit_qid_law(N, D, P, y[:-1])
    with pytest.raises(ValueError, match="different lengths"):
        S.fit_qid_law(N[:-1], D, P, y)
    with pytest.raises(ValueError, match="more points than parameters"):
        S.fit_qid_law(N[:4], D[:4], P[:4], y[:4])
    with pytest.raises(ValueError, match="non-empty"):
        S.fit_qid_law([], [], [], [])
    with pytest.raises(TypeError, match="numeric"):
        S.fit_qid_law(N.astype(str), D, P, y)
    with pytest.raises(ValueError, match="lacks inputs"):
        S.fit_law(S.QID_LAW, {"N": N, "D": D}, y)
    with pytest.raises(ValueError, match="p0 keys"):
        S.fit_qid_law(N, D, P, y, p0={"k": 1.0})
    with pytest.raises(ValueError, match="ci_level"):
        S.fit_qid_law(N, D, P, y, n_boot=5, ci_level=1.5)
    with pytest.raises(ValueError, match="B must be >= 1"):
        S.fp_quant_loss(1e8, 1e10, 4, 3, 0.5, **S.PAPER_FP_PARAMS)
    with pytest.raises(ValueError, match="E must be >= 0"):
        S.fp_quant_loss(1e8, 1e10, -1, 3, 32, **S.PAPER_FP_PARAMS)
    with pytest.raises(ValueError, match="outside bounds"):
        S.ParametricLaw(name="bad", param_names=("a",), input_names=("x",),
                        f=lambda p, X: X["x"], p0={"a": 5.0}, bounds={"a": (0.0, 1.0)})  # fmt: skip
    with pytest.raises(ValueError, match="keys"):
        S.ParametricLaw(name="bad", param_names=("a", "b"), input_names=("x",),
                        f=lambda p, X: X["x"], p0={"a": 0.5}, bounds={"a": (0.0, 1.0)})  # fmt: skip
