"""GEAR (arXiv 2403.05527): a KV cache stored as quantization + a low-rank approximation of the
quantization residual + a sparse matrix of outliers, compressed in streaming chunks.

For one head's chunk of ``n_b`` tokens, ``X ∈ R^{n_b × d}`` (keys or values):

    S = Filter_s(X)                     the s·n_b·d largest-magnitude entries, full precision
    D̂ = Quant_b(X − S)                  uniform b-bit asymmetric min-max groups (KIVI-style)
    R = X − D̂ − S,   L = A Bᵀ ≈ R       rank r by power iteration (``loop`` steps)
    X̂ = D̂ + S + L

Checked against the official repository (github.com/opengear-project/GEAR, also
HaoKang-Timmy/GEAR; ``GenerationBench/GenerationTest/GEARLM/Simulated/compress_function.py``
``gearslkivi_channelQ_new`` / ``gearslkivi_tokenQ_new`` / ``fake_poweriteration_group``,
``modeling_llama_new.py``'s streaming branch, ``run_template_llama2-13b.sh``):

Details as in the reference:

* The quantizer is the KIVI one ("GEAR" = GEAR-KIVI in the repo): keys per channel over the
  chunk's tokens, values per token over groups of ``group`` channels, min-max asymmetric onto
  ``0 … 2^b − 1``; outlier entries are replaced by a neutral value before the min / max are
  taken and restored exactly after, so they do not stretch the groups' ranges.
* The residual's error at the outlier positions is zero, and ``L`` is added everywhere.
* Power iteration per (batch, head) on ``R [n_b, d]``: ``P`` random, ``loop`` times
  ``Q = R P, P = Rᵀ Q`` with ``P`` and ``Q`` orthonormalised (QR) in the last step;
  ``L = Q Pᵀ``; ``A = Q [n_b, r]`` and ``B = P [d, r]`` are stored in 16 bits.
* Streaming (the repo's ``--streaming --streaming_gap 64``): new tokens gather in a
  full-precision buffer; when ``n_b`` have gathered *and one more token arrives*, those ``n_b``
  are compressed together (the repo compresses the past before appending the current token).
  In ``harness.kvcache`` terms: ``chunk = flush = n_b``, ``window = 1`` for keys and values,
  i.e. ``Q(L) = n_b·⌊(L − 1)/n_b⌋`` tokens quantized, a buffer of 1 … ``n_b`` in full precision.
* Defaults from ``run_template_llama2-13b.sh`` (GEAR, 2 bits): ``group 64, loop 3, rank 2,
  left (s) 0.02, streaming_gap 64``.

Differences, on purpose:

* The repo compresses the whole prompt at prefill as one chunk with a larger rank
  (``prefillrank 4``); here every chunk, prompt or generated, is ``n_b`` tokens with rank ``r``
  (scoring a window gives each query the cache exactly as token-by-token decoding stores it,
  so there is no separate prefill compression to model).
* Outliers: the paper's s % of entries by magnitude, counted per head-chunk
  (``⌊s·n_b·d⌋`` of them). The repo keeps ``int(s·H·d/2)`` largest and as many smallest
  (signed) entries per *row* — per token for values, and for keys per channel along the chunk's
  tokens with the same per-token count, which at ``n_b = 64`` and ``H·d = 5120`` keeps 102 of a
  channel's 64 entries (overlapping sets), i.e. most of the key chunk; we do not copy that.
* The repo's cluster count is ``b² − 1`` (a typo for ``2^b − 1``; equal at 2 and 4 bits);
  ours is ``2^b − 1`` at every ``b``.
* A fixed random start for the power iteration (``key(seed)``), so encoding is deterministic;
  the repo draws ``torch.rand`` afresh each call.

Stored bits per element (``element_bits``): ``b`` code bits; 16-bit scale and zero per group
(keys ``2·16/n_b``, values ``2·16/group``); ``16·r·(n_b + d)/(n_b·d)`` for ``A``, ``B``;
``(16 + index bits)·⌊s·n_b·d⌋/(n_b·d)`` for the outliers (index bits: 16 while ``n_b·d ≤ 2¹⁶``,
else 32).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from harness import kvcache
from methods.base import check_bits
from numerics.config import QuantConfig
from numerics.quantize import quantize

BITS = (2, 3, 4, 8)
SIDES = ("key", "value")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GEARConfig:
    bits: int = 4  # b: code bits of the quantized backbone (the paper's near-lossless KV4)
    group: int = 64  # value channels per group (keys: one group per channel per chunk)
    rank: int = 2  # r: rank of the residual's approximation per head and chunk (0: none)
    loop: int = 3  # power-iteration steps
    outliers: float = 0.02  # s: fraction of entries kept in full precision (0: none)
    buffer: int = 64  # n_b: tokens compressed together (the repo's streaming_gap)
    seed: int = 0  # the power iteration's fixed random start

    def __post_init__(self):
        check_bits(self.bits, BITS, "GEAR")
        for f, lo in (("group", 1), ("rank", 0), ("loop", 1), ("buffer", 1), ("seed", 0)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"GEAR: {f} must be an int >= {lo}, got {v!r}")
        s = self.outliers
        if not isinstance(s, int | float) or isinstance(s, bool) or not 0.0 <= s < 0.5:
            raise ValueError(f"GEAR: outliers (s) must be a fraction in [0, 0.5), got {s!r}")


def _quant_cfg(bits: int, axis: int, group: int) -> QuantConfig:
    return QuantConfig(format=f"uint{bits}", granularity="group", axis=axis, group_size=group,
                       zero_point=True, scale_dtype="float16")  # fmt: skip


def n_outliers(s: float, n_b: int, d: int) -> int:
    """How many entries of one head's ``[n_b, d]`` chunk are kept in full precision."""
    return int(math.floor(s * n_b * d + 1e-9))


