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
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels import common as C
from kernels.mpgemm import _check_format
from numerics.formats import Format, get_format
from numerics.packing import unpack

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked logit: exp() → 0 without inf − inf


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


def _kernel(len_ref, q_ref, k_ref, ks_ref, *refs, p: Plan):
    refs = list(refs)
    kz_ref = refs.pop(0) if p.has_kz else None
    v_ref, vs_ref = refs.pop(0), refs.pop(0)
    vz_ref = refs.pop(0) if p.has_vz else None
    (o_ref,) = refs
    length = len_ref[0]
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
        s = jnp.where(t < length, s, _NEG)  # [R, Gk]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        pr = jnp.exp(s - m_new[:, None])
        l = l * corr + jnp.sum(pr, axis=1)
        vv = C.decode(C.load_codes(v_ref, p.v_fmt.bits, 0, p.D, rows=rows), p.v_fmt)
        if vz_ref is not None:
            vv = vv - C.expand_groups(vz_ref[rows, :].astype(jnp.float32), p.Gv)
        V = vv * C.expand_groups(vs_ref[rows, :].astype(jnp.float32), p.Gv)  # [Gk, D]
        acc = acc * corr[:, None] + jnp.dot(pr, V, precision=hi)
        return m_new, l, acc

    init = (
        jnp.full((p.R,), _NEG, jnp.float32),
        jnp.zeros((p.R,), jnp.float32),
        jnp.zeros((p.R, p.D), jnp.float32),
    )
    _, l, acc = lax.fori_loop(0, nt, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _check(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths, k_fmt, v_fmt):
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
            if lv.min() < 1 or lv.max() > T:
                raise ValueError(f"{who}: lengths must lie in [1, T={T}], got {lv.tolist()}")
    return B, Hq, D, Hkv, T, Gk, Gv


@functools.partial(jax.jit, static_argnames=("p", "interpret"))
def _kv_decode(q, kp, ks, kz, vp, vs, vz, lengths, *, p: Plan, interpret: bool):
    B, Hq, D = q.shape
    Hkv = kp.shape[1]
    qg = q.reshape(B, Hkv, p.rep, D)
    if p.R > p.rep:
        qg = jnp.concatenate([qg, jnp.zeros((B, Hkv, p.R - p.rep, D), q.dtype)], axis=2)

    def whole(a):  # the [b, h] slab of a [B, Hkv, ...] array
        return pl.BlockSpec((None, None) + a.shape[2:], lambda b, h: (b, h, 0, 0))

    args = [lengths.astype(jnp.int32).reshape(B, 1), qg, kp, ks]
    args += [kz] if p.has_kz else []
    args += [vp, vs] + ([vz] if p.has_vz else [])
    in_specs = [pl.BlockSpec((None, 1), lambda b, h: (b, 0))] + [whole(a) for a in args[1:]]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    o = pl.pallas_call(
        functools.partial(_kernel, p=p),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, p.R, D), q.dtype),
        grid=(B, Hkv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, p.R, D), lambda b, h: (b, h, 0, 0)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="kv_decode",
    )(*args)
    return o[:, :, : p.rep].reshape(B, Hq, D)


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
) -> Float[Array, "B Hq D"]:
    """One decode step of attention over the low-bit cache (layout: module docstring).
    ``lengths`` defaults to the full capacity; ``sm_scale`` to ``1/sqrt(D)``."""
    k_fmt, v_fmt = get_format(k_fmt), get_format(v_fmt)
    B, Hq, D, Hkv, T, Gk, Gv = _check(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths, k_fmt, v_fmt
    )
    rep = Hq // Hkv
    p = Plan(
        k_fmt=k_fmt, v_fmt=v_fmt, T=T, D=D, rep=rep, R=max(16, 1 << (rep - 1).bit_length()),
        Gk=Gk, Gv=Gv, sm_scale=float(sm_scale or 1 / math.sqrt(D)),
        has_kz=k_zero is not None, has_vz=v_zero is not None,
    )  # fmt: skip
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    return _kv_decode(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths,
                      p=p, interpret=interpret)  # fmt: skip


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
    k_fmt, v_fmt, sm_scale=None,
) -> Array:  # fmt: skip
    """Plain jnp: dequantize the whole cache, masked softmax attention in float32."""
    k_fmt, v_fmt = get_format(k_fmt), get_format(v_fmt)
    B, Hq, D, Hkv, T, Gk, Gv = _check(
        q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lengths, k_fmt, v_fmt
    )
    K = dequantize_cache(k_packed, k_scale, k_zero, k_fmt, (Gk, 1))
    V = dequantize_cache(v_packed, v_scale, v_zero, v_fmt, (1, Gv))
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    return _attend(q, K, V, lengths, float(sm_scale or 1 / math.sqrt(D)))


@functools.partial(jax.jit, static_argnums=4)
def _attend(q, K, V, lengths, sm_scale: float):
    B, Hq, D = q.shape
    _, Hkv, T, _ = K.shape
    qg = q.astype(jnp.float32).reshape(B, Hkv, Hq // Hkv, D)
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("bhrd,bhtd->bhrt", qg, K, precision=hi) * sm_scale
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    o = jnp.einsum("bhrt,bhtd->bhrd", jax.nn.softmax(s, axis=-1), V, precision=hi)
    return o.reshape(B, Hq, D).astype(q.dtype)


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
