"""QServe / QoQ's KV4 cache with SmoothAttention (arXiv 2405.04532, §4.2 and Eq. 5).

**SmoothAttention.** Keys have a few outlier channels; queries do not need quantizing. With
``Λ = diag(λ)`` the attention scores are unchanged by

    Z = (Q Λ)(K Λ⁻¹)ᵀ,      λ_i = max(|K_i|)^α,   α = 0.5,

and ``K Λ⁻¹`` has its outlier channels shrunk towards the rest before it is quantized. The
keys are the ones the cache stores, after RoPE; for ``Λ`` to be foldable into ``W_k`` / ``W_q``
(before RoPE) it must commute with RoPE, so the two channels of each RoPE pair (``i`` and
``i + d/2`` in the half-split layout) share ``λ``: the larger of their two max |K|. A query
head takes the ``λ`` of the KV head it reads (GQA).

**KV4.** Keys and values are quantized per token and per head: asymmetric unsigned ``b``-bit
codes over the ``d`` channels of one head with an fp16 scale and zero point each (the
reference's ``zint4`` with ``group_shapes [[1, 128]]`` = one Llama head, fp16
``group_scale_dtypes``), every token as it is written.

Checked against the official repositories: the serving system github.com/mit-han-lab/qserve
(KV4 with zero points) and the algorithm release github.com/mit-han-lab/deepcompressor —
``lmquant-v0.0.0-deprecated`` branch, ``projects/llm/configs/qoq/gchn.yaml`` (``smooth.yx``:
``strategy: Manual``, AbsMax ranges, ``alpha: 0.5``, ``beta: 0``; ``opts``: ``zint4``, groups
``[1, 128]``, ``skip_attn_q``) and ``deepcompressor/calib/smooth.py`` on ``main``
(``get_smooth_scale``: ``λ = span^α``, zero spans → 1; spans of post-RoPE keys ``with_rope``
viewed as ``[heads, 2, d/2]`` and max-reduced over the pair; ``smooth_attention``: ``W_q`` rows
multiplied by ``λ``, ``W_k`` rows divided).

Details as in the reference: λ from the AbsMax of post-RoPE calibration keys, α = 0.5, RoPE
pairs shared, per-token per-head asymmetric INT4 with fp16 scales and zero points, values not
smoothed, queries not quantized.

Differences, on purpose:

* The lent ``kv_cache`` contract keeps the model's weights as they are, so ``Λ`` is applied
  inside the key codec: it stores ``Q(k / λ)`` and reads ``λ ⊙ Q(k / λ)``. Attention then
  computes ``q · (λ ⊙ Q(k/λ)) = (q ⊙ λ) · Q(k/λ)``: the same scores as folding ``λ`` into
  ``W_q`` and ``1/λ`` into ``W_k`` (:func:`fold_smooth_attention`, which a weight-changing
  method — W4A8KV4 — uses instead), up to float rounding; no change to the queries is needed.
* Later deepcompressor configurations search α on a grid (``GridSearch``, ``beta: -2``) for some
  models; this is the paper's fixed α = 0.5.
* The zero point is an integer code (``numerics`` asymmetric grid), as ``zint4`` stores it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from harness import kvcache
from methods.base import check_bits
from numerics.config import QuantConfig
from numerics.quantize import quantize

BITS = (2, 3, 4, 8)  # the paper's KV4 (and the system's KV8); the same quantizer at other widths


@dataclasses.dataclass(frozen=True, kw_only=True)
class QServeKVConfig:
    bits: int = 4  # key / value code bits (KV4)
    alpha: float = 0.5  # SmoothAttention migration strength α
    smooth: bool = True  # SmoothAttention on the keys (False: plain per-token per-head KV4)

    def __post_init__(self):
        check_bits(self.bits, BITS, "QServe KV")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, float | int) or not 0.0 <= a <= 1.0:
            raise ValueError(f"QServe KV: alpha must be in [0, 1], got {a!r}")


def smooth_attention_scales(
    k_absmax: Float[Array, " c"], head_dim: int, alpha: float
) -> Float[Array, " c"]:
    """``λ [kv·hd]`` from the per-channel max |K| of post-RoPE calibration keys: the RoPE pair
    ``(i, i + d/2)`` of each head shares the larger max, raised to ``α``; a dead channel (max 0)
    gets ``λ = 1``."""
    m = jnp.asarray(k_absmax, jnp.float32)
    if m.ndim != 1 or m.size == 0 or m.size % head_dim or head_dim % 2:
        raise ValueError(
            f"SmoothAttention: k_absmax must be a non-empty [kv_heads·{head_dim}] vector with an "
            f"even head_dim, got shape {m.shape}"
        )
    if not bool(jnp.all(jnp.isfinite(m))) or bool(jnp.any(m < 0)):
        raise ValueError("SmoothAttention: k_absmax holds NaN, Inf or negative values")
    if not bool(jnp.any(m > 0)):
        raise ValueError("SmoothAttention: every key channel is zero (a dead calibration)")
    pair = jnp.max(m.reshape(-1, 2, head_dim // 2), axis=1, keepdims=True)
    lam = jnp.broadcast_to(pair, (m.size // head_dim, 2, head_dim // 2)).reshape(-1) ** alpha
    return jnp.where(lam > 0, lam, 1.0)


def fold_smooth_attention(
    W_q: Float[Array, "hq_d d_model"],
    W_k: Float[Array, "hk_d d_model"],
    lam: Float[Array, " hk_d"],
    *,
    n_heads: int,
    n_kv_heads: int,
    b_q: Array | None = None,
    b_k: Array | None = None,
) -> tuple[Array, Array, Array | None, Array | None]:
    """``W_q`` rows (and bias) times ``λ`` of their KV head, ``W_k`` rows divided by ``λ``
    (``W[out, in]``): ``q·k`` is unchanged and the new keys are ``k / λ``. For a method that may
    change the weights (QoQ's W4A8KV4); the KV-cache method applies ``λ`` in its codec.
    Valid for models without a norm on q / k (a per-head RMSNorm would undo the scale)."""
    hk_d = W_k.shape[0]
    if hk_d % n_kv_heads or W_q.shape[0] != hk_d // n_kv_heads * n_heads or lam.shape != (hk_d,):
        raise ValueError(
            f"fold_smooth_attention: W_q {W_q.shape}, W_k {W_k.shape}, λ {lam.shape} do not fit "
            f"{n_heads} query / {n_kv_heads} KV heads"
        )
    d = hk_d // n_kv_heads
    lam_q = jnp.repeat(lam.reshape(n_kv_heads, 1, d), n_heads // n_kv_heads, axis=1).reshape(-1)
    scale = lambda w, s: (
        None if w is None else (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    )
    return scale(W_q, lam_q), scale(W_k, 1.0 / lam), scale(b_q, lam_q), scale(b_k, 1.0 / lam)


def token_head_config(bits: int, head_dim: int) -> QuantConfig:
    """QServe's KV quantizer: per token, one asymmetric group per head, fp16 scale and zero."""
    return QuantConfig(format=f"uint{bits}", granularity="group", axis=3, group_size=head_dim,
                       zero_point=True, scale_dtype="float16")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenHeadCodec(kvcache.KVCodec):
    """``[B, 1, kv, hd]`` per token and head, asymmetric ``bits``-bit; with ``smooth`` (per
    layer, ``λ`` over ``kv·hd`` channels as python floats) it stores ``Q(x / λ)`` and reads
    ``λ ⊙ Q(x / λ)``."""

    bits: int = 4
    smooth: tuple[tuple[float, ...], ...] = ()  # per layer λ; empty: none

    def _lam(self, layer: int, shape) -> Any:
        lam = np.asarray(self.smooth[layer], np.float32).reshape((1, 1) + tuple(shape[2:]))
        return jnp.asarray(lam)

    def encode(self, layer, x):
        if self.smooth:
            x = x / self._lam(layer, x.shape)
        return quantize(x, token_head_config(self.bits, x.shape[3]))

    def decode(self, layer, code):
        x = code.dequantize()
        return x * self._lam(layer, x.shape) if self.smooth else x

    def element_bits(self, head_dim):
        return self.bits + 2 * 16 / head_dim  # codes + fp16 scale and zero per token and head


def kv_quant(cfg: QServeKVConfig, lam: tuple[tuple[float, ...], ...] = ()) -> kvcache.KVQuant:
    """QServe's cache: every token quantized as written, keys after RoPE (smoothed by ``lam``
    when given), values plain."""
    if cfg.smooth and not lam:
        raise ValueError("QServe KV: SmoothAttention needs the per-layer λ")
    return kvcache.KVQuant(
        key=TokenHeadCodec(bits=cfg.bits, smooth=tuple(lam) if cfg.smooth else ()),
        value=TokenHeadCodec(bits=cfg.bits),
    )
