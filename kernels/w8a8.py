"""W8A8: int8 × int8 matmul with int32 accumulation and per-token × per-channel scales.

The inner product of SmoothQuant (arXiv 2211.10438, sec. 3, eq. 1 with per-token activation
and per-channel weight scales) and of LLM.int8()'s int8 part (arXiv 2208.07339, sec. 3.2,
eq. 4: vector-wise quantization, ``C ≈ (1 / (c_x ⊗ c_w)) · (X_i8 W_i8ᵀ)`` — here written with
scales ``s = 1/c``):

    y[m, n] = s_x[m] · s_w[n] · Σ_k xq[m, k] · wq[n, k]

``xq [M, K]`` and ``wq [N, K]`` are int8; the sum is accumulated in int32 inside the kernel and
is exact (``|Σ| ≤ K · 128² < 2^31`` for ``K ≤ 131072``, checked). The scales are applied to the
int32 tile once, in the epilogue, in float32: ``float32(acc) · s_x · s_w`` in that order, the
same operations as ``w8a8_reference``, so the two agree bit for bit whenever ``float32(acc)`` is
exact (``|acc| < 2^24``) and otherwise differ by nothing either (the same conversion).

* :func:`int8_matmul` — the int32 accumulator ``xq @ wqᵀ`` (the integer part alone);
* :func:`w8a8` / :func:`w8a8_reference` — with the scales, output in ``out_dtype``;
* :func:`qarray_w8a8` — from two int8 ``QArray`` s (``numerics.quantize`` with
  ``QuantConfig(format="int8", granularity="channel")``: per-token for ``x [M, K]``,
  per-output-channel for ``W [N, K]``; codes are two's-complement bit patterns).

LLM.int8()'s fp16 outlier decomposition is a method built on top of this kernel, not part of it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, Int8

from kernels import common as C

MAX_K = 131072  # K · 128 · 128 must stay below 2^31


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Static description of one call."""

    M: int  # rows of xq (before padding)
    K: int  # reduction length
    N: int  # output columns
    bm: int  # row tile (rows zero-padded)
    bn: int  # column tile, divides N
    bk: int  # K tile, divides K
    scaled: bool  # apply s_x ⊗ s_w in the epilogue
    out_dtype: object  # output dtype (int32 when not scaled)


def _check(xq, wq, who: str) -> tuple[int, int, int]:
    for name, a in (("xq", xq), ("wq", wq)):
        if getattr(a, "dtype", None) != jnp.int8:
            raise ValueError(f"{who}: {name} must be int8, got {getattr(a, 'dtype', type(a))}")
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"{who}: {name} must be a non-empty 2-D array, got {a.shape}")
    (M, K), (N, K2) = xq.shape, wq.shape
    if K != K2:
        raise ValueError(f"{who}: xq has K={K} but wq has K={K2}")
    if K > MAX_K:
        raise ValueError(f"{who}: K={K} > {MAX_K} could overflow the int32 accumulator")
    return M, K, N


def _check_scales(s_x, s_w, M: int, N: int, who: str) -> None:
    for name, s, n in (("s_x", s_x, M), ("s_w", s_w, N)):
        if not hasattr(s, "dtype") or not jnp.issubdtype(s.dtype, jnp.floating):
            raise ValueError(f"{who}: {name} must be a float array, got {getattr(s, 'dtype', s)}")
        if s.shape not in ((n,), (n, 1)):
            raise ValueError(f"{who}: {name} must have shape ({n},) or ({n}, 1), got {s.shape}")


def _kernel(x_ref, w_ref, *refs, p: Plan):
    if p.scaled:
        sx_ref, sw_ref, o_ref = refs
    else:
        (o_ref,) = refs

    def body(step, acc):
        x = x_ref[:, pl.ds(step * p.bk, p.bk)]
        w = w_ref[:, pl.ds(step * p.bk, p.bk)]
        return acc + lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
        )

    acc = lax.fori_loop(0, p.K // p.bk, body, jnp.zeros((p.bm, p.bn), jnp.int32))
    if p.scaled:
        y = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]  # [bm,1] then [1,bn]
        o_ref[...] = y.astype(o_ref.dtype)
    else:
        o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("p", "interpret"))
