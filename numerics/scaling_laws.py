"""Fitting parametric scaling laws for quantized LLMs (numpy / scipy, not jit).

Contents
--------
* ``ParametricLaw`` — a law ``f(params, X) > 0`` with named parameters, named inputs, a
  default start, bounds, and the parameters that are fitted on a log scale.
* ``fit_law(law, X, y)`` — least squares on ``log y − log f(θ, X)``
  (``scipy.optimize.least_squares``, trust-region reflective, bounds, several starts:
  ``p0`` plus uniform draws in the (log-)bounds box).  Log-space residuals make the fit
  the maximum-likelihood estimate under multiplicative log-normal noise and weight small
  and large losses alike.  Returns a frozen ``FitResult``: parameters by name, RMS of the
  log residuals, R² of ``log y``, the asymptotic covariance ``s²(JᵀJ)⁻¹`` mapped to natural
  parameters by the delta method, and — with ``n_boot > 0`` — percentile bootstrap
  confidence intervals (points resampled with replacement, ``numpy`` generator seeded by
  ``seed``: the same seed gives the same intervals).
* Two laws from the papers, as plain functions of named parameters plus fit helpers:

  (a) quantization-induced degradation, Ouyang et al., "Low-bit quantization favors
      undertrained LLMs" (arXiv 2411.17691):
      ``ΔqLoss(N, D, P) = k · D^β / (N^α · P^γ)`` — N (non-embedding) parameters,
      D training tokens, P bit-width; ΔqLoss the cross-entropy increase (nats) caused by
      post-training quantization.  ``qid_loss``, ``QID_LAW``, ``fit_qid_law``.
      In log space the law is linear in ``(log k, α, β, γ)``, so the fit is an ordinary
      linear regression (and is checked against one in the tests).
  (b) floating-point quantization training ("Capybara" law), Sun et al., "Scaling laws
      for floating-point quantization training" (arXiv 2501.02423, Eq. 26 of the ICML
      version / App. B.1):
      ``L(N, D, E, M, B) = n/N^α + d/D^β + ε + (D^β/N^α) · log2(B) / (γ (E+0.5)^δ (M+0.5)^ν)``
      — E exponent bits, M mantissa bits, B the number of elements sharing one scaling
      factor (block size; channel-wise scaling uses the channel length).
      ``fp_quant_loss``, ``FP_QUANT_LAW``, ``fit_fp_quant_law``.

Published constants
-------------------
``PAPER_FP_PARAMS`` (arXiv 2501.02423, App. B.1, Table 2 "Fitted constants and their
values in Eq. (26)"; raw units: N parameters, D tokens, B elements):
n = 69.2343, α = 0.2368, d = 68973.0621, β = 0.5162, ε = 1.9061, γ = 11334.5197,
δ = 3.1926, ν = 2.9543.  Confirmed: the same eight values appear in a stored text of the
ICML 2025 paper and in a January 2025 summary of the arXiv preprint.  Sanity check:
N = 41M, D = 10.5B, E4M3, B = 128 gives L ≈ 3.46, inside the ≈ 2.6–3.8 loss range of
the paper's predicted-vs-actual plots.

``PAPER_QID_PARAMS`` (arXiv 2411.17691, the unified law fitted to Pythia + GPTQ
checkpoints; N non-embedding parameters, D tokens, P bits, ΔqLoss in nats):
k = 0.017, α = 0.2261, β = 0.5251, γ = 5.4967: the caption of the paper's Figure 6 ("the
unified scaling law we fit based on Eq (8)"), read from a verbatim rendering of the arXiv HTML
(not the PDF; see papers/scaling_laws/README.md). Note that the paper's Table 1 is not
reproduced by these constants beyond 2 bits (the card quantifies it).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping

import numpy as np
from scipy.optimize import least_squares

PAPER_FP_PARAMS: Mapping[str, float] = types.MappingProxyType(
    {
        "n": 69.2343,
        "alpha": 0.2368,
        "d": 68973.0621,
        "beta": 0.5162,
        "epsilon": 1.9061,
        "gamma": 11334.5197,
        "delta": 3.1926,
        "nu": 2.9543,
    }
)
PAPER_QID_PARAMS: Mapping[str, float] = types.MappingProxyType(
    {"k": 0.017, "alpha": 0.2261, "beta": 0.5251, "gamma": 5.4967}
)

_LOG_TINY = -700.0  # log of a non-positive or non-finite prediction (a huge but finite residual)


# --------------------------------------------------------------------------------- laws


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ParametricLaw:
    """A positive parametric law ``y = f(params, X)`` to be fitted in log space."""

    name: str  # short name used in messages
    param_names: tuple[str, ...]  # order of the parameter vector
    input_names: tuple[str, ...]  # keys that X must provide (1-D arrays of equal length)
    f: Callable[[Mapping[str, float], Mapping[str, np.ndarray]], np.ndarray]  # the law
    p0: Mapping[str, float]  # default first start (natural units)
    bounds: Mapping[str, tuple[float, float]]  # natural-unit bounds; random starts are drawn inside
    log_params: frozenset[str] = frozenset()  # positive parameters fitted as log(p)

    def __post_init__(self):
        names = set(self.param_names)
        if len(names) != len(self.param_names):
            raise ValueError(f"{self.name}: duplicate parameter names {self.param_names}")
        for what, keys in (("p0", self.p0), ("bounds", self.bounds)):
            if set(keys) != names:
                raise ValueError(
                    f"{self.name}: {what} keys {sorted(keys)} != params {sorted(names)}"
                )
        if not self.log_params <= names:
            raise ValueError(f"{self.name}: unknown log_params {sorted(self.log_params - names)}")
        for p in self.param_names:
            lo, hi = self.bounds[p]
            if not lo < hi or (p in self.log_params and lo < 0):
                raise ValueError(f"{self.name}: bad bounds {(lo, hi)} for {p}")
            if not lo <= self.p0[p] <= hi or (p in self.log_params and self.p0[p] <= 0):
                raise ValueError(f"{self.name}: p0[{p}]={self.p0[p]} outside bounds {(lo, hi)}")

    # natural parameters <-> optimisation vector θ (log for log_params)
    def to_theta(self, params: Mapping[str, float]) -> np.ndarray:
        return np.array(
            [
                math.log(params[p]) if p in self.log_params else float(params[p])
                for p in self.param_names
            ]
        )

    def from_theta(self, theta: np.ndarray) -> dict[str, float]:
        return {
            p: float(math.exp(t)) if p in self.log_params else float(t)
            for p, t in zip(self.param_names, theta, strict=True)
        }

    def theta_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = [], []
        for p in self.param_names:
            a, b = self.bounds[p]
            if p in self.log_params:
                a = math.log(a) if a > 0 else -np.inf
                b = math.log(b) if np.isfinite(b) else np.inf
            lo.append(a)
            hi.append(b)
        return np.array(lo), np.array(hi)


def _qid(params: Mapping[str, float], X: Mapping[str, np.ndarray]) -> np.ndarray:
    return (
        params["k"]
        * X["D"] ** params["beta"]
        / (X["N"] ** params["alpha"] * X["P"] ** params["gamma"])
    )


def _fp(params: Mapping[str, float], X: Mapping[str, np.ndarray]) -> np.ndarray:
    N, D = X["N"], X["D"]
    n_term = params["n"] / N ** params["alpha"]
    d_term = params["d"] / D ** params["beta"]
    quant = (
        (D ** params["beta"] / N ** params["alpha"])
        * np.log2(X["B"])
        / (params["gamma"] * (X["E"] + 0.5) ** params["delta"] * (X["M"] + 0.5) ** params["nu"])
    )
    return n_term + d_term + params["epsilon"] + quant


QID_LAW = ParametricLaw(
    name="qid (arXiv 2411.17691)",
    param_names=("k", "alpha", "beta", "gamma"),
    input_names=("N", "D", "P"),
    f=_qid,
    p0=types.MappingProxyType({"k": 1e-2, "alpha": 0.3, "beta": 0.3, "gamma": 3.0}),
    bounds=types.MappingProxyType(
        {"k": (1e-12, 1e12), "alpha": (-5.0, 5.0), "beta": (-5.0, 5.0), "gamma": (-20.0, 20.0)}
    ),
    log_params=frozenset({"k"}),
)

FP_QUANT_LAW = ParametricLaw(
    name="fp quantization training (arXiv 2501.02423)",
    param_names=("n", "alpha", "d", "beta", "epsilon", "gamma", "delta", "nu"),
    input_names=("N", "D", "E", "M", "B"),
    f=_fp,
    # generic start: Chinchilla-like magnitudes, not the paper's fit
    p0=types.MappingProxyType(
        {
            "n": 400.0,
            "alpha": 0.34,
            "d": 400.0,
            "beta": 0.28,
            "epsilon": 1.7,
            "gamma": 1e3,
            "delta": 2.0,
            "nu": 2.0,
        }
    ),
    bounds=types.MappingProxyType(
        {
            "n": (1e-3, 1e7),
            "alpha": (0.01, 1.5),
            "d": (1e-3, 1e9),
            "beta": (0.01, 1.5),
            "epsilon": (1e-3, 10.0),
            "gamma": (1e-3, 1e10),
            "delta": (0.0, 8.0),
            "nu": (0.0, 8.0),
        }
    ),
    log_params=frozenset({"n", "d", "epsilon", "gamma"}),
)


# ------------------------------------------------------------------------ input checks


def _vector(v, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype == object or not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    ):
        raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
    a = np.atleast_1d(a.astype(np.float64))
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _positive(a: np.ndarray, name: str, *, at_least: float = 0.0, strict: bool = True) -> None:
    bad = a <= at_least if strict else a < at_least
    if np.any(bad):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {at_least} everywhere (min is {a.min()})")


def _inputs(law: ParametricLaw, X: Mapping[str, object]) -> dict[str, np.ndarray]:
    missing = [k for k in law.input_names if k not in X]
    if missing:
        raise ValueError(f"{law.name}: X lacks inputs {missing}")
    out = {k: _vector(X[k], k) for k in law.input_names}
    sizes = {k: v.size for k, v in out.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{law.name}: inputs have different lengths {sizes}")
    return out


# ------------------------------------------------------------------------------ fitting


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class FitResult:
    """Outcome of ``fit_law`` (all arrays read-only, parameters in ``law.param_names`` order)."""

    law: ParametricLaw  # the fitted law
    params: Mapping[str, float]  # best-fit parameters by name (natural units)
    rms_log: float  # sqrt(mean((log y − log f)²))
    r2_log: float  # 1 − SS_res / SS_tot of log y (NaN when log y is constant)
    n_points: int  # number of data points
    cov: np.ndarray | None  # [p, p] asymptotic covariance (delta method); None if singular
    ci: Mapping[str, tuple[float, float]] | None  # bootstrap percentile intervals
    ci_level: float | None  # e.g. 0.95
    boot_params: np.ndarray | None  # [n_boot − failures, p] bootstrap estimates
    n_boot_failed: int  # bootstrap resamples whose fit failed

    @property
    def stderr(self) -> Mapping[str, float] | None:
        """Asymptotic standard errors ``sqrt(diag(cov))``."""
        if self.cov is None:
            return None
        return types.MappingProxyType(
            dict(zip(self.law.param_names, np.sqrt(np.diag(self.cov)).tolist(), strict=True))
        )

    def predict(self, X: Mapping[str, object]) -> np.ndarray:
        return self.law.f(self.params, _inputs(self.law, X))


def _residual_fn(law: ParametricLaw, X: Mapping[str, np.ndarray], log_y: np.ndarray):
    def fun(theta: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            pred = np.asarray(law.f(law.from_theta(theta), X), dtype=np.float64)
            ok = np.isfinite(pred) & (pred > 0)
            log_pred = np.where(ok, np.log(np.where(ok, pred, 1.0)), _LOG_TINY)
        return log_y - log_pred

    return fun


def _solve(fun, starts: list[np.ndarray], lo: np.ndarray, hi: np.ndarray):
    """Best ``least_squares`` solution over the starts (None if none is finite)."""
    best = None
    for x0 in starts:
        # least_squares needs a feasible start; stay a hair inside the box
        span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
        x0 = np.clip(x0, lo + 1e-9 * span, hi - 1e-9 * span)
        try:
            res = least_squares(fun, x0, bounds=(lo, hi), method="trf", x_scale="jac")
        except (ValueError, np.linalg.LinAlgError):
            continue
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    return best


def _random_starts(law: ParametricLaw, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    lo, hi = law.theta_bounds()
    center = law.to_theta(law.p0)
    finite = np.isfinite(lo) & np.isfinite(hi)
    starts = []
    for _ in range(count):
        u = rng.uniform(np.where(finite, lo, 0.0), np.where(finite, hi, 1.0))
        starts.append(np.where(finite, u, center + rng.normal(size=center.shape)))
    return starts


def fit_law(
    law: ParametricLaw,
    X: Mapping[str, object],
    y,
    *,
    p0: Mapping[str, float] | None = None,
    n_starts: int = 8,
    seed: int = 0,
    n_boot: int = 0,
    ci_level: float = 0.95,
) -> FitResult:
    """Least squares of ``log y`` on ``log f(θ, X)`` from ``p0`` (default ``law.p0``) and
    ``n_starts − 1`` random starts; bootstrap percentile CIs when ``n_boot > 0``.

    Bootstrap fits start from the full-data optimum (one start each).  ``seed`` fixes both
    the random starts and the resamples.
    """
    Xa = _inputs(law, X)
    ya = _vector(y, "y")
    _positive(ya, "y")
    m, p = ya.size, len(law.param_names)
    if ya.size != next(iter(Xa.values())).size:
        raise ValueError(f"y has {ya.size} points but X has {next(iter(Xa.values())).size}")
    if m <= p:
        raise ValueError(f"{law.name}: need more points than parameters ({m} ≤ {p})")
    if n_starts < 1 or n_boot < 0 or not 0.0 < ci_level < 1.0:
        raise ValueError(f"bad n_starts={n_starts}, n_boot={n_boot} or ci_level={ci_level}")
    start = dict(law.p0 if p0 is None else p0)
    if set(start) != set(law.param_names):
        raise ValueError(f"p0 keys {sorted(start)} != params {sorted(law.param_names)}")

    rng_starts, rng_boot = (np.random.default_rng([seed, i]) for i in range(2))
    lo, hi = law.theta_bounds()
    log_y = np.log(ya)
    starts = [law.to_theta(start)] + _random_starts(law, rng_starts, n_starts - 1)
    res = _solve(_residual_fn(law, Xa, log_y), starts, lo, hi)
    if res is None:
        raise RuntimeError(f"{law.name}: no start gave a finite fit")

    r = res.fun
    ss_tot = float(np.sum((log_y - log_y.mean()) ** 2))
    params = law.from_theta(res.x)
    cov = _covariance(law, res, m)

    ci = boot = None
    failed = 0
    if n_boot > 0:
        samples = []
        for _ in range(n_boot):
            idx = rng_boot.integers(0, m, size=m)
            Xb = {k: v[idx] for k, v in Xa.items()}
            rb = _solve(_residual_fn(law, Xb, log_y[idx]), [res.x], lo, hi)
            if rb is None:
                failed += 1
            else:
                fitted = law.from_theta(rb.x)
                samples.append([fitted[name] for name in law.param_names])
        if not samples:
            raise RuntimeError(f"{law.name}: every bootstrap fit failed")
        boot = np.array(samples)
        q = np.quantile(boot, [(1 - ci_level) / 2, (1 + ci_level) / 2], axis=0)
        ci = types.MappingProxyType(
            {name: (float(q[0, j]), float(q[1, j])) for j, name in enumerate(law.param_names)}
        )
        boot.setflags(write=False)

    return FitResult(
        law=law,
        params=types.MappingProxyType(params),
        rms_log=float(np.sqrt(np.mean(r**2))),
        r2_log=float(1.0 - np.sum(r**2) / ss_tot) if ss_tot > 0 else float("nan"),
        n_points=m,
        cov=cov,
        ci=ci,
        ci_level=ci_level if n_boot > 0 else None,
        boot_params=boot,
        n_boot_failed=failed,
    )


def _covariance(law: ParametricLaw, res, m: int) -> np.ndarray | None:
    """``s² (JᵀJ)⁻¹`` in θ, mapped to natural parameters by ``diag(dp/dθ)``."""
    J = np.asarray(res.jac, dtype=np.float64)
    p = J.shape[1]
    jtj = J.T @ J
    if not np.all(np.isfinite(jtj)) or np.linalg.cond(jtj) > 1e14:
        return None
    s2 = float(np.sum(res.fun**2)) / (m - p)
    cov_theta = s2 * np.linalg.inv(jtj)
    params = law.from_theta(res.x)
    g = np.array([params[n] if n in law.log_params else 1.0 for n in law.param_names])
    cov = cov_theta * g[:, None] * g[None, :]
    cov.setflags(write=False)
    return cov


# ------------------------------------------------------------------ the two paper laws


def qid_loss(N, D, P, *, k: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """``ΔqLoss = k · D^β / (N^α · P^γ)`` (arXiv 2411.17691).  N, D, P > 0."""
    X = _check_qid_inputs(N, D, P)
    out = _qid({"k": k, "alpha": alpha, "beta": beta, "gamma": gamma}, X)
    return out if np.ndim(N) else out[0]


def fp_quant_loss(
    N,
    D,
    E,
    M,
    B,
    *,
    n: float,
    alpha: float,
    d: float,
    beta: float,
    epsilon: float,
    gamma: float,
    delta: float,
    nu: float,
) -> np.ndarray:
    """``L = n/N^α + d/D^β + ε + (D^β/N^α) log2(B) / (γ (E+0.5)^δ (M+0.5)^ν)``
    (arXiv 2501.02423, Eq. 26).  N, D > 0; E, M ≥ 0; B ≥ 1."""
    X = _check_fp_inputs(N, D, E, M, B)
    params = {
        "n": n,
        "alpha": alpha,
        "d": d,
        "beta": beta,
        "epsilon": epsilon,
        "gamma": gamma,
        "delta": delta,
        "nu": nu,
    }
    out = _fp(params, X)
    return out if np.ndim(N) else out[0]


def _check_fp_inputs(N, D, E, M, B) -> dict[str, np.ndarray]:
    X = _inputs(
        FP_QUANT_LAW,
        {
            "N": np.atleast_1d(N),
            "D": np.atleast_1d(D),
            "E": np.atleast_1d(E),
            "M": np.atleast_1d(M),
            "B": np.atleast_1d(B),
        },
    )
    _positive(X["N"], "N")
    _positive(X["D"], "D")
    _positive(X["E"], "E", strict=False)
    _positive(X["M"], "M", strict=False)
    _positive(X["B"], "B", at_least=1.0, strict=False)
    return X


def _check_qid_inputs(N, D, P) -> dict[str, np.ndarray]:
    X = _inputs(QID_LAW, {"N": np.atleast_1d(N), "D": np.atleast_1d(D), "P": np.atleast_1d(P)})
    for name in ("N", "D", "P"):
        _positive(X[name], name)
    return X


def fit_qid_law(N, D, P, dloss, **kwargs) -> FitResult:
    """Fit ``ΔqLoss(N, D, P)`` (arXiv 2411.17691); ``kwargs`` go to ``fit_law``."""
    return fit_law(QID_LAW, _check_qid_inputs(N, D, P), dloss, **kwargs)


def fit_fp_quant_law(N, D, E, M, B, loss, **kwargs) -> FitResult:
    """Fit the FP-quantization-training law (arXiv 2501.02423); ``kwargs`` go to ``fit_law``."""
    return fit_law(FP_QUANT_LAW, _check_fp_inputs(N, D, E, M, B), loss, **kwargs)
