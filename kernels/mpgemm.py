"""Mixed-precision GEMM ``y = x @ Ŵᵀ`` with the low-bit weight dequantized inside the kernel.

``x`` is ``[M, K]`` (bfloat16 / float16 / float32); ``Ŵ [N, K]`` is given by its packed codes,
per-group scales and optional zero points, blockwise ``Ŵ = (decode(codes) − zero) · scale``
(the ``numerics.qarray.QArray`` invariant). Each program of the grid owns an ``[bm, bn]``
output tile and walks K in tiles of ``bk``: it reads the packed words of a ``[bn, bk]`` weight
tile, cuts out the codes, decodes them (integers arithmetically; NF4, FP4 E2M1 and other
tables by a select tree over the code bits), subtracts the zero point, multiplies by the
scale, rounds to the activation dtype and feeds the tile to a ``dot`` with float32
accumulation. No dequantized weight ever exists outside the tile being multiplied.

Weight layout (the one ``numerics.packing`` produces, so ``qa.pack(axis=1, word_bits=32)``
feeds the kernel directly):

* ``w_packed``: ``uint32 [N, K·b/32]``. Along each row the codes form one little-endian bit
  stream, code ``k`` at stream bits ``[k·b, k·b + b)``, cut into 32-bit words. INT4: 8 codes
  per word, code ``k`` in bits ``4·(k mod 8)`` of word ``k // 8`` (GPTQ's ``qweight`` word
  contents, stored ``[N, K/8]`` i.e. transposed from GPTQ's ``[K/8, N]``; AWQ's
  ``0 2 4 6 1 3 5 7`` interleave is *not* used). INT3: 32 codes in 3 words (GPTQ's 3-bit
  layout; codes 10 and 21 of a run straddle words). INT2: 16 per word. 8-bit: 4 per word.
* ``scale``: ``[N, K/g]`` float32 / bfloat16 / float16, or ``float8_e8m0fnu`` (MX power-of-two
  scales, decoded in the kernel from their bit pattern). ``g`` is any multiple of 32 that
  divides K (32 / 64 / 128, or ``g = K`` per channel).
* ``zero``: ``None`` or ``[N, K/g]`` float, integer-valued zero points in code units (kept as
  floats, not GPTQ's packed ``qzeros``; GPTQ's historical "zeros − 1" offset does not apply).

Formats: integer formats of 2, 3, 4 or 8 bits (signed two's complement or unsigned with a
zero point), and any other ``numerics`` format of 2–4 bits through its value table (``nf4``,
``fp4_e2m1`` — with ``float8_e8m0fnu`` scales and ``g = 32`` this is MXFP4 —, ``nf3``, …).

Numerics: the kernel's dequantized tile is bit-identical to ``mpgemm_reference``'s (same
float32 operations, then the same rounding to ``dequant_dtype`` and to ``x.dtype``); only the
order of the float32 accumulation differs. With ``x`` float32 the kernel asks for an IEEE
float32 dot (``Precision.HIGHEST``; Triton would otherwise use TF32).

Tiling: ``bm`` rows (zero-padded, ≥ 16 for the Triton dot), ``bn`` columns (must divide N),
``bk`` (must divide K and align with the groups) and ``split_k`` programs along K whose
float32 partial sums are added outside the kernel (for M = 1 the grid over N alone is too
small to fill a GPU). Defaults are heuristics; ``scripts/bench_kernels.py`` sweeps them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, UInt32

from kernels import common as C
from numerics.formats import Format, IntFormat, get_format
from numerics.granularity import is_ragged
from numerics.packing import unpack

INT_BITS = (2, 3, 4, 8)  # integer formats the kernel reads
TABLE_BITS = (2, 3, 4)  # table formats (NF, minifloats, codebooks): 2^b − 1 selects per code
_SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e8m0fnu)
_MIN_PROGRAMS = 256  # split K until the grid has about two waves on a 132-SM H100


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Static description of one call (hashable: a ``jit`` static argument)."""

    fmt: Format  # element format of the codes
    M: int  # rows of x (before padding)
    K: int  # reduction length
    N: int  # output columns
    g: int  # group size along K
    bm: int  # row tile (M is zero-padded to a multiple)
    bn: int  # column tile, divides N
    bk: int  # K tile, divides K
    split_k: int  # programs along K; divides K / bk
    e8m0: bool  # scales are float8_e8m0fnu bit patterns
    has_zero: bool  # zero points given
    dequant_dtype: object  # dtype the dequantized tile is rounded to before x.dtype


