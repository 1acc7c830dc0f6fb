# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""SpQR — GPTQ with tiny groups, quantized group statistics and sensitivity-chosen outliers.

Dettmers, Svirschevski, Egiazarian, Kuznedelev, Frantar, Ashkboos, Borzunov, Hoefler, Alistarh,
"SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression",
arXiv 2306.03078, §4 and Algorithm 1; checked against Vahe1994/SpQR ``spqr_engine.py``
(``SPQRUtil.quantize``, ``get_leave_one_out_error``), ``quant_groups.py`` (``Quantizer``) and
``main.py`` (``get_average_number_of_bits``).

Symbols (the paper's): ``W[m, n]`` (out × in), ``H = 2XXᵀ`` (``LayerStats.H``), damping
``λ`` (relative to mean diag H), ``β₁`` first-level group size (input axis), ``β₂``
second-level group size (output axis), ``b_w`` weight bits, ``b_s`` bits of the quantized
group scales, ``τ`` outlier threshold.

Algorithm (one linear):

1. ``H += λ·mean(diag H)·I``; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``.
   ``U = chol(H⁻¹)ᵀ`` (upper): ``U_jj²`` is ``[H⁻¹]_jj`` restricted to the columns not yet
   quantized — the denominator of the OBS error and of the sensitivity.
2. ``τ_abs = τ · mean_j(var_i W_ij / U_jj²)`` (the repo's ``outlier_relative_threshold``).
3. Columns left to right (GPTQ's lazy batches of ``block`` columns). When a group of ``β₁``
   columns begins, its statistics are fitted per output row on the current (error-updated)
   weights *without* the likely outliers: leave-one-out — for every weight, how much the
   group's error ``Σ_k ((w_k − q(w_k)) / U_kk)²`` drops when the min-max grid is fitted
   without it; weights whose drop exceeds ``τ_abs`` are replaced by the mean of the others
   before the min-max fit. The ``b_w``-bit grid gets scale ``s`` and integer zero ``z``; the
   scales of ``β₂`` consecutive output rows are then min-max quantized to ``b_s`` bits
   (second level: fp16 scale and fp16 zero per ``β₂ × β₁`` tile) and the *quantized* scale is
   the one used.
4. Column ``j``: ``q = Q(w)``; the sensitivity ``((w − q) / U_jj)² = (w − q)²/[H⁻¹]_jj``
   above ``τ_abs`` makes ``w`` an outlier, kept as float16 (``q := fp16(w)``); then the OBS
   update ``W[:, k] −= e·U_jk`` (k > j) with ``e = (w − q)/U_jj``.

Storage (``numerics.sparse.DenseSparse`` of a ``QArray``) and bits per weight:

* codes ``b_w`` bits; zero points: ``b_w``-bit integers (the repo's ``round_zero=True`` path,
  where a zero of at most ``b_s`` bits needs no second level); first-level scales: ``b_s``-bit
  codes (an inner ``QArray``) whose fp16 scale and fp16 zero are shared by ``β₂`` rows;
  outliers: 32 bits each (fp16 value + 16-bit column index, §4.2).
  ``bpw = b_w + (b_s + b_w)/β₁ + 32/(β₁β₂) + 32·(outlier share)`` — the repo's
  ``get_average_number_of_bits(round_zero=True)``; 3.5 bits + outliers for the defaults.

Differences from the reference, on purpose (each keeps the stored format exact):

* the first-level grid includes 0 (``[min(w,0), max(w,0)]``, as GPTQ's quantizer), so the
  rounded zero point always fits ``b_w`` bits; the repo's default keeps a float zero point and
  quantizes it with a second level too (``--round_zero`` off: 3.625 bits + outliers);
* the second-level zero is a 16-bit float (the repo's ``qqq_zero_bits=16``); the inner
  ``QArray`` therefore uses the *table* format of the levels ``0..2^{b_s}−1``, whose zero
  points numerics counts (and stores) as 16-bit floats;
* the leave-one-out fit uses the same grid as the stored one (repo: its plain quantizer);
* no input permutation (``permutation_order="identity"``, the repo's default): a ``QArray``
  holds contiguous groups of the original column order;
* ``block`` is shrunk to the largest multiple of ``β₁`` that divides ``n`` (the repo allows a
  ragged last block; the block size does not change the result, only the schedule).

Everything from step 1 to the final codes is one compiled function (``spqr_quantize``): the
factor and the lazy-batch column loop are the shared engine ``numerics.second_order``
(``inverse_hessian_factor`` with symmetrised ``H⁻¹``, ``obs_loop``; GPTQ is its other
configuration) — a ``lax.scan`` over blocks, ``lax.fori_loop`` over the β₁-groups of a block
(``choose``: steps 2–3) and over a group's columns (``step``: step 4). Only the final
extraction of the outliers (their count is data-dependent) runs eagerly.

Degenerate calibration (``quantize_layer``; ``spqr_quantize`` is unchecked): a non-finite,
all-zero (every input dead) or non-PSD ``H`` raises ``ValueError``
(``numerics.second_order.check_hessian``), so does a non-finite result (no float32 Cholesky
factor of ``H + λI``); partly dead inputs take step 1's fallback (the reference's: zero
weights, harmless for a truly dead input) and are counted in ``info["dead_inputs"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, UInt8

from methods.base import LayerResult, LayerStats, check_bits
from numerics import second_order as so
from numerics.formats import IntFormat, codebook_format
from numerics.qarray import QArray
from numerics.sparse import DenseSparse, split_outliers, weight_bits

EAGER_ONLY = (
    "the number of outliers is data-dependent; jit_inner (spqr_quantize) is the traced part"
)
_EPS = 1e-9  # smallest scale divided by (the repo's ``scale.clamp_min(eps)``)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpQRConfig:
    bits: int = 3  # b_w: bits of the dense codes (the paper's 3.94-bit LLaMA rows use 3)
    beta1: int = 16  # β₁: first-level group size along the input axis
    beta2: int = 16  # β₂: output rows whose scales share one second-level scale/zero
    scale_bits: int = 3  # b_s: bits of the quantized first-level scales (repo: qq_scale_bits)
    outlier_threshold: float = 0.2  # τ, relative (repo README: 0.2); inf: no outliers
    percdamp: float = 1.0  # λ relative to mean diag H (repo README's SpQR recipe: 1e0)
    block: int = 128  # lazy-batch block size in columns (rounded to divide n; no effect on Ŵ)
    simplified_outliers: bool = False  # skip the leave-one-out refit of group statistics

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4, 8), "SpQR")
        check_bits(self.scale_bits, (2, 3, 4, 8), "SpQR scale_bits")
        for f in ("beta1", "beta2", "block"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                raise ValueError(f"SpQR: {f} must be an int >= 2, got {v!r}")
        if self.block % self.beta1:
            raise ValueError(f"SpQR: block={self.block} must be a multiple of beta1={self.beta1}")
        if not self.outlier_threshold > 0:  # also rejects NaN
            raise ValueError(
                f"SpQR: outlier_threshold must be > 0 (inf: none), got {self.outlier_threshold}"
            )
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ValueError(f"SpQR: percdamp must be finite and >= 0, got {self.percdamp}")

    @property
    def outliers(self) -> bool:
        return math.isfinite(self.outlier_threshold)


class SpQRCodes(NamedTuple):
    """Everything ``spqr_quantize`` decides, as fixed-shape arrays (G = n / β₁ groups)."""

    W_hat: Float[Array, "m n"]  # dequantized result (outliers: their fp16 values)
    codes: UInt8[Array, "m n"]  # b_w-bit codes
    zero: Float[Array, "m G"]  # integer zero points in [0, 2^b_w − 1]
    scale_codes: UInt8[Array, "m G"]  # b_s-bit codes of the first-level scales
    scale_scale: Float[Array, "m_b2 G"]  # second-level fp16 scale (m_b2 = m / β₂)
    scale_zero: Float[Array, "m_b2 G"]  # second-level fp16 zero (code units, not integer)
    outlier: Bool[Array, "m n"]  # True where the weight is kept in fp16
    err: Float[Array, " m"]  # Σ_j e_j² per row: the OBS proxy of ‖(W − Ŵ)X‖² / 2
    tau: Float[Array, ""]  # τ_abs, the absolute threshold on (w − q)²/[H⁻¹]_jj


# ----------------------------------------------------------------------------- grids


def _fit(x: Float[Array, "... k"], maxq: int) -> tuple[Array, Array]:
    """Min-max asymmetric grid over the last axis, range widened to include 0; integer zero."""
    lo = jnp.minimum(jnp.min(x, axis=-1), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=-1), 0.0)
    flat = hi <= lo  # all zero: the repo's [-1, 1]
    lo = jnp.where(flat, -1.0, lo)
    hi = jnp.where(flat, 1.0, hi)
    s = (hi - lo) / maxq
    return s, jnp.round(-lo / s)


def _qdq(x, s, z, maxq: int) -> tuple[Array, Array]:
    """Codes and dequantized values of ``x`` on the grid ``(q − z)·s``."""
    q = jnp.clip(jnp.round(x / jnp.maximum(s, _EPS) + z), 0.0, float(maxq))
    return q, (q - z) * s


def _loo_drop(Wg: Float[Array, "m k"], d: Float[Array, " k"], maxq: int) -> Float[Array, "m k"]:
    """Drop of the group's error Σ((w − q(w))/d)² when each weight is left out of the fit."""
    k = Wg.shape[1]
    _, deq = _qdq(Wg, *(a[:, None] for a in _fit(Wg, maxq)), maxq)
    base = jnp.sum(jnp.square((deq - Wg) / d[None, :]), axis=1)  # [m]
    others = np.array([[j for j in range(k) if j != i] for i in range(k)])  # [k, k−1]
    X = Wg[:, others]  # [m, k, k−1]: row r, left-out weight i, the others
    s, z = _fit(X, maxq)
    _, deq = _qdq(X, s[..., None], z[..., None], maxq)
    loo = jnp.sum(jnp.square((deq - X) / d[others][None]), axis=2)  # [m, k]
    return base[:, None] - loo


def _second_level(s: Float[Array, " m"], beta2: int, bits: int):
    """Min-max ``bits``-bit quantization of the scales of ``beta2`` consecutive rows.

    Returns codes [m], fp16 scale and zero [m/β₂] and the dequantized scales [m]. The step is
    at least ``max/512``, so that the fp16 zero (≤ 512 in magnitude) stays accurate, and at
    least fp16's smallest normal number 2⁻¹⁴ (tinier scales then lose precision, never become
    NaN)."""
    maxq = 2**bits - 1
    S = s.reshape(-1, beta2)
    lo, hi = jnp.min(S, axis=1), jnp.max(S, axis=1)
    step = jnp.maximum(jnp.maximum((hi - lo) / maxq, hi / 512.0), 2.0**-14)
    s2 = step.astype(jnp.float16)
    z2 = (-lo / s2.astype(jnp.float32)).astype(jnp.float16)
    s2f, z2f = s2.astype(jnp.float32), z2.astype(jnp.float32)
    c = jnp.clip(jnp.round(S / s2f[:, None] + z2f[:, None]), 0.0, float(maxq))
    s_hat = (c - z2f[:, None]) * s2f[:, None]
    return c.reshape(-1).astype(jnp.uint8), s2, z2, s_hat.reshape(-1)


# ----------------------------------------------------------------------------- core


def _block_size(n: int, cfg: SpQRConfig) -> int:
    """Largest multiple of β₁ that divides n and is at most ``cfg.block``."""
    return max(b for b in range(cfg.beta1, min(cfg.block, n) + 1, cfg.beta1) if n % b == 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def spqr_quantize(W: Float[Array, "m n"], H: Float[Array, "n n"], cfg: SpQRConfig) -> SpQRCodes:
    """The compiled SpQR column loop (Algorithm 1) — see the module docstring. Unchecked: an
    all-zero, non-finite or indefinite ``H`` is caught by :func:`quantize_layer`, not here."""
    m, n = W.shape
    maxq, b1 = 2**cfg.bits - 1, cfg.beta1
    W = W.astype(jnp.float32)
    H, dead = so.fix_dead(H.astype(jnp.float32))
    W = jnp.where(dead[None, :], 0.0, W)
    U = so.inverse_hessian_factor(H, cfg.percdamp)
    dU = jnp.diag(U)
    if cfg.outliers:  # τ_abs = τ · mean_j var(W_:j) / U_jj²  (torch var: ddof = 1)
        tau = cfg.outlier_threshold * jnp.mean(jnp.var(W, axis=0, ddof=1) / jnp.square(dU))
    else:
        tau = jnp.float32(jnp.inf)

    def choose(Wg, Wc, j0, st):
        """Step 3: the statistics of the β₁-group at ``j0`` from its current weights ``Wg``."""
        del Wc  # SpQR reads the group with the current block's updates applied
        g = j0 // b1
        if cfg.outliers and not cfg.simplified_outliers:  # fit without the likely outliers
            likely = _loo_drop(Wg, jax.lax.dynamic_slice_in_dim(dU, j0, b1), maxq) > tau
            keep = (~likely).astype(jnp.float32)
            mean = jnp.sum(Wg * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1.0)
            Wg = jnp.where(likely, mean[:, None], Wg)
        s, z = _fit(Wg, maxq)
        sc, s2, z2, s_hat = _second_level(s, cfg.beta2, cfg.scale_bits)
        return {
            "zero": st["zero"].at[:, g].set(z),
            "scale_codes": st["scale_codes"].at[:, g].set(sc),
            "scale_scale": st["scale_scale"].at[:, g].set(s2),
            "scale_zero": st["scale_zero"].at[:, g].set(z2),
            "s_hat": s_hat,  # the current group's quantized scale and zero, for ``step``
            "z": z,
        }

    def step(w, j, d, st):
        """Step 4: round column ``j``; keep it in fp16 where its sensitivity exceeds τ_abs."""
        del j
        q, deq = _qdq(w[:, 0], st["s_hat"], st["z"], maxq)
        out = jnp.square((w[:, 0] - deq) / d[0]) > tau  # sensitivity (w − q)²/[H⁻¹]_jj
        deq = jnp.where(out, w[:, 0].astype(jnp.float16).astype(jnp.float32), deq)
        return deq[:, None], {"codes": q.astype(jnp.uint8)[:, None], "outlier": out[:, None]}

    G = n // b1
    st0 = {
        "zero": jnp.zeros((m, G), jnp.float32),
        "scale_codes": jnp.zeros((m, G), jnp.uint8),
        "scale_scale": jnp.zeros((m // cfg.beta2, G), jnp.float16),
        "scale_zero": jnp.zeros((m // cfg.beta2, G), jnp.float16),
        "s_hat": jnp.ones((m,), jnp.float32),
        "z": jnp.zeros((m,), jnp.float32),
    }
    r = so.obs_loop(W, U, step, block_size=_block_size(n, cfg), group=b1, choose=choose, state=st0)
    st = r.state
    return SpQRCodes(
        r.W,
        r.out["codes"],
        st["zero"],
        st["scale_codes"],
        st["scale_scale"],
        st["scale_zero"],
        r.out["outlier"],
        r.err,
        tau,
    )


# ----------------------------------------------------------------------------- storage


def to_qarray(r: SpQRCodes, cfg: SpQRConfig, dtype=jnp.float32) -> QArray:
    """The dense part as a ``QArray`` whose scale is itself a ``QArray`` (see the docstring)."""
    m, n = r.codes.shape
    G = r.zero.shape[1]
    levels = codebook_format(
        np.arange(2**cfg.scale_bits, dtype=np.float64), label=f"uint{cfg.scale_bits}-levels"
    )
    scale = QArray(
        codes=r.scale_codes,
        scale=r.scale_scale,
        zero=r.scale_zero,
        format=levels,
        block_shape=(cfg.beta2, 1),
        shape=(m, G),
        dtype=jnp.float32,
    )
    return QArray(
        codes=r.codes,
        scale=scale,
        zero=r.zero,
        format=IntFormat(bits=cfg.bits, signed=False),
        block_shape=(1, cfg.beta1),
        shape=(m, n),
        dtype=dtype,
    )


def _check(W, stats: LayerStats, cfg: SpQRConfig):
    if not isinstance(cfg, SpQRConfig):
        raise TypeError(f"SpQR: cfg must be a SpQRConfig, got {type(cfg).__name__}")
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        raise TypeError(f"SpQR: W must be a float array, got dtype {W.dtype}")
    if W.ndim != 2 or W.size == 0:
        raise ValueError(f"SpQR: W must be a non-empty matrix [out, in], got shape {W.shape}")
    m, n = W.shape
    if n % cfg.beta1:
        raise ValueError(f"SpQR: beta1={cfg.beta1} does not divide the input width {n}")
    if m % cfg.beta2:
        raise ValueError(f"SpQR: beta2={cfg.beta2} does not divide the output width {m}")
    if not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError("SpQR: W contains NaN or Inf")
    if stats.H is None:
        raise ValueError("SpQR needs LayerStats.H (the Hessian 2XXᵀ of the layer's inputs)")
    H = jnp.asarray(stats.H)
    if H.shape != (n, n):
        raise ValueError(f"SpQR: H has shape {H.shape}, expected ({n}, {n})")
    if not jnp.issubdtype(H.dtype, jnp.floating):
        raise ValueError(f"SpQR: H must be a finite float matrix, got dtype {H.dtype}")
    return W, H, so.check_hessian(H, who="SpQR")


def jit_inner(W: Float[Array, "m n"], stats: LayerStats, cfg: SpQRConfig, *, key=None) -> SpQRCodes:
    """The traceable part of ``quantize_layer``: the whole column loop, fixed-shape outputs."""
    del key
    return spqr_quantize(W, stats.H, cfg)


def quantize_layer(
    W: Float[Array, "m n"], stats: LayerStats, cfg: SpQRConfig, *, key=None
) -> LayerResult:
    """SpQR of one linear: a ``DenseSparse`` (a ``QArray`` when ``outlier_threshold`` is inf).

    The checked entry: a non-finite ``H``, all-dead inputs (an all-zero calibration) or an
    ``H`` that is not PSD raise ``ValueError`` (``numerics.second_order.check_hessian``), and
    so does a non-finite result (``H + λI`` without a float32 Cholesky factor). Partly dead
    inputs are zeroed (the reference's fallback) and counted in ``info["dead_inputs"]``.
    ``key`` is unused (SpQR is deterministic)."""
    del key
    W, H, dead = _check(W, stats, cfg)
    r = spqr_quantize(W, H, cfg)
    so.check_solved(r.W_hat, who="SpQR", percdamp=cfg.percdamp)
    dense = to_qarray(r, cfg, W.dtype)
    if cfg.outliers:
        rows, cols, vals = split_outliers(r.W_hat, r.outlier)
        weight = DenseSparse(dense, rows, cols, vals)
    else:
        weight = dense
    n_out = int(jnp.sum(r.outlier))
    info = {
        "n_outliers": n_out,
        "outlier_share": n_out / W.size,
        "bits": weight_bits(weight),
        "obs_err": float(jnp.sum(r.err)),
        "tau": float(r.tau),
        "dead_inputs": dead,
    }
    return LayerResult(weight, info)
