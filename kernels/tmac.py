"""T-MAC: low-bit mpGEMM by table lookup instead of multiplication (arXiv 2407.00088).

For b-bit integer codes ``c[n, k] = Σ_i 2^i · B_i[n, k]`` (bit planes ``B_i ∈ {0, 1}``; for
two's-complement codes the top plane weighs ``−2^(b−1)``), the integer product is

    Σ_k x[m, k] c[n, k] = Σ_i w_i Σ_j T_j[m, idx_i[n, j]],     idx_i[n, j] = Σ_t B_i[n, 4j+t]·2^t

where ``T_j[m, p] = Σ_{t<4} bit_t(p) · x[m, 4j+t]`` is the table of the 16 partial sums of the
j-th group of 4 activations (sec. 3.1–3.2, fig. 2–3 of the paper: bit-serial decomposition,
one 16-entry table per group of g = 4 activations, lookups replace the multiplications,
the plane results are combined with shifts by 2^i). The table is built once per activation
row and shared by all N weight rows — that is where the saving comes from. Scales and zero
points come last, per quantization group G:

    y[m, n] = Σ_G s[n, G] · (Σ_{k∈G} x[m, k] c[n, k] − z[n, G] · Σ_{k∈G} x[m, k])

and ``Σ_{k∈G} x`` is free: it is the sum of the all-ones entries ``T_j[m, 15]``.

Kernel: each program owns ``[bm, bn]``; per K tile of ``bk`` (``bk`` divides ``g``) it loads
the 4 strided activation columns, builds the 16 tables with 11 adds (every entry with two or
more bits set is one add to a smaller entry), looks the ``b`` index planes up and adds. The
lookup is a 16-way multiplexer over the four index bits (what ARM ``TBL`` / x86 ``PSHUFB`` do
in one instruction; Pallas' Triton lowering has no gather), so on a GPU it is a faithful
model of the data flow, not a fast kernel; :func:`tmac_op_counts` gives the operation counts
the paper's CPU kernels realise. On integer activations (int8) everything up to the scale
epilogue is int32 and exact.

Weight layout (:func:`tmac_prepare`, done once offline): ``planes uint32 [b, N, K/32]``; plane
``i`` holds the 4-bit indices ``idx_i[n, j]`` packed 8 per word by ``numerics.packing``
(index j in bits ``4·(j mod 8)`` of word ``j // 8``) — exactly b bits per weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, UInt8, UInt32

from kernels import common as C
from numerics.formats import Format, IntFormat, get_format
from numerics.packing import pack

G4 = 4  # activations per table (the paper's g)
BITS = (1, 2, 3, 4)  # weight bit-widths


def _check_fmt(fmt: Format, who: str) -> None:
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"{who}: T-MAC needs an integer format (bit planes), got {fmt.name}")
    if fmt.bits not in BITS:
        raise ValueError(f"{who}: unsupported bit-width {fmt.bits}; supported: {BITS}")


def tmac_prepare(codes: UInt8[Array, "N K"], fmt: Format | str) -> UInt32[Array, "b N Kw"]:
    """Bit planes of ``codes`` as packed 4-bit table indices, ``uint32 [b, N, K/32]``."""
    fmt = get_format(fmt)
    _check_fmt(fmt, "tmac_prepare")
    if getattr(codes, "dtype", None) != jnp.uint8 or codes.ndim != 2:
        raise ValueError(
            f"tmac_prepare: codes must be 2-D uint8, got {getattr(codes, 'dtype', codes)}"
        )
    N, K = codes.shape
    if K % 32:
        raise ValueError(f"tmac_prepare: K={K} is not a multiple of 32 (8 table indices per word)")
    quads = codes.reshape(N, K // G4, G4)
    weights = jnp.asarray([1, 2, 4, 8], jnp.uint8)
    planes = []
    for i in range(fmt.bits):
        B_i = jnp.bitwise_and(jnp.right_shift(quads, np.uint8(i)), np.uint8(1))
        idx = jnp.sum(B_i * weights[None, None, :], axis=-1, dtype=jnp.uint8)  # [N, K/4]
        planes.append(pack(idx, 4, axis=1, word_bits=32))
    return jnp.stack(planes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Static description of one call."""

    fmt: IntFormat  # weight code format
    M: int  # rows of x (before padding)
    K: int  # reduction length
    N: int  # output columns
    g: int  # quantization group size along K (K when unscaled)
    bm: int  # row tile
    bn: int  # column tile
    bk: int  # K tile, divides g
    exact: bool  # integer activations: int32 tables and accumulation
    scaled: bool  # scales given
    has_zero: bool  # zero points given