def _check_format(fmt: Format, who: str) -> None:
    ok = INT_BITS if isinstance(fmt, IntFormat) else TABLE_BITS
    if fmt.bits not in ok:
        kind = "integer" if isinstance(fmt, IntFormat) else "table/minifloat"
        raise ValueError(
            f"{who}: unsupported bit-width {fmt.bits} for {kind} format {fmt.name}; supported: {ok}"
        )


def _check_weights(x, w_packed, scale, zero, fmt: Format, who: str) -> tuple[int, int, int, int]:
    """Validate shapes and dtypes; return ``(M, K, N, g)``."""
    C.check_float_act(x, who)
    _check_format(fmt, who)
    M, K = x.shape
    if getattr(w_packed, "dtype", None) != jnp.uint32 or w_packed.ndim != 2:
        raise ValueError(
            f"{who}: w_packed must be a 2-D uint32 array (numerics.packing, word_bits=32), got "
            f"{getattr(w_packed, 'dtype', type(w_packed).__name__)} "
            f"{tuple(getattr(w_packed, 'shape', ()))}"
        )
    if K % C.WORD_BITS:
        raise ValueError(f"{who}: K={K} is not a multiple of 32 (whole packed words per row)")
    N, n_words = w_packed.shape
    if n_words * C.WORD_BITS != K * fmt.bits:
        raise ValueError(
            f"{who}: w_packed has {n_words} words per row, but K={K} codes of {fmt.bits} bits "
            f"need {K * fmt.bits // C.WORD_BITS}"
        )
    if N == 0 or N % 16:
        raise ValueError(
            f"{who}: N={N} is not a positive multiple of 16 (the smallest column tile)"
        )
    if getattr(scale, "ndim", 0) != 2 or scale.shape[0] != N:
        raise ValueError(
            f"{who}: scale must be [N, K/g] = [{N}, K/g], got {tuple(getattr(scale, 'shape', ()))}"
        )
    if scale.dtype not in [jnp.dtype(d) for d in _SCALE_DTYPES]:
        raise ValueError(
            f"{who}: scale dtype must be float32, bfloat16, float16 or float8_e8m0fnu, "
            f"got {scale.dtype}"
        )
    if K % scale.shape[1]:
        raise ValueError(f"{who}: {scale.shape[1]} scale columns do not divide K={K}")
    g = K // scale.shape[1]
    if g % 32:
        raise ValueError(f"{who}: group size {g} (= K / scale columns) is not a multiple of 32")
    if zero is not None:
        if zero.shape != scale.shape:
            raise ValueError(f"{who}: zero shape {zero.shape} != scale shape {scale.shape}")
        if not jnp.issubdtype(zero.dtype, jnp.floating):
            raise ValueError(f"{who}: zero points must be a float array, got {zero.dtype}")
    return M, K, N, g


