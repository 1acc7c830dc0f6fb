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
  re-expressed as unsigned 8-bit integers times one float scale per output channel.
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


def dgq_quantize(W: Float[Array, "out in"], *, bits: int = 4, group_size: int = 128) -> QArray:
    """DGQ: asymmetric INT``bits`` groups whose float scales become UINT8 × per-channel float."""
    check_input(W, "dgq_quantize")
    qa = quantize(W, rtn(bits, group_size=group_size, sym=False))
    inner = quantize(
        qa.scale.astype(jnp.float32), QuantConfig(format="uint8", granularity="channel")
    )
    return dataclasses.replace(qa, scale=inner)


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
