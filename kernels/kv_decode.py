"""Decode attention over a low-bit KV cache, dequantized block by block inside the kernel.

One new query token per sequence attends to a cache whose keys and values are stored as
packed codes, quantized as KIVI does (arXiv 2402.02750, sec. 3.2–3.3): keys **per channel**
(a scale and zero point per channel for each group of ``Gk`` tokens — the key outliers live in
fixed channels), values **per token** (groups of ``Gv`` along the head dimension):

    K̂[t, d] = (decode(kc[t, d]) − zk[t // Gk, d]) · sk[t // Gk, d]
    V̂[t, d] = (decode(vc[t, d]) − zv[t, d // Gv]) · sv[t, d // Gv]
    o = softmax(q K̂ᵀ · sm_scale, masked to t < length) V̂

Layout (head-major, so one program reads contiguous rows): ``q [B, Hq, D]``; codes
``uint32 [B, Hkv, T, D·b/32]`` packed along D by ``numerics.packing`` (a QArray
``[B, Hkv, T, D]`` packed with ``.pack(axis=3, word_bits=32)``); key scales / zeros
``[B, Hkv, T/Gk, D]``; value scales / zeros ``[B, Hkv, T, D/Gv]``; ``lengths int32 [B]``
(valid cache entries, ≥ 1). Grouped-query attention: query head ``h`` reads KV head
``h // (Hq / Hkv)``.

The kernel (grid ``(B, Hkv)``) walks the cache in blocks of ``Gk`` tokens up to ``length``
with the online softmax of FlashAttention / flash-decoding (running max ``m``, normaliser
``l``, rescaled accumulator), all in float32; the ``Hq/Hkv`` query heads of one KV head share
each dequantized block (rows padded to 16 for the Triton ``dot``).

Options (the default call is unchanged):

* ``starts int32 [B]`` — attend only ``start ≤ t < length`` (the decoder gives the sink tokens
  and a sliding window's out-of-range tokens to another part); the walk starts at block
  ``start // Gk``;
* ``return_lse=True`` — also the per-row log-sum-exp ``lse = log Σ_t exp(s_t)`` of the scaled
  logits (float32 ``[B, Hq]``) and the rows that fell back (below), as :class:`Partial`, so
  partial attentions over disjoint token sets combine exactly (:func:`merge_partials`,
  flash-decoding's split-K reduction). An empty range (``start ≥ length``) gives ``o = 0``,
  ``lse = −inf`` (allowed only with ``return_lse``);
* ``phi`` — FlashDecoding++'s asynchronised softmax with a **unified maximum** (arXiv
  2311.01282, §3): every exponential uses one pre-chosen ``φ`` instead of the running maximum,

      l = Σ_t exp(s_t − φ),   o = Σ_t exp(s_t − φ) v_t / l,   lse = φ + log l,

  so partial sums need no rescaling (no synchronisation between partial softmaxes). It is
  exact only while no exponential over- or underflows: a row whose maximum logit ``m``
  leaves the safe range, ``m − φ ∉ [a, b]`` (:func:`needs_fallback`), is recomputed with the
  exact running maximum — the paper's recomputation fallback. :data:`F32_SAFE` (the default)
  is the range float32 accumulation tolerates; :data:`F16_SAFE` the range of ``exp`` in fp16.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels import common as C
from kernels.mpgemm import _check_format
from numerics.formats import Format, get_format
from numerics.packing import unpack

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked logit: exp() → 0 without inf − inf

# Safe ranges of m − φ (m: a row's largest logit) for the unified-maximum softmax. float32:
# the largest term exp(m − φ) stays a normal number (> 2^-126 = e^-87.3) and the sum of up to
# T = 2^16 terms times |v| ≤ 2^16 stays finite (e^64 · 2^32 ≈ 2.7e37 < 3.4e38). fp16 (the
# paper's kernel arithmetic): exp within the normal fp16 numbers, [2^-14, 65504].
F32_SAFE = (-64.0, 64.0)
F16_SAFE = (math.log(2.0**-14), math.log(65504.0))


def needs_fallback(row_max, phi, safe=F32_SAFE):
    """The rows a unified maximum ``φ`` cannot serve: ``m − φ`` outside ``safe = (a, b)``
    (``m``: the row's largest scaled logit; an empty row, ``m = −inf``, never falls back)."""
    a, b = safe
    d = row_max - phi
    return jnp.isfinite(row_max) & ((d > b) | (d < a))


def check_safe(safe) -> tuple[float, float]:
    a, b = (float(x) for x in safe)
    if not (math.isfinite(a) and math.isfinite(b) and a < 0 < b):
        raise ValueError(f"safe range must be finite (a, b) with a < 0 < b, got {safe}")
    return a, b


class Partial(NamedTuple):
    """One partial attention: ``o [B, Hq, D]`` normalised over its tokens, ``lse [B, Hq]``
    float32 (``−inf``: no token), ``fallback [B, Hq]`` rows recomputed with the exact max."""

    o: Array
    lse: Array
    fallback: Array


def merge_partials(parts) -> tuple[Array, Array]:
    """Attention over the union of disjoint token sets from their partials ``(o_i, lse_i)``:
    ``o = Σ_i exp(lse_i − M) o_i / Σ_i exp(lse_i − M)``, ``M = max_i lse_i`` (float32; at
    least one part must be non-empty). Returns ``(o, lse)``."""
    lses = jnp.stack([jnp.asarray(p[1], jnp.float32) for p in parts])
    M = jnp.max(lses, axis=0)
    Ms = jnp.where(jnp.isfinite(M), M, 0.0)
    w = jnp.exp(lses - Ms[None])  # exp(−inf) = 0 for empty parts
    den = jnp.sum(w, axis=0)
    num = sum(wi[..., None] * p[0].astype(jnp.float32) for wi, p in zip(w, parts, strict=True))
    return num / den[..., None], Ms + jnp.log(den)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Static description of one call."""

    k_fmt: Format  # key code format
    v_fmt: Format  # value code format
    T: int  # cache capacity (tokens)
    D: int  # head dimension
    rep: int  # query heads per KV head
    R: int  # rep padded to a power of two >= 16
    Gk: int  # key group (tokens per key scale) = the token block
    Gv: int  # value group along D
    sm_scale: float  # logit scale
    has_kz: bool  # key zero points given
    has_vz: bool  # value zero points given
    unified: bool = False  # FlashDecoding++ unified maximum φ (an input) instead of the running max


def _kernel(bnd_ref, phi_ref, q_ref, k_ref, ks_ref, *refs, p: Plan):
    refs = list(refs)
    kz_ref = refs.pop(0) if p.has_kz else None
    v_ref, vs_ref = refs.pop(0), refs.pop(0)
    vz_ref = refs.pop(0) if p.has_vz else None
    o_ref, lse_ref, mx_ref = refs
    start, length = bnd_ref[0], bnd_ref[1]
    phi = phi_ref[0]
    q = q_ref[...].astype(jnp.float32)  # [R, D]
    hi = lax.Precision.HIGHEST
    nt = jnp.minimum((length + p.Gk - 1) // p.Gk, p.T // p.Gk)

    def body(step, carry):
        m, l, acc = carry
        rows = pl.ds(step * p.Gk, p.Gk)
        kv = C.decode(C.load_codes(k_ref, p.k_fmt.bits, 0, p.D, rows=rows), p.k_fmt)
        if kz_ref is not None:
            kv = kv - kz_ref[pl.ds(step, 1), :].astype(jnp.float32)
        K = kv * ks_ref[pl.ds(step, 1), :].astype(jnp.float32)  # [Gk, D]
        s = lax.dot_general(q, K, (((1,), (1,)), ((), ())), precision=hi) * p.sm_scale
        t = step * p.Gk + lax.broadcasted_iota(jnp.int32, (1, p.Gk), 1)
        s = jnp.where((t < length) & (t >= start), s, _NEG)  # [R, Gk]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        vv = C.decode(C.load_codes(v_ref, p.v_fmt.bits, 0, p.D, rows=rows), p.v_fmt)
        if vz_ref is not None:
            vv = vv - C.expand_groups(vz_ref[rows, :].astype(jnp.float32), p.Gv)
        V = vv * C.expand_groups(vs_ref[rows, :].astype(jnp.float32), p.Gv)  # [Gk, D]
        if p.unified:  # one fixed φ: no rescaling; m only tracks the range check
            pr = jnp.exp(s - phi)
            return m_new, l + jnp.sum(pr, axis=1), acc + jnp.dot(pr, V, precision=hi)
        corr = jnp.exp(m - m_new)
        pr = jnp.exp(s - m_new[:, None])
        l = l * corr + jnp.sum(pr, axis=1)
        acc = acc * corr[:, None] + jnp.dot(pr, V, precision=hi)
        return m_new, l, acc

    init = (
        jnp.full((p.R,), _NEG, jnp.float32),
        jnp.zeros((p.R,), jnp.float32),
        jnp.zeros((p.R, p.D), jnp.float32),
    )
    empty = length <= start  # no token in [start, length): o = 0, lse = −inf
    b0 = start // p.Gk
    m, l, acc = lax.fori_loop(b0, jnp.where(empty, b0, nt), body, init)
    zero = l == 0  # empty, or (unified) every exp underflowed: the fallback recomputes it
    o = jnp.where(zero[:, None], 0.0, acc / jnp.where(zero, 1.0, l)[:, None])
    o_ref[...] = o.astype(o_ref.dtype)
    base = phi if p.unified else m
    lse_ref[...] = jnp.where(empty | zero, -jnp.inf, base + jnp.log(jnp.where(zero, 1.0, l)))
    mx_ref[...] = jnp.where(empty, -jnp.inf, m)


def _check(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths, k_fmt, v_fmt,
           starts=None, allow_empty=False):  # fmt: skip
    who = "kv_decode"
    if getattr(q, "dtype", None) not in [jnp.dtype(d) for d in C.FLOAT_ACTS] or q.ndim != 3:
        raise ValueError(f"{who}: q must be a [B, Hq, D] float array, got "
                         f"{getattr(q, 'dtype', type(q))} {getattr(q, 'shape', '')}")  # fmt: skip
    B, Hq, D = q.shape
    if 0 in q.shape:
        raise ValueError(f"{who}: empty query of shape {q.shape}")
    for fmt in (k_fmt, v_fmt):
        _check_format(fmt, who)
    if D % 32:
        raise ValueError(f"{who}: head dimension D={D} is not a multiple of 32")
    for name, a, fmt in (("k_packed", k_packed, k_fmt), ("v_packed", v_packed, v_fmt)):
        if getattr(a, "dtype", None) != jnp.uint32 or a.ndim != 4:
            raise ValueError(f"{who}: {name} must be uint32 [B, Hkv, T, D·b/32]")
        if a.shape[0] != B or a.shape[3] * 32 != D * fmt.bits:
            raise ValueError(f"{who}: {name} shape {a.shape} does not hold B={B} rows of "
                             f"D={D} {fmt.bits}-bit codes")  # fmt: skip
    if k_packed.shape[:3] != v_packed.shape[:3]:
        raise ValueError(
            f"{who}: key and value caches differ: {k_packed.shape} vs {v_packed.shape}"
        )
    _, Hkv, T, _ = k_packed.shape
    if Hq % Hkv:
        raise ValueError(f"{who}: {Hq} query heads are not a multiple of {Hkv} KV heads")
    if k_scale.ndim != 4 or k_scale.shape[:2] != (B, Hkv) or k_scale.shape[3] != D:
        raise ValueError(f"{who}: k_scale must be [B, Hkv, T/Gk, D], got {k_scale.shape}")
    if T % k_scale.shape[2]:
        raise ValueError(f"{who}: {k_scale.shape[2]} key groups do not divide T={T}")
    Gk = T // k_scale.shape[2]
    if not C.is_pow2(Gk) or Gk < 16:
        raise ValueError(f"{who}: key group Gk={Gk} must be a power of two >= 16")
    if v_scale.ndim != 4 or v_scale.shape[:3] != (B, Hkv, T) or D % v_scale.shape[3]:
        raise ValueError(f"{who}: v_scale must be [B, Hkv, T, D/Gv], got {v_scale.shape}")
    Gv = D // v_scale.shape[3]
    if not C.is_pow2(Gv):
        raise ValueError(f"{who}: value group Gv={Gv} must be a power of two")
    for name, z, s in (("k_zero", k_zero, k_scale), ("v_zero", v_zero, v_scale)):
        if z is not None and z.shape != s.shape:
            raise ValueError(f"{who}: {name} shape {z.shape} != scale shape {s.shape}")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not jnp.issubdtype(s.dtype, jnp.floating) or s.dtype == jnp.float8_e8m0fnu:
            raise ValueError(f"{who}: {name} must be float32/bfloat16/float16, got {s.dtype}")
    if lengths is not None:
        if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"{who}: lengths must be an int array of shape ({B},)")
        if not isinstance(lengths, jax.core.Tracer):
            lv = jax.device_get(lengths)
            lo = 0 if allow_empty else 1
            if lv.min() < lo or lv.max() > T:
                raise ValueError(f"{who}: lengths must lie in [{lo}, T={T}], got {lv.tolist()}")
    if starts is not None:
        if starts.shape != (B,) or not jnp.issubdtype(starts.dtype, jnp.integer):
            raise ValueError(f"{who}: starts must be an int array of shape ({B},)")
        if not isinstance(starts, jax.core.Tracer):
            sv = jax.device_get(starts)
            if sv.min() < 0 or sv.max() > T:
                raise ValueError(f"{who}: starts must lie in [0, T={T}], got {sv.tolist()}")
            if not allow_empty and lengths is not None and not isinstance(lengths, jax.core.Tracer):
                if (sv >= jax.device_get(lengths)).any():
                    raise ValueError(
                        f"{who}: an empty range (starts >= lengths) needs return_lse=True"
                    )
    return B, Hq, D, Hkv, T, Gk, Gv


def _call(q, kp, ks, kz, vp, vs, vz, bounds, phi, p: Plan, interpret: bool):
    B, Hq, D = q.shape
    Hkv = kp.shape[1]
    qg = q.reshape(B, Hkv, p.rep, D)
    if p.R > p.rep:
        qg = jnp.concatenate([qg, jnp.zeros((B, Hkv, p.R - p.rep, D), q.dtype)], axis=2)

    def whole(a):  # the [b, h] slab of a [B, Hkv, ...] array
        return pl.BlockSpec((None, None) + a.shape[2:], lambda b, h: (b, h, 0, 0))

    args = [bounds, jnp.broadcast_to(phi.astype(jnp.float32), (B, 1)), qg, kp, ks]
    args += [kz] if p.has_kz else []
    args += [vp, vs] + ([vz] if p.has_vz else [])
    in_specs = [
        pl.BlockSpec((None, 2), lambda b, h: (b, 0)),
        pl.BlockSpec((None, 1), lambda b, h: (b, 0)),
    ] + [whole(a) for a in args[2:]]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    row = lambda b, h: (b, h, 0)
    o, lse, mx = pl.pallas_call(
        functools.partial(_kernel, p=p),
        out_shape=(
            jax.ShapeDtypeStruct((B, Hkv, p.R, D), q.dtype),
            jax.ShapeDtypeStruct((B, Hkv, p.R), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, p.R), jnp.float32),
        ),
        grid=(B, Hkv),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, None, p.R, D), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, p.R), row),
            pl.BlockSpec((None, None, p.R), row),
        ),
        interpret=interpret,
        compiler_params=compiler_params,
        name="kv_decode",
    )(*args)
    cut = lambda a: a[:, :, : p.rep].reshape((B, Hq) + a.shape[3:])
    return cut(o), cut(lse), cut(mx)


@functools.partial(jax.jit, static_argnames=("p", "interpret", "safe"))
def _kv_decode(q, kp, ks, kz, vp, vs, vz, bounds, phi, *, p: Plan, interpret: bool, safe):
    ops = (q, kp, ks, kz, vp, vs, vz, bounds, phi)
    o, lse, mx = _call(*ops, p=p, interpret=interpret)
    if not p.unified:
        return o, lse, jnp.zeros(lse.shape, bool)
    bad = needs_fallback(mx, phi[0], safe)

    def recompute(o, lse):  # the paper's fallback: the exact running maximum for these rows
        o2, lse2, _ = _call(*ops, p=dataclasses.replace(p, unified=False), interpret=interpret)
        return jnp.where(bad[..., None], o2, o), jnp.where(bad, lse2, lse)

    o, lse = lax.cond(jnp.any(bad), recompute, lambda o, lse: (o, lse), o, lse)
    return o, lse, bad


def _bounds(B, T, lengths, starts):
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    starts = jnp.zeros((B,), jnp.int32) if starts is None else starts.astype(jnp.int32)
    return jnp.stack([starts, lengths], axis=1)


def kv_decode(
    q: Float[Array, "B Hq D"],
    k_packed: Array,
    k_scale: Array,
    k_zero: Array | None,
    v_packed: Array,
    v_scale: Array,
    v_zero: Array | None,
    lengths: Int[Array, " B"] | None = None,
    *,
    k_fmt: Format | str,
    v_fmt: Format | str,
    sm_scale: float | None = None,
    interpret: bool = False,
    starts: Int[Array, " B"] | None = None,
    return_lse: bool = False,
    phi: float | Array | None = None,
    safe: tuple[float, float] = F32_SAFE,
):
    """One decode step of attention over the low-bit cache (layout: module docstring).
    ``lengths`` defaults to the full capacity; ``sm_scale`` to ``1/sqrt(D)``. ``starts``,
    ``return_lse`` (→ :class:`Partial`), ``phi`` / ``safe`` (unified maximum): the module
    docstring's options."""
    k_fmt, v_fmt = get_format(k_fmt), get_format(v_fmt)
    B, Hq, D, Hkv, T, Gk, Gv = _check(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths, k_fmt, v_fmt,
        starts, return_lse,
    )  # fmt: skip
    safe = check_safe(safe)
    if phi is not None and not isinstance(phi, jax.core.Tracer):
        if np.size(phi) != 1 or not np.isfinite(np.asarray(phi, np.float32)).all():
            raise ValueError(f"kv_decode: phi must be one finite number, got {phi!r}")
    rep = Hq // Hkv
    p = Plan(
        k_fmt=k_fmt, v_fmt=v_fmt, T=T, D=D, rep=rep, R=max(16, 1 << (rep - 1).bit_length()),
        Gk=Gk, Gv=Gv, sm_scale=float(sm_scale or 1 / math.sqrt(D)),
        has_kz=k_zero is not None, has_vz=v_zero is not None, unified=phi is not None,
    )  # fmt: skip
    phi_a = jnp.zeros((1,), jnp.float32) if phi is None else jnp.reshape(phi, (1,))
    o, lse, bad = _kv_decode(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero,
                             _bounds(B, T, lengths, starts), phi_a.astype(jnp.float32),
                             p=p, interpret=interpret, safe=safe)  # fmt: skip
    return Partial(o, lse, bad) if return_lse else o


@functools.partial(jax.jit, static_argnums=(3, 4))
def dequantize_cache(packed, scale, zero, fmt: Format, group: tuple[int, int]) -> Array:
    """Float32 ``[B, Hkv, T, D]`` from packed codes and ``(token, channel)``-grouped params."""
    B, H, T, Dw = packed.shape
    D = Dw * 32 // fmt.bits
    v = fmt.decode(unpack(packed, fmt.bits, axis=3, length=D))
    gt, gd = group
    v = v.reshape(B, H, T // gt, gt, D // gd, gd)
    if zero is not None:
        v = v - zero.astype(jnp.float32)[:, :, :, None, :, None]
    return (v * scale.astype(jnp.float32)[:, :, :, None, :, None]).reshape(B, H, T, D)


def kv_decode_reference(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths=None, *,
    k_fmt, v_fmt, sm_scale=None, starts=None, return_lse=False, phi=None, safe=F32_SAFE,
):  # fmt: skip
    """Plain jnp: dequantize the whole cache, masked softmax attention in float32 (the
    options as :func:`kv_decode`; with ``phi`` the unified-maximum softmax and its fallback
    computed directly: rows in range use ``exp(s − φ)``, the others the exact maximum)."""
    k_fmt, v_fmt = get_format(k_fmt), get_format(v_fmt)
    B, Hq, D, Hkv, T, Gk, Gv = _check(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths, k_fmt, v_fmt,
        starts, return_lse,
    )  # fmt: skip
    safe = check_safe(safe)
    K = dequantize_cache(k_packed, k_scale, k_zero, k_fmt, (Gk, 1))
    V = dequantize_cache(v_packed, v_scale, v_zero, v_fmt, (1, Gv))
    bounds = _bounds(B, T, lengths, starts)
    phi_a = None if phi is None else jnp.reshape(jnp.asarray(phi, jnp.float32), ())
    o, lse, bad = _attend(q, K, V, bounds, phi_a, float(sm_scale or 1 / math.sqrt(D)), safe)
    return Partial(o, lse, bad) if return_lse else o


@functools.partial(jax.jit, static_argnums=(5, 6))
def _attend(q, K, V, bounds, phi, sm_scale: float, safe):
    B, Hq, D = q.shape
    _, Hkv, T, _ = K.shape
    qg = q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, D)
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("bhrd,bhtd->bhrt", qg, K, precision=hi) * sm_scale
    t = jnp.arange(T)[None, :]
    valid = ((t >= bounds[:, :1]) & (t < bounds[:, 1:]))[:, None, None, :]  # [B, 1, 1, T]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1)  # −inf: empty row
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    bad = jnp.zeros(m.shape, bool) if phi is None else needs_fallback(m, phi, safe)
    base = m_safe if phi is None else jnp.where(bad, m_safe, phi)
    e = jnp.where(valid, jnp.exp(s - base[..., None]), 0.0)
    l = jnp.sum(e, axis=-1)
    empty = l == 0
    w = e / jnp.where(empty, 1.0, l)[..., None]  # = jax.nn.softmax on a non-empty exact row
    o = jnp.einsum("bhrt,bhtd->bhrd", w, V, precision=hi)
    lse = jnp.where(empty, -jnp.inf, base + jnp.log(jnp.where(empty, 1.0, l)))
    return (
        o.reshape(B, Hq, D).astype(q.dtype),
        lse.reshape(B, Hq),
        bad.reshape(B, Hq),
    )


def qarray_kv_decode(q, k_qa, v_qa, lengths=None, *, sm_scale=None, interpret=False) -> Array:
    """:func:`kv_decode` on QArrays ``[B, Hkv, T, D]``: keys with ``block_shape (1, 1, Gk, 1)``
    (per channel), values with ``(1, 1, 1, Gv)`` (per token), packed or not (packed here
    along D)."""

    def fields(qa, name):
        if qa.ndim != 4:
            raise ValueError(
                f"qarray_kv_decode: {name} cache must be [B, Hkv, T, D], got {qa.shape}"
            )
        if qa.packing is None:
            qa = qa.pack(axis=3, word_bits=32)
        elif qa.packing != (3, 32):
            raise ValueError(f"qarray_kv_decode: {name} codes must be packed along D into uint32")
        return qa.codes, qa.scale_array(), qa.zero

    if k_qa.block_shape[3] != 1 or v_qa.block_shape[2] != 1:
        raise ValueError(
            "qarray_kv_decode: keys must be grouped along tokens (block (1,1,Gk,1)) and values "
            f"along D (block (1,1,1,Gv)); got {k_qa.block_shape} and {v_qa.block_shape}"
        )
    kp, ks, kz = fields(k_qa, "key")
    vp, vs, vz = fields(v_qa, "value")
    return kv_decode(q, kp, ks, kz, vp, vs, vz, lengths, k_fmt=k_qa.format, v_fmt=v_qa.format,
                     sm_scale=sm_scale, interpret=interpret)  # fmt: skip
