# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""The second-order (OBS) column loop shared by GPTQ-style quantizers.

Frantar, Ashkboos, Hoefler, Alistarh, arXiv 2210.17323 (GPTQ), Algorithm 1 and §4 Steps 1–3,
in the Optimal Brain Surgeon form of Hassibi & Stork (1993) / arXiv 2208.11580 (OBC) eq. 2–3.
For the layer objective ``‖WX − ŴX‖²`` the Hessian of every row of ``W[rows, n]`` is
``H = 2XXᵀ``. Columns (input channels) are quantized left to right; the error of column ``j``
is spread over the not-yet-quantized columns through the inverse Hessian of those columns,
whose rows are the rows of ``U = chol(H⁻¹)ᵀ`` (upper, ``H⁻¹ = UᵀU``):

    e = (w_j − q_j) / U_jj,        W[:, k] −= e · U_jk   (k > j),       loss += ‖e‖² / 2

A *vector* step quantizes ``k`` consecutive columns ``S`` jointly (GPTVQ, arXiv 2402.15319,
Algorithm 1; VPTQ, arXiv 2409.17066 eq. 5): with ``δ = W_S − Q_S``,

    E U_SS = δ  (a triangular solve),    W[:, rest] −= E · U[S, rest],    loss += ‖E‖² / 2

which for ``k = 1`` is the line above, and for any ``k`` equals ``k`` scalar steps whose
rounded values were fixed in advance (forward substitution); ``‖E‖²/2 = δ[H_F⁻¹]_SS⁻¹δᵀ/2`` is
the OBS error of the joint step.

Lazy batches (GPTQ §4 Step 2): inside a block of ``B`` columns the updates are applied column
by column to the block only; the columns after the block receive them once, as ``E · U[block,
rest]``. All of it is compiled: a ``lax.scan`` over blocks, a ``lax.fori_loop`` over the
parameter groups of a block (when the quantizer chooses parameters as it goes) and over the
block's steps.

The quantizer is two callbacks (closures over whatever the method needs, e.g. ``U``'s diagonal):

* ``step(w, j, d, state) -> (q, out)``: ``w [rows, k]`` the current (error-updated) columns
  ``j … j+k−1``, ``d [k]`` their ``U_jj``; returns the dequantized columns ``q [rows, k]`` and
  a pytree ``out`` of ``[rows, k]`` arrays (codes, outlier masks …) that the loop collects
  into ``[rows, n]`` arrays. ``state`` is read-only here.
* ``choose(Wg, Wc, j0, state) -> state`` (optional): called before the ``group`` columns that
  start at ``j0``, with ``Wg [rows, group]`` those columns as they are *now* (all updates so far,
  including the current block's), and ``Wc [rows, n]`` the lazily updated whole ``W`` (the
  current block's own updates not yet applied — what IST-DASLab/gptq's ``W[:, i:i+g]`` reads).
  GPTQ fits a group's scale / zero point from ``Wc``; SpQR fits its β₁-group statistics (with a
  leave-one-out outlier refit) from ``Wg``.

``inverse_hessian_factor`` and ``check_hessian`` prepare ``U`` and check the calibration; the
loop itself (``obs_loop``) is unchecked array math: a NaN in ``U`` gives NaN results, so the
methods' checked entries call ``check_hessian`` before and ``check_solved`` after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

_HI = jax.lax.Precision.HIGHEST

# ``H`` is "not PSD" when ``H + PSD_RTOL · trace(H) · I`` has no Cholesky factor, i.e. an
# eigenvalue below ``−PSD_RTOL · trace H`` (``trace H ≥ λ_max`` for a PSD matrix). A float32
# ``2XXᵀ/N`` has rounding errors of order ``ε₃₂ · trace H`` with a small factor (≲ 1e-5); the
# real SmolLM2 Hessians' smallest eigenvalues are ≥ +2.7e-9 · trace (float64 eigvalsh).
PSD_RTOL = 1e-4


def fix_dead(H: Float[Array, "n n"]) -> tuple[Float[Array, "n n"], Bool[Array, " n"]]:
    """``H`` with ``H_jj := 1`` on dead inputs (``H_jj = 0``: the input was zero on every
    calibration token, so its row and column of ``H`` are zero too), and the dead mask.

    This is IST-DASLab/gptq's fallback: a dead column is decoupled from the others (its row of
    ``U`` is ``e_j / sqrt(1 + λ)``), so it receives and spreads no error. The methods also zero
    its weights, as the reference does — harmless when the input is truly dead, and the choice
    that keeps the reference's numbers (a kept column would change its group's min-max range)."""
    dead = jnp.diag(H) == 0
    return H + jnp.diag(dead.astype(H.dtype)), dead