def index_bits(n_b: int, d: int) -> int:
    return 16 if n_b * d <= 2**16 else 32


def filter_outliers(X: Float[Array, "b t h d"], k: int) -> tuple[Array, Array]:
    """``Filter_s``: per (batch, head) the ``k`` largest-magnitude entries of the ``[t, d]``
    chunk: flat indices ``[b, h, k]`` (into ``t·d``) and their values."""
    B, T, H, D = X.shape
    flat = jnp.transpose(X, (0, 2, 1, 3)).reshape(B, H, T * D)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    return idx, jnp.take_along_axis(flat, idx, axis=-1)


def outlier_mask(idx: Array, shape: tuple[int, ...]) -> Array:
    """Boolean ``[b, t, h, d]``: True at the outliers ``idx [b, h, k]``."""
    B, T, H, D = shape
    m = jnp.zeros((B, H, T * D), bool)
    m = jax.vmap(jax.vmap(lambda row, i: row.at[i].set(True)))(m, idx)
    return jnp.transpose(m.reshape(B, H, T, D), (0, 2, 1, 3))


def scatter_outliers(base: Array, idx: Array, val: Array) -> Array:
    """``base [b, t, h, d]`` with the outlier values written back at their positions."""
    B, T, H, D = base.shape
    flat = jnp.transpose(base, (0, 2, 1, 3)).reshape(B, H, T * D)
    flat = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v)))(flat, idx, val.astype(flat.dtype))
    return jnp.transpose(flat.reshape(B, H, T, D), (0, 2, 1, 3))


def power_iteration(
    R: Float[Array, "b h t d"], rank: int, loop: int, key: Array
) -> tuple[Float[Array, "b h t r"], Float[Array, "b h d r"]]:
    """Rank-``r`` factors ``A [t, r]``, ``B [d, r]`` with ``R ≈ A Bᵀ`` (the repo's
    ``fake_poweriteration_group``: orthonormalise in the last of ``loop`` steps)."""
    P = jax.random.uniform(key, (*R.shape[:2], R.shape[3], rank), jnp.float32)
    Rt = jnp.swapaxes(R, -1, -2)
    Q = None
    for i in range(loop):
        last = i == loop - 1
        if last:
            P = jnp.linalg.qr(P)[0]
        Q = R @ P
        if last:
            Q = jnp.linalg.qr(Q)[0]
        P = Rt @ Q
    return Q, P


