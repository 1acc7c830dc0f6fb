"""Scales of scales: the second quantization level of QLoRA, DGQ and QServe.

* ``quantize_scales(qa, how, center=)`` — quantize a QArray's float scales with another
  config (the result's ``scale`` is itself a QArray). The scales are flattened (and padded
  with their mean to a whole number of blocks), as bitsandbytes does.
* ``double_quantize(qa)`` — QLoRA (arXiv 2305.14314, §3 "Double Quantization"): the
  first-level constants c₂ are quantized to 8-bit floats in blocks of 256 after
  subtracting their mean (they are positive). bitsandbytes uses its own "dynamic" 8-bit
  float map; we use FP8 E4M3 — the paper says only "8-bit Floats".
  Memory for NF4 g64: 8/64 + 32/(64·256) ≈ 0.127 bits per parameter (paper: 0.127).
* ``dgq_quantize(W, …)`` — Dual Grained Quantization (arXiv 2310.04836): INT4 group scales
  re-expressed as unsigned 8-bit integers times one float scale per output channel; with a
  ``channel_ratio`` the paper's INT8 form (every S⁽²⁾·(q − z) an int8). ``clip_groups`` is its
  per-group clipping (the two-phase search of ``methods.dgq`` picks both ratios).
* ``progressive_quantize(W, …)`` — QServe / QoQ (arXiv 2405.04532, §4.1): per-channel INT8
  first (protective range ±119 so that the 4-bit dequantization cannot overflow int8), then
  UINT4 groups with UINT8 integer scales and UINT4 zero points on the INT8 values.
  ``W ≈ s₁ · s₂ · (q − z)`` with s₁ float per channel, s₂, z integers per group.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics import granularity as G
from numerics.config import QuantConfig, rtn
from numerics.formats import IntFormat
from numerics.packing import storage_bits
from numerics.qarray import QArray
from numerics.quantize import check_input, quantize


def quantize_scales(qa: QArray, how: QuantConfig, *, center: bool = False) -> QArray:
    """Replace ``qa.scale`` by its quantization under ``how`` (applied to the flat scales)."""
    if isinstance(qa.scale, QArray):
        raise ValueError("scales are already quantized")
    if how.granularity not in ("tensor", "group"):
        raise ValueError("scales are quantized per tensor or in groups of the flattened scales")
    s = qa.scale.astype(jnp.float32).reshape(-1)
    n = s.shape[0]
    mu = jnp.mean(s) if center else jnp.float32(0.0)
    g = how.group_size if how.granularity == "group" else n
    pad = (-n) % g
    c = jnp.concatenate([s - mu, jnp.zeros((pad,), jnp.float32)]) if pad else s - mu
    inner = quantize(c, how.replace(axis=-1))
    if center:  # x = decode·s2 + μ  ⇔  (decode − z)·s2 with z = −μ/s2
        # a block of scales all equal to μ has s2 = 0 (codes of 0): give it s2 = 1 so μ survives
        s2 = inner.scale_array()
        s2 = jnp.where(s2 > 0, s2, 1.0)
        inner = dataclasses.replace(inner, scale=s2.astype(inner.scale.dtype))
        z = (inner.zero if inner.zero is not None else jnp.zeros_like(s2)) - mu / s2
        inner = dataclasses.replace(inner, zero=z)
    return dataclasses.replace(qa, scale=inner)


def double_quantize(qa: QArray, *, block: int = 256, fmt: str = "fp8_e4m3") -> QArray:
    """QLoRA double quantization of the first-level scales (see the module docstring)."""
    return quantize_scales(
        qa, QuantConfig(format=fmt, granularity="group", group_size=block), center=True
    )


def clip_groups(
    W: Float[Array, "out in"], ratio: Float[Array, "out ng"] | float, how: QuantConfig
) -> Float[Array, "out in"]:
    """``W`` clipped per block of ``how`` to ``ratio``·[min(min, 0), max(max, 0)]: min-max
    quantization of the result uses exactly the shrunk range (ratio 1: ``W`` unchanged)."""
    Wf = W.astype(jnp.float32)
    bs = G.block_shape(W.shape, how)
    r = jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), G.num_blocks(W.shape, bs))
    wb = G.to_blocks(Wf, bs)
    lo = jnp.minimum(jnp.min(wb, axis=(1, 3)), 0.0) * r
    hi = jnp.maximum(jnp.max(wb, axis=(1, 3)), 0.0) * r
    return G.from_blocks(jnp.clip(wb, G.expand_stat(lo), G.expand_stat(hi)), W.shape)


def dgq_quantize(
    W: Float[Array, "out in"],
    *,
    bits: int = 4,
    group_size: int = 128,
    ragged: bool = False,
    group_ratio: Float[Array, "out ng"] | float | None = None,
    channel_ratio: Float[Array, " out"] | float | None = None,
) -> QArray:
    """DGQ (arXiv 2310.04836 §3.1): asymmetric UINT``bits`` groups whose float scales s' become
    UINT8 integers S⁽²⁾ times one float16 scale s⁽¹⁾ per output channel: W ≈ s⁽¹⁾·S⁽²⁾·(q − z).

    * ``group_ratio`` r_g (phase 1 of the paper's two-phase search): each group is clipped to
      r_g·[min, max] before min-max quantization (``None``: 1, plain min-max);
    * ``channel_ratio`` ``None``: s⁽¹⁾ = max_g s' / 255 and S⁽²⁾ = round(s' / s⁽¹⁾) (the plain
      second level); a ratio r_c (phase 2): the paper's INT8 form, s⁽¹⁾ = r_c·max|W_row| / 127,
      S⁽²⁾ = clip(round(s' / s⁽¹⁾), 1, 255) and the codes limited to
      z ± ⌊127 / S⁽²⁾⌋ so that every S⁽²⁾·(q − z) is an INT8 on the per-channel grid s⁽¹⁾ —
      the int8 activations times these int8 weights are one integer GEMM per output channel
      (ilur98/DGQ ``QuantizerHelper.searchquant``, its ``W4W8`` branch).
    ``ragged``: a shorter last group (its statistics its own)."""
    check_input(W, "dgq_quantize")
    if W.ndim != 2:
        raise ValueError(f"dgq_quantize expects a 2-D weight [out, in], got {W.shape}")
    how = rtn(bits, group_size=group_size, sym=False, ragged=ragged)
    Wf = W.astype(jnp.float32)
    bs = G.block_shape(W.shape, how)
    nb = G.num_blocks(W.shape, bs)
    Wc = Wf if group_ratio is None else clip_groups(Wf, group_ratio, how)
    qa = quantize(Wc.astype(W.dtype), how)
    if channel_ratio is None:
        inner = quantize(
            qa.scale.astype(jnp.float32), QuantConfig(format="uint8", granularity="channel")
        )
        return dataclasses.replace(qa, scale=inner)
    qmax = 2.0**bits - 1.0
    rc = jnp.broadcast_to(jnp.asarray(channel_ratio, jnp.float32), (W.shape[0],))
    s1 = rc * jnp.max(jnp.abs(Wf), axis=1) / 127.0
    s1 = jnp.where(s1 > 0, s1, 1.0).astype(jnp.float16).astype(jnp.float32)
    s2 = jnp.clip(jnp.round(qa.scale_array().astype(jnp.float32) / s1[:, None]), 1.0, 255.0)
    z = qa.zero.astype(jnp.float32)
    reach = jnp.floor(127.0 / s2)  # |q − z| ≤ reach keeps S⁽²⁾·(q − z) inside int8
    lower, upper = jnp.maximum(z - reach, 0.0), jnp.minimum(z + reach, qmax)
    wb = G.to_blocks(jnp.clip(Wc, -127.0 * s1[:, None], 127.0 * s1[:, None]), bs)
    step = G.expand_stat(s2 * s1[:, None])
    q = jnp.clip(
        jnp.round(wb / step) + G.expand_stat(z), G.expand_stat(lower), G.expand_stat(upper)
    )
    scale = QArray(
        codes=s2.astype(jnp.uint8),
        scale=s1.astype(jnp.float16)[:, None],
        zero=None,
        format=IntFormat(bits=8, signed=False),
        block_shape=(1, nb[1]),
        shape=nb,
        dtype=jnp.float32,
    )
    return dataclasses.replace(qa, codes=G.from_blocks(q, W.shape).astype(jnp.uint8), scale=scale)


def progressive_quantize(
    W: Float[Array, "out in"], *, group_size: int = 128, protect: int = 119
) -> QArray:
    """QServe progressive W4A8 weights: INT8 per channel (±``protect``), then UINT4 groups
    with integer UINT8 scales and UINT4 zeros on the INT8 grid."""
    check_input(W, "progressive_quantize")
    if W.ndim != 2:
        raise ValueError(f"progressive_quantize expects a 2-D weight [out, in], got {W.shape}")
    if not 1 <= protect <= 127:
        raise ValueError("protect must be in 1..127")
    W = W.astype(jnp.float32)
    s1 = jnp.max(jnp.abs(W), axis=1) / protect
    s1 = jnp.where(s1 > 0, s1, 1.0).astype(jnp.float16).astype(jnp.float32)
    w8 = jnp.clip(jnp.round(W / s1[:, None]), -protect, protect)
    bs = G.block_shape(W.shape, QuantConfig(granularity="group", group_size=group_size))
    wb = G.to_blocks(w8, bs)
    lo = jnp.minimum(jnp.min(wb, axis=(1, 3)), 0.0)
    hi = jnp.maximum(jnp.max(wb, axis=(1, 3)), 0.0)
    s2 = jnp.clip(jnp.ceil((hi - lo) / 15.0), 1.0, 255.0)  # integer scale, never 0
    z = jnp.clip(jnp.round(-lo / s2), 0.0, 15.0)
    q = jnp.clip(jnp.round(wb / G.expand_stat(s2)) + G.expand_stat(z), 0.0, 15.0)
    u4, u8 = IntFormat(bits=4, signed=False), IntFormat(bits=8, signed=False)
    nb = G.num_blocks(W.shape, bs)
    scale = QArray(
        codes=s2.astype(jnp.uint8),
        scale=s1.astype(jnp.float16)[:, None],
        zero=None,
        format=u8,
        block_shape=(1, nb[1]),
        shape=nb,
        dtype=jnp.float32,
    )
    return QArray(
        codes=G.from_blocks(q, W.shape).astype(jnp.uint8),
        scale=scale,
        zero=z,
        format=u4,
        block_shape=bs,
        shape=tuple(W.shape),
        dtype=W.dtype,
    )


def scale_overhead_bits(qa: QArray) -> float:
    """Bits per weight spent on scales (incl. second level) — for reports."""
    return storage_bits(qa)["scales"] / math.prod(qa.shape)
