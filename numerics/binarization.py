# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""Binarization: sign-scale, residual (greedy multi-plane) and binary-coded quantization (BCQ).

All three write a weight tensor as a sum of n scaled sign planes, per group of ``g`` consecutive
entries of the last axis (``group_size=None``: one group per row):

    W[..., G*g + j]  ~=  sum_i  alphas[..., G, i] * planes[i, ..., G*g + j],   planes in {-1, +1}.

Storage layout (``BinaryCode``): ``alphas [..., groups, n]`` in the dtype of W (``bcq``: sorted
by decreasing magnitude; ``residual_binarize``: in greedy order); ``planes [n, ..., cols]`` int8
+-1, plane-major (each plane has the shape of W, ready for bit-packing). ``planes_to_bits`` /
``bits_to_planes`` convert to / from bool (True = +1). ``reconstruct`` rebuilds W-hat.

Sign convention: sign(0) := +1 (and sign(-0.0) := +1), so every entry gets a plane value.

* ``binarize`` -- one plane, W ~= alpha * sign(W) with alpha = mean|W| per group. For b = sign(W)
  the L2-optimal scale is <W, b> / <b, b> = mean|W| (XNOR-Net, Rastegari et al. 2016, arXiv
  1603.05279; PB-LLM, arXiv 2310.00034, uses the same alpha for its binarized weights).