def _w8a8(xq, wq, s_x, s_w, *, p: Plan, interpret: bool):
    xp = C.pad_rows(xq, p.bm)
    Mp = xp.shape[0]
    in_specs = [
        pl.BlockSpec((p.bm, p.K), lambda i, j: (i, 0)),
        pl.BlockSpec((p.bn, p.K), lambda i, j: (j, 0)),
    ]
    args = [xp, wq]
    if p.scaled:
        sx = C.pad_rows(s_x.reshape(-1, 1).astype(jnp.float32), p.bm)
        sw = s_w.reshape(1, -1).astype(jnp.float32)
        in_specs += [
            pl.BlockSpec((p.bm, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((1, p.bn), lambda i, j: (0, j)),
        ]
        args += [sx, sw]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=3)
    y = pl.pallas_call(
        functools.partial(_kernel, p=p),
        out_shape=jax.ShapeDtypeStruct((Mp, p.N), p.out_dtype),
        grid=(Mp // p.bm, p.N // p.bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="w8a8" if p.scaled else "int8_matmul",
    )(*args)
    return y[: p.M]


def _plan(xq, wq, *, scaled, out_dtype, block_m, block_n, block_k, who) -> Plan:
    M, K, N = _check(xq, wq, who)
    return Plan(
        M=M,
        K=K,
        N=N,
        bm=C.block_m_for(M, block_m, who),
        bn=C.pick_block(N, block_n, (64, 32, 16), who, "block_n"),
        bk=C.pick_block(K, block_k, (128, 64, 32), who, "block_k"),
        scaled=scaled,
        out_dtype=jnp.dtype(out_dtype),
    )


def int8_matmul(
    xq: Int8[Array, "M K"],
    wq: Int8[Array, "N K"],
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
) -> Int[Array, "M N"]:
    """Exact ``xq @ wqᵀ`` in int32 (int8 products, int32 accumulation)."""
    p = _plan(xq, wq, scaled=False, out_dtype=jnp.int32, block_m=block_m, block_n=block_n,
              block_k=block_k, who="int8_matmul")  # fmt: skip
    return _w8a8(xq, wq, None, None, p=p, interpret=interpret)


def int8_matmul_reference(xq: Int8[Array, "M K"], wq: Int8[Array, "N K"]) -> Int[Array, "M N"]:
    _check(xq, wq, "int8_matmul_reference")
    return jnp.dot(xq, wq.T, preferred_element_type=jnp.int32)


def w8a8(
    xq: Int8[Array, "M K"],
    wq: Int8[Array, "N K"],
    s_x: Float[Array, " M"],
    s_w: Float[Array, " N"],
    *,
    out_dtype=jnp.float32,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """``s_x[m] · s_w[n] · (xq @ wqᵀ)[m, n]`` (int32 accumulation, float32 epilogue)."""
    M, _, N = _check(xq, wq, "w8a8")
    _check_scales(s_x, s_w, M, N, "w8a8")
    p = _plan(xq, wq, scaled=True, out_dtype=out_dtype, block_m=block_m, block_n=block_n,
              block_k=block_k, who="w8a8")  # fmt: skip
    return _w8a8(xq, wq, s_x, s_w, p=p, interpret=interpret)


def w8a8_reference(xq, wq, s_x, s_w, *, out_dtype=jnp.float32) -> Array:
    """Plain jnp: int32 dot, then ``float32(acc) · s_x · s_w``."""
    M, _, N = _check(xq, wq, "w8a8_reference")
    _check_scales(s_x, s_w, M, N, "w8a8_reference")
    acc = jnp.dot(xq, wq.T, preferred_element_type=jnp.int32).astype(jnp.float32)
    y = acc * s_x.reshape(-1, 1).astype(jnp.float32) * s_w.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def _int8_fields(qa, who: str) -> tuple[Array, Array]:
    """Signed int8 codes and the per-row scale vector of a per-row int8 QArray ``[R, K]``."""
    from numerics.formats import IntFormat
    from numerics.qarray import QArray

    if not isinstance(qa, QArray):
        raise ValueError(f"{who}: expected a QArray, got {type(qa).__name__}")
    if qa.format != IntFormat(bits=8, signed=True) or qa.zero is not None:
        raise ValueError(f"{who}: needs symmetric int8 codes, got {qa.format.name}"
                         f"{' with zero points' if qa.zero is not None else ''}")  # fmt: skip
    if qa.ndim != 2 or qa.block_shape != (1, qa.shape[1]):
        raise ValueError(
            f"{who}: needs one scale per row (granularity='channel', axis=-1), "
            f"got block_shape {qa.block_shape} for shape {qa.shape}"
        )
    codes = lax.bitcast_convert_type(qa.unpacked_codes(), jnp.int8)
    return codes, qa.scale_array()[:, 0]


def qarray_w8a8(x_qa, w_qa, *, out_dtype=jnp.float32, interpret: bool = False, **tiles):
    """``x ≈ x_qa.dequantize()`` times ``W ≈ w_qa.dequantize()`` transposed, through
    :func:`w8a8` (per-token scales from ``x_qa``, per-channel scales from ``w_qa``)."""
    xq, s_x = _int8_fields(x_qa, "qarray_w8a8")
    wq, s_w = _int8_fields(w_qa, "qarray_w8a8")
    return w8a8(xq, wq, s_x, s_w, out_dtype=out_dtype, interpret=interpret, **tiles)