def inverse_hessian_factor(
    H: Float[Array, "n n"], percdamp: float, *, symmetrize: bool = True
) -> Float[Array, "n n"]:
    """``U`` upper triangular with ``(H + λI)⁻¹ = UᵀU``, ``λ = percdamp · mean(diag H)``, after
    :func:`fix_dead` (GPTQ §4 Step 3: Cholesky of ``H``, its inverse, then the Cholesky factor
    of the inverse).

    ``symmetrize``: the inverse from ``cho_solve`` is symmetric only up to rounding; ``True``
    factors ``(H⁻¹ + H⁻ᵀ)/2`` (what both GPTQ and SpQR use), ``False`` reads its lower
    triangle only (LAPACK ``potrf``). Unchecked: an ``H + λI`` that is not positive definite
    gives a NaN factor (see :func:`check_hessian` / :func:`check_solved`)."""
    n = H.shape[0]
    H, _ = fix_dead(H)
    Hd = H + percdamp * jnp.mean(jnp.diag(H)) * jnp.eye(n, dtype=H.dtype)
    L = jnp.linalg.cholesky(Hd)
    Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(n, dtype=H.dtype))
    if symmetrize:
        Hinv = (Hinv + Hinv.T) / 2
    return jnp.linalg.cholesky(Hinv, symmetrize_input=False).T


def pad_decoupled(
    W: Float[Array, "rows n"], U: Float[Array, "n n"], m: int
) -> tuple[Float[Array, "rows m"], Float[Array, "m m"]]:
    """``W`` and ``U`` padded to ``m`` columns: zero weights with identity rows of ``U``, so the
    padded columns are decoupled from the real ones and a quantizer that maps 0 to 0 leaves
    them exactly zero (whole blocks for :func:`obs_loop`)."""
    n = W.shape[1]
    pad = m - n
    U = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(m) >= n).astype(U.dtype))
    return jnp.pad(W, ((0, 0), (0, pad))), U


class LoopResult(NamedTuple):
    W: Float[Array, "rows n"]  # every column replaced by its quantized value q
    out: Any  # the step's ``out`` pytree, each leaf collected to [rows, n]
    state: Any  # the quantizer state after the last column
    err: Float[Array, " rows"]  # Σ ‖E‖² per row: twice the OBS estimate of ‖(W − Ŵ)X‖² / 2