def _pick_bk(K: int, g: int, requested: int | None, who: str) -> int:
    def fits(bk):
        return K % bk == 0 and (g % bk == 0 or (bk % g == 0 and C.is_pow2(bk // g)))

    if requested is not None:
        if not C.is_pow2(requested) or requested < 32 or not fits(requested):
            raise ValueError(
                f"{who}: block_k={requested} must be a power of two >= 32 that divides K={K} "
                f"and either divides the group size {g} or is a power-of-two multiple of it"
            )
        return requested
    for bk in (256, 128, 64, 32):
        if fits(bk):
            return bk
    raise ValueError(f"{who}: no K tile in (256, 128, 64, 32) fits K={K} with group size {g}")


def _pick_split(steps: int, programs: int, requested: int | None, who: str) -> int:
    if requested is not None:
        if requested < 1 or steps % requested:
            raise ValueError(f"{who}: split_k={requested} must divide the {steps} K tiles")
        return requested
    s = 1
    while programs * s < _MIN_PROGRAMS and steps % (2 * s) == 0:
        s *= 2
    return s


def _kernel(x_ref, w_ref, s_ref, *refs, p: Plan, steps: int):
    z_ref, o_ref = refs if p.has_zero else (None, refs[0])
    split = pl.program_id(2)
    f32_dot = x_ref.dtype == jnp.float32
    prec = lax.Precision.HIGHEST if f32_dot else None

    def body(kk, acc):
        step = split * steps + kk
        x = x_ref[:, pl.ds(step * p.bk, p.bk)]  # [bm, bk]
        v = C.decode(C.load_codes(w_ref, p.fmt.bits, step, p.bk), p.fmt)  # [bn, bk] f32
        cols, rep = C.group_slice(step, p.bk, p.g)
        s = s_ref[:, cols]
        s = C.e8m0_to_f32(s.astype(jnp.int32)) if p.e8m0 else s.astype(jnp.float32)
        if z_ref is not None:
            v = v - C.expand_groups(z_ref[:, cols].astype(jnp.float32), rep)
        w = (v * C.expand_groups(s, rep)).astype(p.dequant_dtype).astype(x.dtype)
        y = lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        )
        return acc + y

    acc = lax.fori_loop(0, steps, body, jnp.zeros((p.bm, p.bn), jnp.float32))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("p", "interpret"))
def _mpgemm(x, w_packed, scale, zero, *, p: Plan, interpret: bool):
    xp = C.pad_rows(x, p.bm)
    Mp = xp.shape[0]
    steps = p.K // p.bk // p.split_k
    if p.e8m0:
        scale = lax.bitcast_convert_type(scale, jnp.uint8)
    ng = scale.shape[1]
    in_specs = [
        pl.BlockSpec((p.bm, p.K), lambda i, j, s: (i, 0)),
        pl.BlockSpec((p.bn, w_packed.shape[1]), lambda i, j, s: (j, 0)),
        pl.BlockSpec((p.bn, ng), lambda i, j, s: (j, 0)),
    ]
    args = [xp, w_packed, scale]
    if p.has_zero:
        in_specs.append(pl.BlockSpec((p.bn, ng), lambda i, j, s: (j, 0)))
        args.append(zero)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=3)
    parts = pl.pallas_call(
        functools.partial(_kernel, p=p, steps=steps),
        out_shape=jax.ShapeDtypeStruct((p.split_k, Mp, p.N), jnp.float32),
        grid=(Mp // p.bm, p.N // p.bn, p.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, p.bm, p.bn), lambda i, j, s: (s, i, j)),
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"mpgemm_{p.fmt.name}_g{p.g}",
    )(*args)
    y = parts[0] if p.split_k == 1 else jnp.sum(parts, axis=0)
    return y[: p.M].astype(x.dtype)


def mpgemm(
    x: Float[Array, "M K"],
    w_packed: UInt32[Array, "N Kw"],
    scale: Array,
    zero: Float[Array, "N G"] | None = None,
    *,
    fmt: Format | str,
    dequant_dtype=None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """``x @ Ŵᵀ`` with ``Ŵ = (decode(codes) − zero) · scale`` dequantized tile by tile.

    ``dequant_dtype`` (default ``x.dtype``): the dtype each dequantized tile is rounded to
    before it is cast to ``x.dtype`` (``qarray_matmul`` passes the QArray's dtype, so the
    kernel sees exactly the weights ``qa.dequantize().astype(x.dtype)`` gives). Output dtype:
    ``x.dtype`` (float32 accumulation). Layout and tiles: see the module docstring."""
    fmt = get_format(fmt)
    M, K, N, g = _check_weights(x, w_packed, scale, zero, fmt, "mpgemm")
    bm = C.block_m_for(M, block_m, "mpgemm")
    bn = C.pick_block(N, block_n, (64, 32, 16), "mpgemm", "block_n")
    bk = _pick_bk(K, g, block_k, "mpgemm")
    programs = -(-M // bm) * (N // bn)
    sk = _pick_split(K // bk, programs, split_k, "mpgemm")
    p = Plan(
        fmt=fmt, M=M, K=K, N=N, g=g, bm=bm, bn=bn, bk=bk, split_k=sk,
        e8m0=scale.dtype == jnp.float8_e8m0fnu, has_zero=zero is not None,
        dequant_dtype=jnp.dtype(dequant_dtype or x.dtype),
    )  # fmt: skip
    return _mpgemm(x, w_packed, scale, zero, p=p, interpret=interpret)


def mpgemm_reference(
    x: Float[Array, "M K"],
    w_packed: UInt32[Array, "N Kw"],
    scale: Array,
    zero: Float[Array, "N G"] | None = None,
    *,
    fmt: Format | str,
    dequant_dtype=None,
) -> Float[Array, "M N"]:
    """Plain jnp: unpack (``numerics.packing.unpack``), dequantize the whole ``Ŵ``, then dot
    (float32 accumulation, IEEE float32 products for float32 ``x``)."""
    fmt = get_format(fmt)
    _check_weights(x, w_packed, scale, zero, fmt, "mpgemm_reference")
    return _reference(x, w_packed, scale, zero, fmt, jnp.dtype(dequant_dtype or x.dtype))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _reference(x, w_packed, scale, zero, fmt: Format, dequant_dtype):
    K = x.shape[1]
    N, ng = scale.shape
    codes = unpack(w_packed, fmt.bits, axis=1, length=K)
    v = fmt.decode(codes).reshape(N, ng, K // ng)
    if zero is not None:
        v = v - zero.astype(jnp.float32)[:, :, None]
    W = (v * scale.astype(jnp.float32)[:, :, None]).reshape(N, K)
    W = W.astype(dequant_dtype).astype(x.dtype)
    prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.dot(x, W.T, precision=prec, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def qarray_fields(qa) -> tuple[Array, Array, Array | None]:
    """``(w_packed, scale, zero)`` of a 2-D ``QArray`` ``[N, K]`` in the kernel's layout.

    Unpacked codes are packed here (``qa.pack(axis=1, word_bits=32)``; pack once ahead of time
    to skip this). Groups must run along K (``block_shape = (r, g)``); row blocks ``r > 1``
    (per-tensor, 2-D tiles) repeat their scale rows. Scales of scales are expanded to float32."""
    from numerics.qarray import QArray

    if not isinstance(qa, QArray):
        raise ValueError(f"qarray_matmul: expected a numerics QArray, got {type(qa).__name__}")
    if qa.ndim != 2:
        raise ValueError(f"qarray_matmul: the weight QArray must be 2-D [N, K], got {qa.shape}")
    if is_ragged(qa.shape, qa.block_shape):
        raise ValueError(
            f"qarray_matmul: ragged groups (block shape {qa.block_shape} on {qa.shape}) are not "
            "supported by the kernel; quantize with a group size that divides K"
        )
    if qa.packing is None:
        qa = qa.pack(axis=1, word_bits=32)
    elif qa.packing != (1, 32):
        raise ValueError(
            f"qarray_matmul: codes are packed as (axis, word_bits)={qa.packing}; the kernel "
            "reads (1, 32): use qa.unpack().pack(axis=1, word_bits=32)"
        )
    scale = qa.scale_array() if isinstance(qa.scale, QArray) else qa.scale
    zero = qa.zero
    r = qa.block_shape[0]
    if r > 1:
        scale = jnp.repeat(scale, r, axis=0)
        zero = None if zero is None else jnp.repeat(zero, r, axis=0)
    return qa.codes, scale, zero


def qarray_matmul(x: Float[Array, "*B K"], qa, *, interpret: bool = False, **tiles) -> Array:
    """``x @ qa.dequantize()ᵀ`` through :func:`mpgemm`, for ``x [..., K]`` and a weight QArray
    ``[N, K]`` (the ``Hooks.matmul(name, x, w_leaf)`` seam). Returns ``[..., N]`` in
    ``x.dtype``; ``tiles`` are passed on (``block_n``, ``block_k``, ``split_k``, ...)."""
    w, scale, zero = qarray_fields(qa)
    K = qa.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"qarray_matmul: x has {x.shape[-1]} features, the weight takes {K}")
    x2 = x.reshape(-1, K)
    y = mpgemm(
        x2, w, scale, zero, fmt=qa.format, dequant_dtype=qa.dtype, interpret=interpret, **tiles
    )
    return y.reshape(x.shape[:-1] + (qa.shape[0],))
