"""Block floating point KV cache with K-sort (Trukhanov & Soloveychik, *Accurate Block
Quantization in LLMs with Outliers*, arXiv 2403.20137).

**The format.** A cached key (or value) vector of one head, ``k ∈ R^D``, is cut into blocks of
``b`` consecutive channels; each block stores one shared 8-bit exponent ``e`` and ``b`` integer
mantissas ``m_j`` of ``M`` bits (two's complement, narrow symmetric range ``|m_j| ≤ 2^(M−1) − 1``):

    e = ⌊log2 max_j |k_j|⌋ − (M − 2),   m_j = clamp(round(k_j / 2^e)),   k̂_j = m_j · 2^e

so the block maximum lands in ``[2^(M−2), 2^(M−1))`` of the mantissa grid. BFP12 is ``M = 4``
(4 + 8 = 12 bits, hence the name), BFP16 ``M = 8``; a stored element costs ``M + 8/b`` bits.
This is ``numerics.config.block_fp(M, b)`` — the one BFP of the project; its naming, range and
cost are those of d-Matrix's own numerics library (github.com/d-matrix-ai/dmx-compressor,
``numerical/format.py``: ``BFP[4|8]{b}`` = "BFP12", ``BFP[8|8]{b}`` = "BFP16", symmetric,
``bit_precision = precision + 8/block_size``; its ``block_quantize`` scales the block max by
``2^(wl−2)`` as above).

**K-sort** (the paper's Algorithm 1, as the paper's summaries state it: sort the rows of W_k by
their Euclidean norms, reorder W_q the same way, at compile time). A block shares one exponent,
so one outlier channel in a block costs every other channel of the block its precision. The
outliers of keys live in fixed channels, so a fixed permutation ``π`` per layer and key head,
channels in descending order of magnitude, puts channels of similar magnitude into the same
block. Because ``q · k = q[π] · k[π]``, storing ``k[π]`` and reading it with ``q[π]`` changes
nothing but the quantization. Magnitude statistics (``sort``):

* ``"wk_norm"`` (the paper's, data-free): ``‖W_k[c, :]‖₂`` of each key channel ``c``;
* ``"k_absmax"``: ``max |k_c|`` of the post-RoPE calibration keys — the quantity that decides
  the shared exponent of the block ``c`` lands in;
* ``"none"``: plain BFP (the baseline the paper improves on).

**Where the permutation lives: in the codec, on purpose.** Folding ``π`` into the rows of
k_proj and q_proj (the paper's compile-time form) is exact only where nothing between the
projection and the cache mixes channels; RoPE does (it rotates channel ``c`` with ``c ± D/2``
at a per-pair frequency), so the fold would also have to permute RoPE's pairing and frequency
table, which ``harness`` fixes. Here the key codec stores ``Q(k[π])`` and decodes it as
``Q(k[π])[π⁻¹]``; then ``q · Q(k[π])[π⁻¹] = q[π] · Q(k[π])`` — the stored numbers and every
score are those of the folded form (up to float summation order), and since both the scoring
path (``KVCodec.fake``) and the decoding path (``harness.kvcache.write`` / ``read``) go through
``encode`` / ``decode``, both see it. A deployment would permute the one query per step
instead of un-permuting the cache. The permutation itself (``n_layers · n_kv · D`` small
integers) is a constant of the model, not of the cache, and is not counted per element.

Differences, on purpose: the blocks run along each head's channels and never straddle heads
(a head shorter than ``b`` is one block); K-sort sorts within each key head (so GQA query heads
share their key head's ``π``); values use the same BFP with no sort, at a fixed width.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from harness import kvcache
from methods.base import check_bits
from numerics.config import QuantConfig, block_fp
from numerics.packing import bits_per_weight
from numerics.quantize import quantize

BITS = (2, 3, 4, 5, 6, 8)  # mantissa bits M (BFP10 … BFP16)
BLOCKS = (8, 16, 32, 64, 128)  # the block sizes numerics.config.block_fp supports
SORTS = ("wk_norm", "k_absmax", "none")


def bfp_name(bits: int) -> str:
    """``BFP{M + 8}``: the paper's name of a BFP with ``M``-bit mantissas (BFP12: M = 4)."""
    return f"BFP{bits + 8}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BFPKVConfig:
    """``bits`` is the mantissa width ``M`` of a key element (``KV4`` → BFP12); a stored key
    element costs ``M + 8/block`` bits."""

    bits: int = 4  # M: key mantissa bits (BFP12, the paper's low-precision K cache)
    block: int = 32  # b: channels sharing one exponent (the paper: 32 / 64)
    sort: str = "wk_norm"  # K-sort statistic: "wk_norm" (paper), "k_absmax" (calib.), "none"
    value_bits: int = 8  # values: BFP16, fixed
    value_block: int = 32  # values' block

    def __post_init__(self):
        check_bits(self.bits, BITS, "BFP-KV keys")
        check_bits(self.value_bits, BITS, "BFP-KV values (value_bits)")
        for f in ("block", "value_block"):
            if getattr(self, f) not in BLOCKS:
                raise ValueError(f"BFP-KV: {f}={getattr(self, f)!r} not one of {BLOCKS}")
        if self.sort not in SORTS:
            raise ValueError(f"BFP-KV: sort={self.sort!r} not one of {SORTS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlainBFPKVConfig(BFPKVConfig):
    """Plain BFP keys (no K-sort): the baseline of the paper's comparison."""

    sort: str = "none"


def head_block(block: int, head_dim: int) -> int:
    """The block along one head: ``block``, or the whole head when it is shorter."""
    b = min(block, head_dim)
    if head_dim % b:
        raise ValueError(f"BFP-KV: block {block} does not divide head_dim {head_dim}")
    return b


def _config(bits: int, block: int, head_dim: int) -> QuantConfig:
    return block_fp(bits, head_block(block, head_dim), axis=-1)


Perm = tuple[tuple[tuple[int, ...], ...], ...]  # [layer][kv head] -> channel order π


@dataclasses.dataclass(frozen=True, kw_only=True)
class BFPCodec(kvcache.KVCodec):
    """Tokens ``[B, 1, kv, D]`` as BFP blocks of ``block`` channels, each head's channels
    first reordered by ``perm[layer][head]`` (K-sort; ``None``: as they are)."""

    bits: int = 4
    block: int = 32
    perm: Perm | None = None

    def __post_init__(self):
        super().__post_init__()
        check_bits(self.bits, BITS, "BFPCodec")
        if self.perm is not None:
            for i, heads in enumerate(self.perm):
                for h, p in enumerate(heads):
                    if sorted(p) != list(range(len(p))):
                        raise ValueError(f"BFPCodec: perm[{i}][{h}] is not a permutation")

    def _perm(self, layer: int, x: Array, inverse: bool) -> Array:
        p = np.asarray(self.perm[layer], np.int32)  # [kv, D]
        if p.shape != x.shape[-2:]:
            raise ValueError(f"BFPCodec: perm of layer {layer} is {p.shape}, keys {x.shape}")
        if inverse:
            p = np.argsort(p, axis=-1)
        return jnp.take_along_axis(x, jnp.broadcast_to(jnp.asarray(p), x.shape), axis=-1)

    def encode(self, layer, x):
        if self.perm is not None:
            x = self._perm(layer, x, inverse=False)
        return quantize(x, _config(self.bits, self.block, x.shape[-1]))

    def decode(self, layer, code):
        x = code.dequantize()
        return x if self.perm is None else self._perm(layer, x, inverse=True)

    def element_bits(self, head_dim):
        return bits_per_weight(
            quantize(jnp.zeros((1, head_dim)), _config(self.bits, self.block, head_dim))
        )


def ksort(m: Float[Array, "kv d"]) -> np.ndarray:
    """K-sort's permutation per key head: channels in descending order of the magnitude ``m``
    (stable, so equal magnitudes keep their order). A head whose magnitudes are not finite or
    all zero (a dead head: nothing to sort by) is a ValueError."""
    m = np.asarray(m, np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError("K-sort: the channel magnitudes are not finite (NaN / inf in the input)")
    dead = np.flatnonzero(np.all(m == 0, axis=-1))
    if dead.size:
        raise ValueError(f"K-sort: key head(s) {dead.tolist()} have all-zero magnitudes (dead)")
    return np.argsort(-m, axis=-1, kind="stable")


def wk_norms(Wk: Float[Array, "kvd dmodel"], n_kv: int) -> np.ndarray:
    """The paper's statistic: ``‖W_k[c, :]‖₂`` per key channel, ``[n_kv, head_dim]``."""
    W = np.asarray(Wk, np.float64)
    return np.linalg.norm(W.reshape(n_kv, -1, W.shape[-1]), axis=-1)