def _tables(xs):
    """The 16 partial sums of every group of 4: ``T[p] = Σ_t bit_t(p)·x_t`` with 11 adds."""
    T = [jnp.zeros_like(xs[0])]
    for p in range(1, 16):
        hb = p.bit_length() - 1
        rest = p - (1 << hb)
        T.append(xs[hb] if rest == 0 else T[rest] + xs[hb])
    return T


def _lookup(T, idx):
    """``T[idx]`` for tables ``[bm, J]`` (16 of them) and indices ``[bn, J]`` → ``[bm, bn, J]``:
    a 16-way multiplexer, one select per level of the index bits (15 selects)."""
    level = [t[:, None, :] for t in T]
    for b in range(4):
        bit = (jnp.bitwise_and(jnp.right_shift(idx, b), 1) == 1)[None, :, :]
        level = [jnp.where(bit, level[2 * q + 1], level[2 * q]) for q in range(len(level) // 2)]
    return level[0]


def _kernel(x_ref, w_ref, *refs, p: Plan):
    s_ref = z_ref = None
    if p.scaled and p.has_zero:
        s_ref, z_ref, o_ref = refs
    elif p.scaled:
        s_ref, o_ref = refs
    else:
        (o_ref,) = refs
    acc_t = jnp.int32 if p.exact else jnp.float32
    J = p.bk // G4
    b = p.fmt.bits

    def body(step, y):
        k0 = step * p.bk
        xs = [x_ref[:, pl.ds(k0 + t, J, stride=G4)].astype(acc_t) for t in range(G4)]
        T = _tables(xs)  # 16 × [bm, J]

        def plane(i, acc):  # bit plane i: look up, add, weigh by 2^i (−2^(b−1): signed top)
            words = w_ref[i, :, pl.ds(step * (J // 8), J // 8)]  # [bn, J/8]
            idx = C.codes_from_words([words], 4)  # [bn, J]
            part = jnp.sum(_lookup(T, idx), axis=-1)  # gather-and-add
            if p.exact:
                part = jnp.left_shift(part, i)
            else:
                part = part * jnp.left_shift(1, i).astype(jnp.float32)
            if p.fmt.signed:
                part = jnp.where(i == b - 1, -part, part)
            return acc + part

        acc = lax.fori_loop(0, b, plane, jnp.zeros((p.bm, p.bn), acc_t))
        if not p.scaled:
            return y + acc
        col = pl.ds(step // (p.g // p.bk), 1)
        a = acc.astype(jnp.float32)
        if z_ref is not None:
            xsum = jnp.sum(T[15], axis=-1, keepdims=True).astype(jnp.float32)  # [bm, 1]
            a = a - z_ref[:, col].astype(jnp.float32).reshape(1, p.bn) * xsum
        return y + a * s_ref[:, col].astype(jnp.float32).reshape(1, p.bn)

    out_t = jnp.float32 if p.scaled else acc_t
    y = lax.fori_loop(0, p.K // p.bk, body, jnp.zeros((p.bm, p.bn), out_t))
    o_ref[...] = y


@functools.partial(jax.jit, static_argnames=("p", "interpret"))
def _tmac(x, planes, scale, zero, *, p: Plan, interpret: bool):
    xp = C.pad_rows(x, p.bm)
    Mp = xp.shape[0]
    b, _, Kw = planes.shape
    in_specs = [
        pl.BlockSpec((p.bm, p.K), lambda i, j: (i, 0)),
        pl.BlockSpec((b, p.bn, Kw), lambda i, j: (0, j, 0)),
    ]
    args = [xp, planes]
    for a in (scale, zero) if p.scaled else ():
        if a is not None:
            in_specs.append(pl.BlockSpec((p.bn, a.shape[1]), lambda i, j: (j, 0)))
            args.append(a)
    out_t = jnp.float32 if (p.scaled or not p.exact) else jnp.int32
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    y = pl.pallas_call(
        functools.partial(_kernel, p=p),
        out_shape=jax.ShapeDtypeStruct((Mp, p.N), out_t),
        grid=(Mp // p.bm, p.N // p.bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((p.bm, p.bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"tmac_{p.fmt.name}",
    )(*args)
    return y[: p.M]


def _check_x(x, who: str) -> bool:
    """Validate activations; True for the exact integer path."""
    ok = [jnp.dtype(d) for d in (jnp.int8, *C.FLOAT_ACTS)]
    if getattr(x, "dtype", None) not in ok:
        raise ValueError(
            f"{who}: activations must be int8 (exact path) or bfloat16/float16/float32, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{who}: activations must be a non-empty 2-D [M, K], got {x.shape}")
    return x.dtype == jnp.int8


def _check_scales(scale, zero, N: int, K: int, who: str) -> int:
    """Group size from the scale shape (K when unscaled)."""
    if scale is None:
        if zero is not None:
            raise ValueError(f"{who}: zero points need scales")
        return K
    if not jnp.issubdtype(scale.dtype, jnp.floating) or scale.dtype == jnp.float8_e8m0fnu:
        raise ValueError(f"{who}: scales must be float32/bfloat16/float16, got {scale.dtype}")
    if scale.ndim != 2 or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"{who}: scale must be [N, K/g] = [{N}, K/g], got {scale.shape}")
    g = K // scale.shape[1]
    if g % 32:
        raise ValueError(f"{who}: group size {g} is not a multiple of 32")
    if zero is not None and (
        zero.shape != scale.shape or not jnp.issubdtype(zero.dtype, jnp.floating)
    ):
        raise ValueError(f"{who}: zero must be a float array of shape {scale.shape}, got "
                         f"{zero.dtype} {zero.shape}")  # fmt: skip
    return g


def tmac(
    x: Array,
    planes: UInt32[Array, "b N Kw"],
    scale: Float[Array, "N G"] | None = None,
    zero: Float[Array, "N G"] | None = None,
    *,
    fmt: Format | str,
    block_m: int | None = None,
    block_n: int | None = None,
    interpret: bool = False,
) -> Array:
    """``x @ Ŵᵀ`` by table lookup; ``planes`` from :func:`tmac_prepare`.

    Without ``scale``: the integer product ``Σ_k x·c`` (int32 for int8 ``x``, exact; float32
    otherwise). With ``scale`` (and ``zero``): ``Σ_G s·(Σ x·c − z·Σ x)``, float32."""
    fmt = get_format(fmt)
    _check_fmt(fmt, "tmac")
    exact = _check_x(x, "tmac")
    M, K = x.shape
    if getattr(planes, "dtype", None) != jnp.uint32 or planes.ndim != 3:
        raise ValueError("tmac: planes must be the uint32 [b, N, K/32] array of tmac_prepare")
    b, N, Kw = planes.shape
    if N == 0:
        raise ValueError("tmac: empty weight (N=0)")
    if b != fmt.bits or Kw * 32 != K:
        raise ValueError(
            f"tmac: planes {planes.shape} do not match {fmt.name} weights for K={K} "
            f"(expected [{fmt.bits}, N, {K // 32 if K % 32 == 0 else 'K/32'}])"
        )
    g = _check_scales(scale, zero, N, K, "tmac")
    bk = C.pick_block(g, None, (128, 64, 32), "tmac", "block_k")
    p = Plan(
        fmt=fmt, M=M, K=K, N=N, g=g, bm=C.block_m_for(M, block_m, "tmac"),
        bn=C.pick_block(N, block_n, (32, 16), "tmac", "block_n"), bk=bk, exact=exact,
        scaled=scale is not None, has_zero=zero is not None,
    )  # fmt: skip
    return _tmac(x, planes, scale, zero, p=p, interpret=interpret)


def tmac_reference(
    x: Array,
    codes: UInt8[Array, "N K"],
    scale: Float[Array, "N G"] | None = None,
    zero: Float[Array, "N G"] | None = None,
    *,
    fmt: Format | str,
) -> Array:
    """The multiply-based product: unscaled ``x @ decode(codes)ᵀ`` (int32 for int8 ``x``), or
    with scales the dequantize-then-dot ``x @ ((decode(codes) − z)·s)ᵀ`` in float32."""
    fmt = get_format(fmt)
    _check_fmt(fmt, "tmac_reference")
    exact = _check_x(x, "tmac_reference")
    N, K = codes.shape
    g = _check_scales(scale, zero, N, K, "tmac_reference")
    v = fmt.decode(codes)
    if scale is None:
        if exact:
            return jnp.dot(x, v.astype(jnp.int32).T, preferred_element_type=jnp.int32)
        return jnp.dot(x.astype(jnp.float32), v.T, precision=lax.Precision.HIGHEST)
    v = v.reshape(N, K // g, g)
    if zero is not None:
        v = v - zero.astype(jnp.float32)[:, :, None]
    W = (v * scale.astype(jnp.float32)[:, :, None]).reshape(N, K)
    return jnp.dot(x.astype(jnp.float32), W.T, precision=lax.Precision.HIGHEST)


def tmac_op_counts(M: int, N: int, K: int, bits: int, group_size: int | None = None) -> dict:
    """Scalar operation counts of one ``[M, K] × [K, N]`` product, T-MAC vs multiply-based.

    T-MAC (this kernel): per row and group of 4 activations one 16-entry table built with 11
    adds; per output, weight bit-plane and group of 4 one lookup and one add; per output and
    quantization group ``b`` shift-adds to combine the planes, then the epilogue (one
    multiply-add for the zero point, one multiply-add for the scale). Multiply-based: one
    dequantization per weight (subtract the zero, multiply by the scale) and one multiply and
    one add per ``(m, n, k)``."""
    if K % G4 or (group_size is not None and K % group_size):
        raise ValueError(f"tmac_op_counts: K={K} must be a multiple of 4 and of the group size")
    n_groups = K // (group_size or K)
    tables = M * (K // G4)
    lookups = M * N * (K // G4) * bits
    tmac_ops = {
        "table_entries": 16 * tables,
        "table_adds": 11 * tables,
        "lookups": lookups,
        "lookup_adds": lookups,
        "plane_shift_adds": M * N * n_groups * bits,
        "multiplies": 2 * M * N * n_groups,
        "epilogue_adds": 2 * M * N * n_groups,
    }
    mul_ops = {"dequant_ops": 2 * N * K, "multiplies": M * N * K, "adds": M * N * K}
    tmac_ops["adds"] = (
        tmac_ops["table_adds"]
        + tmac_ops["lookup_adds"]
        + tmac_ops["plane_shift_adds"]
        + tmac_ops["epilogue_adds"]
    )
    return {
        "tmac": tmac_ops,
        "multiply_based": mul_ops,
        "multiplies_saved": mul_ops["multiplies"] - tmac_ops["multiplies"],
        "lookups_per_mac": lookups / (M * N * K),
    }


def qarray_tmac(x: Array, qa, *, interpret: bool = False, **tiles) -> Array:
    """:func:`tmac` on an integer weight ``QArray [N, K]`` with groups along K (unpacked or
    packed; the bit planes are prepared here — prepare once with :func:`tmac_prepare` to
    skip that)."""
    from numerics.qarray import QArray

    if not isinstance(qa, QArray) or qa.ndim != 2 or qa.block_shape[0] != 1:
        raise ValueError("qarray_tmac: needs a 2-D QArray with groups along K (block_shape (1, g))")
    scale = qa.scale_array() if isinstance(qa.scale, QArray) else qa.scale
    if scale.dtype == jnp.float8_e8m0fnu:
        scale = scale.astype(jnp.float32)
    planes = tmac_prepare(qa.unpacked_codes(), qa.format)
    return tmac(x, planes, scale, qa.zero, fmt=qa.format, interpret=interpret, **tiles)