def _neutral(X: Array, mask: Array, axis: int) -> Array:
    """The mean of the non-outlier entries along the grouped ``axis``: what outliers are
    replaced by before the groups' min / max are taken."""
    keep = jnp.where(mask, 0.0, 1.0)
    total = jnp.sum(X * keep, axis=axis, keepdims=True)
    return total / jnp.maximum(jnp.sum(keep, axis=axis, keepdims=True), 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GEARCodec(kvcache.KVCodec):
    """One side of the cache, ``n_b = chunk`` tokens ``[B, n_b, kv, hd]`` at a time."""

    side: str = "key"  # "key": per-channel groups over the chunk; "value": per-token groups
    bits: int = 4
    group: int = 64
    rank: int = 2
    loop: int = 3
    outliers: float = 0.02
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.side not in SIDES:
            raise ValueError(f"GEARCodec.side must be one of {SIDES}, got {self.side!r}")
        check_bits(self.bits, BITS, "GEAR")

    def _qcfg(self, d: int) -> QuantConfig:
        if self.side == "key":
            return _quant_cfg(self.bits, 1, self.chunk)
        return _quant_cfg(self.bits, 3, min(self.group, d))

    def encode(self, layer, x):
        B, T, H, D = x.shape
        if self.side == "value" and D % min(self.group, D):
            raise ValueError(f"GEAR: value group {self.group} does not divide head_dim {D}")
        code = {}
        k = n_outliers(self.outliers, T, D)
        mask = None
        if k:
            idx, val = filter_outliers(x, k)
            mask = outlier_mask(idx, x.shape)
            x_in = jnp.where(mask, _neutral(x, mask, 1 if self.side == "key" else 3), x)
            code["idx"] = idx.astype(jnp.uint16 if index_bits(T, D) == 16 else jnp.int32)
            code["val"] = val.astype(jnp.float16)
        else:
            x_in = x
        code["q"] = quantize(x_in, self._qcfg(D))
        if self.rank:
            base = self._backbone(code)
            R = jnp.transpose(x - base, (0, 2, 1, 3))  # [B, H, T, D]
            key = jax.random.fold_in(jax.random.key(self.seed), layer)
            A, Bf = power_iteration(R, self.rank, self.loop, key)
            code["a"], code["b"] = A.astype(jnp.float16), Bf.astype(jnp.float16)
        return code

    def _backbone(self, code) -> Array:
        """``D̂ + S``: the dequantized codes with the outliers restored."""
        base = code["q"].dequantize()
        if "idx" in code:
            base = scatter_outliers(base, code["idx"].astype(jnp.int32), code["val"])
        return base

    def decode(self, layer, code):
        base = self._backbone(code)
        if "a" in code:
            L = code["a"].astype(jnp.float32) @ jnp.swapaxes(code["b"].astype(jnp.float32), -1, -2)
            base = base + jnp.transpose(L, (0, 2, 1, 3))
        return base

    def element_bits(self, head_dim):
        n_b, d = self.chunk, head_dim
        scales = 2 * 16 / (n_b if self.side == "key" else min(self.group, d))
        low_rank = 16 * self.rank * (n_b + d) / (n_b * d)
        sparse = (16 + index_bits(n_b, d)) * n_outliers(self.outliers, n_b, d) / (n_b * d)
        return self.bits + scales + low_rank + sparse


def codecs(cfg: GEARConfig) -> tuple[GEARCodec, GEARCodec]:
    """The key and value codecs of ``cfg``: chunks of ``n_b`` compressed when one more token
    arrives (``window=1, flush=n_b``)."""
    kw = dict(bits=cfg.bits, group=cfg.group, rank=cfg.rank, loop=cfg.loop,
              outliers=cfg.outliers, seed=cfg.seed, chunk=cfg.buffer, window=1,
              flush=cfg.buffer)  # fmt: skip
    return GEARCodec(side="key", **kw), GEARCodec(side="value", **kw)