* ``residual_binarize`` -- greedy planes: R_0 = W, b_i = sign(R_{i-1}), alpha_i = mean|R_{i-1}|,
  R_i = R_{i-1} - alpha_i b_i (the greedy approximation of Xu et al., "Alternating multi-bit
  quantization for recurrent neural networks", ICLR 2018, arXiv 1802.00150). Each plane lowers
  ||R||^2 by g * alpha_i^2, so the error never grows with more planes.
* ``bcq`` -- the alternating multi-bit quantization of Xu et al. (arXiv 1802.00150), i.e. the BCQ
  format ShiftAddLLM (arXiv 2406.05981) builds on: greedy init, then ``rounds`` of alternation
  per group:
    (1) alphas <- least squares given B: solve (B^T B) alpha = B^T w (n steps of conjugate
        gradients from the current alphas, as the official ShiftAddLLM code does);
        then alpha <- |alpha| sorted descending (flipping the sign of alpha_i is absorbed by
        step 3, which searches every sign pattern, so nothing is lost);
    (2) if ``pow2_alpha``: alpha <- P(alpha), the power-of-two rounding (below);
    (3) B <- for every entry, the best of the 2^n sign combinations given alpha (exhaustive).
  A round's (alpha, B) replaces the previous one only in groups where it does not raise the
  group's squared error. Without rounding each step is an exact minimiser, so this guard only
  absorbs float rounding; with ``pow2_alpha`` it is what keeps the refinement monotone.
  With ``pow2_alpha`` the greedy init's alphas are rounded by P too (B kept), so the returned
  alphas are powers of two even where no round is accepted.
  ``warm_start`` (default on) adds a second start per plane count so that the error cannot grow
  with more planes, which plain greedy-init BCQ does not guarantee (see ``bcq``).

Power-of-two rounding P (ShiftAddLLM's shift form, arXiv 2406.05981: a multiplication by alpha
becomes a bit shift): P(a) = sign(a) * 2^round(log2|a|) (nearest in the log domain, as in the
official repository's ``round_power_of_2``), P(0) = 0. ``pow2_terms = t > 1`` gives additive
powers of two (ShiftAddLLM's ``apot_nums``): t greedy terms, each P of the remaining residual.
"""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int8

MAX_BCQ_PLANES = 4  # exhaustive search over 2^n sign patterns per entry


class BinaryCode(NamedTuple):
    alphas: Float[Array, "*batch groups n"]  # per-group plane scales
    planes: Int8[Array, "n *batch cols"]  # +-1 sign planes, plane-major


# ----------------------------------------------------------------------------- helpers


def sign_pm1(x: Float[Array, "*s"]) -> Int8[Array, "*s"]:
    """sign with sign(0) = sign(-0.0) = +1, as int8 +-1."""
    return jnp.where(x >= 0, 1, -1).astype(jnp.int8)


def planes_to_bits(planes: Int8[Array, "*s"]) -> Bool[Array, "*s"]:
    """+-1 planes -> bool bits (True = +1)."""
    return jnp.asarray(planes) > 0


def bits_to_planes(bits: Bool[Array, "*s"]) -> Int8[Array, "*s"]:
    """bool bits (True = +1) -> int8 +-1 planes."""
    return jnp.where(jnp.asarray(bits), 1, -1).astype(jnp.int8)


def round_pow2(a: Float[Array, "*s"], terms: int = 1) -> Float[Array, "*s"]:
    """P(a) = sign(a) 2^round(log2|a|), P(0) = 0; ``terms`` > 1: sum of greedy P-terms (APoT).

    The exponent is capped at 127 (float32's largest power of two); results below the normal
    range flush to zero on XLA:CPU.
    """
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"round_pow2 needs a floating-point array, got dtype {a.dtype}")
    out = jnp.zeros_like(a)
    r = a
    for _ in range(terms):
        mag = jnp.abs(r)
        safe = jnp.where(mag > 0, mag, 1.0)
        e = jnp.minimum(jnp.round(jnp.log2(safe)), 127).astype(jnp.int32)  # float32 max 2^127
        p = jnp.where(mag > 0, jnp.ldexp(jnp.sign(r), e), 0.0)  # ldexp: exact (exp2 is not)
        out, r = out + p, r - p
    return out


def _check(W, group_size, n_planes, max_planes=None) -> tuple[Array, int]:
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        raise TypeError(f"W must be a floating-point array, got dtype {W.dtype}")
    if W.ndim < 1 or W.size == 0:
        raise ValueError(f"W must be a non-empty array with a last (column) axis, got {W.shape}")
    if not isinstance(W, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError("W contains NaN or Inf")
    cols = W.shape[-1]
    g = cols if group_size is None else group_size
    if not isinstance(g, int | np.integer) or g < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if cols % g:
        raise ValueError(f"group_size={g} does not divide the width {cols}")
    top = max_planes or 64
    if not isinstance(n_planes, int | np.integer) or not 1 <= n_planes <= top:
        raise ValueError(f"n_planes must be an integer in [1, {top}], got {n_planes!r}")
    return W, int(g)


def _groups(W, g):
    return W.astype(jnp.float32).reshape(W.shape[:-1] + (W.shape[-1] // g, g))


def _recon(alpha, B):
    """alpha [..., G, n], B [..., G, g, n] (float +-1) -> [..., G, g]."""
    return jnp.sum(B * jnp.expand_dims(alpha, -2), axis=-1)


def _group_err(w, alpha, B):
    return jnp.sum(jnp.square(w - _recon(alpha, B)), axis=-1)


def _pack(W, alpha, B) -> BinaryCode:
    """alpha [..., G, n] f32, B [..., G, g, n] -> BinaryCode in W's layout and dtype."""
    planes = jnp.moveaxis(B.reshape(W.shape + (B.shape[-1],)), -1, 0).astype(jnp.int8)
    return BinaryCode(alpha.astype(W.dtype), planes)


def _greedy(w, n):
    """Residual binarization of grouped w [..., G, g] -> alpha [..., G, n], B [..., G, g, n]."""
    r, alphas, planes = w, [], []
    for _ in range(n):
        b = jnp.where(r >= 0, 1.0, -1.0).astype(jnp.float32)
        a = jnp.mean(jnp.abs(r), axis=-1)
        r = r - jnp.expand_dims(a, -1) * b
        alphas.append(a)
        planes.append(b)
    return jnp.stack(alphas, -1), jnp.stack(planes, -1)


# ----------------------------------------------------------------------------- public API


@functools.partial(jax.jit, static_argnames=("g", "n"))
def _residual_core(W, g, n):
    return _greedy(_groups(W, g), n)


def binarize(W: Float[Array, "*batch cols"], *, group_size: int | None = None) -> BinaryCode:
    """W ~= alpha * sign(W), alpha = mean|W| per row (or per group of ``group_size`` columns)."""
    return residual_binarize(W, n_planes=1, group_size=group_size)


def residual_binarize(
    W: Float[Array, "*batch cols"], *, n_planes: int, group_size: int | None = None
) -> BinaryCode:
    """Greedy residual binarization with ``n_planes`` planes (module docstring)."""
    W, g = _check(W, group_size, n_planes)
    alpha, B = _residual_core(W, g, int(n_planes))
    return _pack(W, alpha, B)


def _search_B(w, alpha, combos):
    """Best sign pattern per entry: w [..., G, g], alpha [..., G, n], combos [2^n, n]."""
    V = jnp.einsum("...i,ci->...c", alpha, combos, precision=jax.lax.Precision.HIGHEST)
    best_err = jnp.full(w.shape, jnp.inf, jnp.float32)
    best = jnp.zeros(w.shape, jnp.int32)
    for c in range(combos.shape[0]):
        e = jnp.square(w - V[..., c : c + 1])
        better = e < best_err
        best_err = jnp.where(better, e, best_err)
        best = jnp.where(better, c, best)
    return combos[best]


def _ls_alpha(w, B, alpha0):
    """Least-squares alphas given B: (B^T B) alpha = B^T w per group, by n steps of conjugate
    gradients from ``alpha0`` (exact for n x n in exact arithmetic; B^T B may be singular, e.g.
    two equal planes, and CG then still reaches a minimiser since B^T w lies in its range)."""
    hi = jax.lax.Precision.HIGHEST
    M = jnp.einsum("...gi,...gj->...ij", B, B, precision=hi)
    mv = lambda x: jnp.einsum("...ij,...j->...i", M, x, precision=hi)
    x = alpha0
    r = jnp.einsum("...gi,...g->...i", B, w, precision=hi) - mv(x)
    p, rr = r, jnp.sum(r * r, axis=-1)
    for _ in range(alpha0.shape[-1]):
        Mp = mv(p)
        pMp = jnp.sum(p * Mp, axis=-1)
        ok = pMp > 0
        step = jnp.where(ok, rr / jnp.where(ok, pMp, 1.0), 0.0)[..., None]
        x, r = x + step * p, r - step * Mp
        rr_new = jnp.sum(r * r, axis=-1)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)[..., None]
        p, rr = r + beta * p, rr_new
    return x


def _alternate(w, alpha, B, mask, rounds, pow2_alpha, pow2_terms):
    """``rounds`` of steps (1)-(3) of the module docstring, each kept only where it helps.

    ``mask [n]`` (1.0 / 0.0) marks the active planes, a prefix: inactive planes keep alpha = 0
    (their columns are dropped from the least squares), so m < n planes reuse the n-plane code.
    """
    n = alpha.shape[-1]
    combos = jnp.asarray(list(itertools.product((1.0, -1.0), repeat=n)), jnp.float32)
    Bmask = jnp.reshape(mask, (1,) * (B.ndim - 1) + (n,))

    def one_round(carry, _):
        alpha, B, err = carry
        a = -jnp.sort(-jnp.abs(_ls_alpha(w, B * Bmask, alpha)), axis=-1)  # (1)
        if pow2_alpha:
            a = round_pow2(a, pow2_terms)  # (2)
        b = _search_B(w, a, combos)  # (3)
        e = _group_err(w, a, b)
        keep = e <= err
        alpha = jnp.where(keep[..., None], a, alpha)
        B = jnp.where(keep[..., None, None], b, B)
        return (alpha, B, jnp.where(keep, e, err)), None

    carry = (alpha, B, _group_err(w, alpha, B))
    (alpha, B, _), _ = jax.lax.scan(one_round, carry, None, length=rounds)
    return alpha, B


def _sorted(alpha, B):
    """Order planes by decreasing |alpha| (alpha and B permuted together)."""
    order = jnp.argsort(-jnp.abs(alpha), axis=-1, stable=True)
    alpha = jnp.take_along_axis(alpha, order, axis=-1)
    return alpha, jnp.take_along_axis(B, jnp.expand_dims(order, -2), axis=-1)


@functools.partial(
    jax.jit, static_argnames=("g", "n", "rounds", "pow2_alpha", "pow2_terms", "warm_start")
)
def _bcq_core(W, g, n, rounds, pow2_alpha, pow2_terms, warm_start):
    w = _groups(W, g)
    P = functools.partial(round_pow2, terms=pow2_terms) if pow2_alpha else (lambda a: a)
    alt = functools.partial(_alternate, rounds=rounds, pow2_alpha=pow2_alpha, pow2_terms=pow2_terms)
    a_greedy, B_greedy = _greedy(w, n)  # greedy(m) = the first m planes of greedy(n)
    a_greedy = P(a_greedy)
    if not warm_start:
        return _sorted(*alt(w, a_greedy, B_greedy, jnp.ones((n,), jnp.float32)))

    planes = jnp.arange(n)

    def solve(best, m):
        """m planes: alternate from greedy(m) and from best(m-1) + a greedy plane; keep better."""
        mask = (planes < m).astype(jnp.float32)
        new_a = jnp.reshape(planes == m - 1, (1,) * (w.ndim - 1) + (n,))  # rank of alpha
        new_B = jnp.expand_dims(new_a, -2)  # rank of B
        r = w - _recon(*best)
        a_w = jnp.where(new_a, P(jnp.mean(jnp.abs(r), axis=-1))[..., None], best[0])
        B_w = jnp.where(new_B, jnp.where(r >= 0, 1.0, -1.0)[..., None], best[1])
        a2, B2 = jax.vmap(alt, in_axes=(None, 0, 0, None))(
            w,
            jnp.stack([a_greedy * jnp.reshape(mask, new_a.shape), a_w]),
            jnp.stack([B_greedy, B_w]),
            mask,
        )
        warm = _group_err(w, a2[1], B2[1]) < _group_err(w, a2[0], B2[0])
        a = jnp.where(warm[..., None], a2[1], a2[0])
        return (a, jnp.where(warm[..., None, None], B2[1], B2[0])), None

    zero = (jnp.zeros_like(a_greedy), B_greedy)
    best, _ = jax.lax.scan(solve, zero, jnp.arange(1, n + 1))
    return _sorted(*best)


def bcq(
    W: Float[Array, "*batch cols"],
    *,
    n_planes: int,
    group_size: int | None = None,
    rounds: int = 15,
    pow2_alpha: bool = False,
    pow2_terms: int = 1,
    warm_start: bool = True,
) -> BinaryCode:
    """Binary-coded quantization by alternating least squares (Xu et al. arXiv 1802.00150).

    ``n_planes`` in [1, 4]; ``rounds`` of alternation after the init (0: init only);
    ``pow2_alpha``: alphas rounded to (sums of ``pow2_terms``) powers of two, ShiftAddLLM
    (arXiv 2406.05981); where the rounding happens is spelled out in the module docstring.
    ``warm_start=False`` is Xu et al.'s plain greedy init. ``warm_start=True`` (default) solves
    1, 2, ..., n planes in turn; for m planes it alternates both from the greedy init and from the
    (m-1)-plane solution plus one greedy plane on its residual, and keeps, per group, the better
    result. Plain greedy-init BCQ can end worse with n planes than with n-1 (seen on ~0.1% of
    groups of 8 entries at 3 -> 4 planes); with the warm start error(n) <= error(n-1) and
    error <= that of plain BCQ. Cost: 2n - 1 alternations instead of one.
    """
    W, g = _check(W, group_size, n_planes, MAX_BCQ_PLANES)
    if not isinstance(rounds, int | np.integer) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    if not isinstance(pow2_terms, int | np.integer) or pow2_terms < 1:
        raise ValueError(f"pow2_terms must be a positive integer, got {pow2_terms!r}")
    alpha, B = _bcq_core(
        W, g, int(n_planes), int(rounds), bool(pow2_alpha), int(pow2_terms), bool(warm_start)
    )
    return _pack(W, alpha, B)


def reconstruct(code: BinaryCode) -> Float[Array, "*batch cols"]:
    """W-hat = sum_i alphas_i * planes_i, per group; planes may be int8 +-1 or bool bits."""
    alphas, planes = jnp.asarray(code.alphas), jnp.asarray(code.planes)
    if planes.dtype == jnp.bool_:
        planes = bits_to_planes(planes)
    n, cols = planes.shape[0], planes.shape[-1]
    G = alphas.shape[-2]
    if alphas.shape[-1] != n or alphas.shape[:-2] != planes.shape[1:-1] or cols % G:
        raise ValueError(
            f"alphas {alphas.shape} do not match planes {planes.shape} "
            "(expected alphas [..., groups, n], planes [n, ..., cols])"
        )
    B = jnp.moveaxis(planes, 0, -1).astype(jnp.float32)
    B = B.reshape(planes.shape[1:-1] + (G, cols // G, n))
    return _recon(alphas.astype(jnp.float32), B).reshape(planes.shape[1:]).astype(alphas.dtype)
