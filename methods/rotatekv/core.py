"""RotateKV (arXiv 2501.16383): a 2-bit KV cache whose keys are rotated before RoPE.

The three parts of the paper (§3), as its official repository (github.com/ZunhaiSu/RotateKV,
``fuse_weights.py``, ``k_reordering_calibration.py``, ``RotateKV_fake_quant/``, ``utils.py``)
runs them:

* **Pre-RoPE grouped-head rotation.** The keys of ``g`` KV heads are rotated together,
  before RoPE, by one orthonormal Hadamard matrix ``H`` of order ``g·d`` (the reference: 4
  heads of 128, ``H_512``), which spreads an outlier channel over every channel of the group
  and across heads. The cache stores rotated keys, so its read un-rotates them (``Hᵀ``) and
  RoPE is applied afterwards: ``KVQuant(pre_rope=True)``.
* **Outlier-aware rotation (channel reordering).** After the rotation the channels of all KV
  heads are permuted by a calibrated order ``π``: ascending mean of the rotated key channel
  over the calibration tokens (the reference sorts the channel *sums*, the same order). The
  quantization groups are consecutive channels of the permuted vector, so channels of similar
  offset share a group's min / max. The read applies ``π⁻¹`` before ``Hᵀ``. Stored:

      k̃ = Q(π(H k)),      k̂ = Hᵀ π⁻¹(k̃)

* **Attention-sink-aware quantization.** The tokens that carry massive activations are kept in
  full precision (the reference keeps the tokens of the 20 largest |h| elements of each
  layer's input). ``harness.kvcache`` keeps sink tokens by position (``sink``, the first
  tokens): see "differences" below.

Values are rotated per head by ``H_d`` (the reference folds it into v_proj / o_proj) and
quantized like the keys. The quantizer (``fake_quant.py``) is per token, asymmetric, over
groups of ``G`` consecutive channels (the reference's ``G = 128`` = one Llama head), with the
group's min and max shrunk by a clip ratio ``ρ`` (0.8 at 2 bits, 1.0 at 3 and 4 bits):

    s = ρ(max − min) / (2^b − 1),   z = round(−ρ·min / s),   x̂ = (clamp(round(x/s) + z) − z)·s

Every token is quantized as it is written (no full-precision window); scales and zero points
are fp16.

Details as in the reference: rotation before RoPE over groups of heads, global channel order
from calibration keys after the rotation, per-token groups, clip ratios, per-head value
Hadamard, every token but the sinks quantized.

Differences, on purpose:

* SmolLM2 has 3 KV heads of 64: the reference's group of 4 heads does not divide 3, so the
  default rotates all KV heads of a layer together (``H_192 = Q_12 ⊗ H_16``, a true Hadamard
  matrix, Paley I, from ``numerics.transforms``); a quantization group is one head (64).
* Sinks are the first ``sink`` tokens (default 1), not the tokens the massive activations point
  at: the cache's sink policy is positional. On SmolLM2's calibration segments the reference's
  rule selects position 0 in 28 of 30 layers, with up to 20 other tokens per layer that vary
  with the text (``papers/rotatekv/README.md``).
* The clip keeps 0 inside the range (``numerics`` asymmetric grids always do): the range is
  ``[ρ·min(min, 0), ρ·max(max, 0)]``; the reference's is ``[ρ·min, ρ·max]``, the same unless a
  group holds a single sign.
* At 3 bits the reference computes its scale with ``bit**2 − 1 = 8`` levels but clamps codes
  to ``2^3 − 1 = 7`` (its top level is never used); here the scale uses ``2^b − 1``.
* The channel order is computed from a uniform sample of ≤ 4096 calibration tokens per layer
  (``harness.stats`` ``k_pre_rope_sample``) rather than every token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from harness import kvcache
from methods.base import check_bits
from numerics.config import QuantConfig
from numerics.quantize import quantize
from numerics.transforms import hadamard_transform, inverse_hadamard_transform

BITS = (2, 3, 4)  # the reference's RotateKV2 / RotateKV3 / RotateKV4
CLIP = {2: 0.8, 3: 1.0, 4: 1.0}  # utils.py: k_clip_ratio = v_clip_ratio


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotateKVConfig:
    bits: int = 2  # key and value code bits (RotateKV2)
    head_group: int | None = None  # KV heads rotated together; None: all KV heads of a layer
    group: int | None = None  # channels per quantization group; None: one head (ref: 128)
    clip_ratio: float | None = None  # ρ; None: the reference's 0.8 at 2 bits, 1.0 at 3 / 4
    sink: int = 1  # first tokens kept in full precision (attention sinks)
    rotate: bool = True  # Hadamard rotations (False: the same quantizer on raw keys / values)
    reorder: bool = True  # the calibrated channel order of the rotated keys

    def __post_init__(self):
        check_bits(self.bits, BITS, "RotateKV")
        for f in ("head_group", "group"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"RotateKV: {f} must be a positive int or None, got {v!r}")
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or self.sink < 0:
            raise ValueError(f"RotateKV: sink must be an int >= 0, got {self.sink!r}")
        rho = self.clip_ratio
        if rho is not None and not (isinstance(rho, float | int) and 0.0 < rho <= 1.0):
            raise ValueError(f"RotateKV: clip_ratio must be in (0, 1], got {rho!r}")

    @property
    def rho(self) -> float:
        return float(CLIP[self.bits] if self.clip_ratio is None else self.clip_ratio)

    def span(self, n_kv_heads: int, head_dim: int) -> int:
        """Channels rotated together: ``head_group · head_dim``."""
        g = n_kv_heads if self.head_group is None else self.head_group
        if n_kv_heads % g:
            raise ValueError(f"RotateKV: head_group {g} does not divide the {n_kv_heads} KV heads")
        return g * head_dim

    def quant_group(self, head_dim: int) -> int:
        g = head_dim if self.group is None else self.group
        if head_dim % g:
            raise ValueError(f"RotateKV: group {g} does not divide head_dim {head_dim}")
        return g


def channel_order(k_rotated_mean: Float[Array, " c"]) -> tuple[int, ...]:
    """``π``: the channels of the rotated keys (all KV heads, ``[kv·hd]``) in ascending order
    of their calibration mean (``k_reordering_calibration.py``: ``torch.sort`` of the sums)."""
    m = np.asarray(k_rotated_mean, np.float64)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(
            f"RotateKV: the key channel means must be a non-empty vector, got {m.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise ValueError("RotateKV: the key channel means hold NaN or Inf")
    return tuple(int(i) for i in np.argsort(m, kind="stable"))


def rotate(x: Float[Array, "*b c"], span: int) -> Float[Array, "*b c"]:
    """``H`` of order ``span`` on each run of ``span`` consecutive channels of the last axis."""
    *b, c = x.shape
    return hadamard_transform(x.reshape(*b, c // span, span)).reshape(*b, c)


def unrotate(x: Float[Array, "*b c"], span: int) -> Float[Array, "*b c"]:
    *b, c = x.shape
    return inverse_hadamard_transform(x.reshape(*b, c // span, span)).reshape(*b, c)


def clipped_quantize(x: Float[Array, "b t h d"], bits: int, group: int, rho: float):
    """Per-token asymmetric ``bits``-bit groups of ``group`` channels (last axis) with the
    group range shrunk by ``rho``: values outside ``[ρ·min, ρ·max]`` saturate, as the
    reference's clamp does. Returns the ``QArray`` (codes, fp16 scales and zero points)."""
    how = QuantConfig(format=f"uint{bits}", granularity="group", axis=3, group_size=group,
                      zero_point=True, scale_dtype="float16")  # fmt: skip
    if rho != 1.0:
        B, T, H, D = x.shape
        g = x.reshape(B, T, H, D // group, group)
        lo = jnp.minimum(jnp.min(g, axis=-1, keepdims=True), 0.0) * rho
        hi = jnp.maximum(jnp.max(g, axis=-1, keepdims=True), 0.0) * rho
        x = jnp.clip(g, lo, hi).reshape(B, T, H, D)
    return quantize(x, how)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotatedCodec(kvcache.KVCodec):
    """One side of RotateKV's cache, one token per chunk: rotate each run of ``span``
    channels (0: no rotation), permute by ``order[layer]`` (empty: no permutation), quantize
    per token; the read undoes the permutation and the rotation."""

    bits: int = 2
    group: int = 128  # channels per quantization group
    rho: float = 1.0  # clip ratio
    span: int = 0  # channels rotated together (keys: head_group·head_dim; values: head_dim)
    order: tuple[tuple[int, ...], ...] = ()  # per layer: π over kv_heads·head_dim channels

    def _flat(self, x):
        B, T, H, D = x.shape
        return x.reshape(B, T, H * D)

    def encode(self, layer, x):
        B, T, H, D = x.shape
        y = self._flat(x)
        if self.span:
            y = rotate(y, self.span)
        if self.order:
            y = y[..., np.asarray(self.order[layer])]
        return clipped_quantize(y.reshape(B, T, H, D), self.bits, self.group, self.rho)

    def decode(self, layer, code):
        x = code.dequantize()
        B, T, H, D = x.shape
        y = self._flat(x)
        if self.order:
            y = y[..., np.argsort(np.asarray(self.order[layer]))]
        if self.span:
            y = unrotate(y, self.span)
        return y.reshape(B, T, H, D)

    def element_bits(self, head_dim):
        return self.bits + 2 * 16 / self.group  # codes + fp16 scale and zero point per group