def obs_loop(
    W: Float[Array, "rows n"],
    U: Float[Array, "n n"],
    step: Callable,
    *,
    block_size: int,
    k: int = 1,
    group: int | None = None,
    choose: Callable | None = None,
    state: Any = None,
) -> LoopResult:
    """The lazy-batch OBS column loop (see the module docstring). Traceable; unchecked.

    ``block_size`` must divide ``n`` (pad with :func:`pad_decoupled`); ``group`` (the cadence
    of ``choose``, default ``block_size``) must divide ``block_size`` and ``k`` must divide
    ``group`` (a vector never straddles a parameter group or a block)."""
    rows, n = W.shape
    B = block_size
    group = B if group is None else group
    if n % B or B % group or group % k:
        raise ValueError(
            f"obs_loop: need block_size | n, group | block_size and k | group; got n={n}, "
            f"block_size={B}, group={group}, k={k}"
        )
    W = W.astype(jnp.float32)
    U = U.astype(jnp.float32)
    _, out_shape = jax.eval_shape(
        lambda w, s: step(w, jnp.int32(0), jnp.ones((k,), jnp.float32), s), W[:, :k], state
    )

    def block(carry, b):
        Wc, st = carry
        i1 = b * B
        W1 = jax.lax.dynamic_slice_in_dim(Wc, i1, B, axis=1)
        Ub = jax.lax.dynamic_slice_in_dim(U, i1, B, axis=0)  # U[block, :]; zero left of block
        U1 = jax.lax.dynamic_slice_in_dim(Ub, i1, B, axis=1)  # U[block, block]
        d1 = jnp.diag(U1)

        def column(t, c, st):
            W1, E1, outs = c
            i = t * k
            w = jax.lax.dynamic_slice_in_dim(W1, i, k, axis=1)
            d = jax.lax.dynamic_slice_in_dim(d1, i, k)
            q, o = step(w, i1 + i, d, st)
            q = q.astype(jnp.float32)
            if k == 1:  # the scalar OBS update, as GPTQ's reference writes it
                u = jax.lax.dynamic_index_in_dim(U1, i, axis=0, keepdims=False)
                e = (w[:, 0] - q[:, 0]) / d[0]
                # u[l] = 0 for l < i (U is upper triangular); column i becomes q. One select
                # fused with the update: a separate dynamic_update_slice of q costs a copy of
                # the block per column on XLA:CPU (3–4× GPTQ's time on a 1536 × 576 layer).
                here = jnp.arange(B)[None, :] == i
                W1 = jnp.where(here, q, W1 - e[:, None] * u[None, :])
                e = e[:, None]
            else:  # joint step: E · U_SS = W_S − Q_S
                Uss = jax.lax.dynamic_slice(U1, (i, i), (k, k))
                e = jax.scipy.linalg.solve_triangular(Uss, (w - q).T, trans="T", lower=False).T
                Us = jax.lax.dynamic_slice_in_dim(U1, i, k, axis=0)  # U[S, block]
                W1 = W1 - jnp.matmul(e, Us, precision=_HI)
                W1 = jax.lax.dynamic_update_slice_in_dim(W1, q, i, axis=1)
            E1 = jax.lax.dynamic_update_slice_in_dim(E1, e, i, axis=1)
            outs = jax.tree_util.tree_map(
                lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x.astype(a.dtype), i, 1),
                outs,
                o,
            )
            return W1, E1, outs

        outs0 = jax.tree_util.tree_map(lambda s: jnp.zeros((rows, B), s.dtype), out_shape)
        c = (W1, jnp.zeros((rows, B), jnp.float32), outs0)
        if choose is None:
            c = jax.lax.fori_loop(0, B // k, lambda t, c: column(t, c, st), c)
        else:

            def parameter_group(gi, cs):
                c, st = cs
                j0 = gi * group
                st = choose(jax.lax.dynamic_slice_in_dim(c[0], j0, group, axis=1), Wc, i1 + j0, st)
                per = group // k
                c = jax.lax.fori_loop(gi * per, (gi + 1) * per, lambda t, c: column(t, c, st), c)
                return c, st

            c, st = jax.lax.fori_loop(0, B // group, parameter_group, (c, st))
        W1, E1, outs = c
        Wc = Wc - jnp.matmul(E1, Ub, precision=_HI)  # lazy batch update of the later columns
        Wc = jax.lax.dynamic_update_slice_in_dim(Wc, W1, i1, axis=1)
        return (Wc, st), (outs, jnp.sum(jnp.square(E1), axis=1))

    (Wc, st), (outs, errs) = jax.lax.scan(block, (W, state), jnp.arange(n // B))
    unblock = lambda A: jnp.moveaxis(A, 0, 1).reshape(rows, n)
    return LoopResult(Wc, jax.tree_util.tree_map(unblock, outs), st, jnp.sum(errs, axis=0))


# ----------------------------------------------------------------------------- checks


def check_hessian(H: Float[Array, "n n"], *, who: str) -> int | Array:
    """The checked entry's calibration checks; returns the number of dead inputs.

    Raises ``ValueError`` when ``H`` has a NaN/Inf entry, when every input is dead
    (``diag H = 0``: the layer's calibration inputs are all zero — GPTQ would return an all-zero
    weight), or when ``H`` is not positive semi-definite (a negative diagonal entry, or an
    eigenvalue below ``−PSD_RTOL · trace H``: no Cholesky factor of ``H + PSD_RTOL·trace(H)·I``,
    in float64). Partly dead inputs are the documented fallback of :func:`fix_dead`.

    Under ``jax.jit`` (``H`` a tracer) nothing is checked and the count is a traced scalar."""
    if isinstance(H, jax.core.Tracer):
        return jnp.sum(jnp.diag(H) == 0)
    A = np.asarray(jnp.asarray(H, jnp.float32), np.float64)
    bad = ~np.isfinite(A)
    if bad.any():
        idx = tuple(int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"{who}: the Hessian H has {int(bad.sum())} NaN/Inf (non-finite) value(s), "
            f"first at index {idx}"
        )
    diag = np.diag(A)
    if not diag.any():
        raise ValueError(
            f"{who}: the calibration inputs of this layer are all zero (H = 0 on the diagonal): "
            "there is nothing to fit the weights to"
        )
    if (diag < 0).any():
        j = int(np.argmax(diag < 0))
        raise ValueError(
            f"{who}: H is not positive semi-definite: H[{j}, {j}] = {diag[j]:.3g} < 0 "
            "(H = 2XXᵀ of real inputs cannot have a negative diagonal)"
        )
    margin = PSD_RTOL * float(np.sum(diag))
    try:
        np.linalg.cholesky(A + margin * np.eye(A.shape[0]))
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{who}: H is not positive semi-definite: it has an eigenvalue below "
            f"−{PSD_RTOL:g}·trace(H) = {-margin:.3g} (H = 2XXᵀ of real inputs is PSD)"
        ) from None
    return int(np.sum(diag == 0))


def check_solved(x: Array, *, who: str, percdamp: float) -> None:
    """Raise when the loop's result ``x`` (a loss or the quantized weight) is not finite: then
    ``H + λI`` had no Cholesky factor in float32 (the factor is NaN). Skipped under jit."""
    if isinstance(x, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(
            f"{who}: H + λI is not positive definite in float32 even after damping "
            f"(λ = percdamp·mean diag H, percdamp={percdamp:g}); the inverse-Hessian factor is "
            "NaN — raise percdamp"
        )
