# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""SqueezeLLM — Fisher-weighted non-uniform levels per output channel + dense-and-sparse.

Kim, Hooper, Gholami, Dong, Li, Shen, Mahoney, Keutzer, "SqueezeLLM: Dense-and-Sparse
Quantization", arXiv 2306.07629, §4.1 "Sensitivity-Based Non-uniform Quantization" and §4.2
"Dense-and-Sparse Decomposition"; checked against SqueezeAILab/SqueezeLLM
(``quantization/nuq.py``, ``squeezellm/outliers.py``, ``quantization/generate_outlier_config.py``,
``squeezellm/quant.py: QuantLinearLUT``) and its gradient companion kssteven418/SqueezeLLM-gradients
(``run.py``: squared gradients summed over calibration sequences, one sequence per backward).

Symbols: ``W[m, n]`` (out × in), ``F`` the Fisher information diagonal (``[m, n]``, the mean over
calibration sequences of the squared gradient of the sequence's next-token loss), ``k = 2^b``
levels per output channel, ``Q(w)`` the nearest level.

* Sensitivity-based non-uniform quantization (§4.1): for every output row, the ``k``
  levels minimise ``Σ_j F_j (w_j − Q(w_j))²`` — weighted k-means on the row's scalars
  (``numerics.codebooks.kmeans_batched``; the repo: scikit-learn ``KMeans``, k-means++ init,
  ``max_iter=50``, ``sample_weight`` = the row of F).
* Dense-and-sparse (§4.2): a fraction of the weights is kept in fp16 in a sparse matrix:
  the largest in magnitude (``outlier_fraction``, the paper's 0.45%; the repo thresholds
  ``|w|`` per layer at a value that yields the wanted share) and optionally the most
  sensitive by F (``sensitive_fraction``, the repo's ``--sensitivity``). They are removed
  from the dense part (zero weight in the k-means, as the repo's ``F · (w ≠ 0)``).
* Without Fisher information (``stats.fisher is None``) every weight gets weight 1: plain
  per-channel k-means (the paper's sensitivity-agnostic k-means baseline).

Storage: ``LUTWeight`` — ``b``-bit codes ``[m, n]`` and a per-row lookup table ``[m, k]`` of
fp16 levels (``QuantLinearLUT``'s ``qweight`` / ``lookup_table``). A per-row codebook is not one
``numerics`` ``Format`` (a format is static and shared by the whole array), hence this small
weight leaf, ``numerics.leaves.LUTWeight`` (importable from here too); it satisfies the
``numerics.leaves.WeightLeaf`` protocol, and ``numerics.leaves.weight_bits`` counts it:
``b + 16·k/n`` bits per weight, plus 32 per sparse outlier when wrapped in a ``DenseSparse``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from methods.base import LayerResult, LayerStats, check_bits
from numerics.codebooks import kmeans_batched
from numerics.leaves import DenseSparse, LUTWeight, weight_bits  # LUTWeight re-exported here


@dataclasses.dataclass(frozen=True, kw_only=True)
class SqueezeLLMConfig:
    bits: int = 3  # b: 2^b levels per output channel (the paper: 3 and 4)
    outlier_fraction: float = 0.0045  # share of weights kept in fp16 by magnitude (§4.2: 0.45%)
    sensitive_fraction: float = 0.0  # extra share by largest F (repo README D+S example: 0.0005)
    kmeans_iters: int = 50  # Lloyd iterations (the repo's sklearn max_iter=50)
    init: str = "kmeans++"  # centroid initialisation (sklearn's default, as the repo)

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4), "SqueezeLLM")
        for f in ("outlier_fraction", "sensitive_fraction"):
            v = getattr(self, f)
            if not (isinstance(v, float | int) and 0.0 <= v < 0.5):
                raise ValueError(f"SqueezeLLM: {f} must be in [0, 0.5), got {v!r}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise ValueError(
                f"SqueezeLLM: kmeans_iters must be a positive int, got {self.kmeans_iters!r}"
            )
        if self.init not in ("kmeans++", "random", "quantile"):
            raise ValueError(f"SqueezeLLM: unknown init {self.init!r}")

    @property
    def sparse(self) -> bool:
        return self.outlier_fraction > 0 or self.sensitive_fraction > 0


def sparse_indices(
    W: Float[Array, "m n"], F: Float[Array, "m n"], cfg: SqueezeLLMConfig
) -> Int[Array, " k"]:
    """Flat (row-major, ascending) indices of the weights kept in fp16, in the repo's order:
    the ``round(sensitive_fraction·mn)`` largest F first, then the ``round(outlier_fraction·mn)``
    largest |W| among the rest. Disjoint, so the count is static (jit-friendly)."""
    k_s = int(round(cfg.sensitive_fraction * W.size))
    k_o = int(round(cfg.outlier_fraction * W.size))
    score = jnp.abs(W).reshape(-1)
    parts = []
    if k_s:
        sens = jax.lax.top_k(F.reshape(-1), k_s)[1]
        score = score.at[sens].set(-jnp.inf)
        parts.append(sens)
    if k_o:
        parts.append(jax.lax.top_k(score, k_o)[1])
    if not parts:
        return jnp.zeros((0,), jnp.int32)
    return jnp.sort(jnp.concatenate(parts)).astype(jnp.int32)


def nonuniform_quantize(
    W: Float[Array, "m n"],
    F: Float[Array, "m n"],
    bits: int,
    *,
    key: Array,
    iters: int = 50,
    init: str = "kmeans++",
) -> tuple[LUTWeight, Float[Array, " m"]]:
    """Per-row Fisher-weighted k-means (§4.1). Returns the ``LUTWeight`` (fp16 levels, sorted;
    codes = nearest level) and the per-row objective ``Σ_j F_j (w_j − Q(w_j))²`` it stores."""
    k = 2**bits
    res = kmeans_batched(W, k, weights=F, iters=iters, key=key, init=init)
    lut = jnp.sort(res.centroids.astype(jnp.float32), axis=1).astype(jnp.float16)
    lv = lut.astype(jnp.float32)
    codes = jnp.argmin(jnp.abs(W[:, :, None] - lv[:, None, :]), axis=2).astype(jnp.uint8)
    q = LUTWeight(codes, lut, bits, W.dtype)
    obj = jnp.sum(F * jnp.square(W - q.dequantize(jnp.float32)), axis=1)
    return q, obj


def _check(W, F, cfg: SqueezeLLMConfig):
    if not isinstance(cfg, SqueezeLLMConfig):
        raise TypeError(f"SqueezeLLM: cfg must be a SqueezeLLMConfig, got {type(cfg).__name__}")
    W = jnp.asarray(W)
    if not jnp.issubdtype(W.dtype, jnp.floating):
        raise TypeError(f"SqueezeLLM: W must be a float array, got dtype {W.dtype}")
    if W.ndim != 2 or W.size == 0:
        raise ValueError(f"SqueezeLLM: W must be a non-empty matrix [out, in], got shape {W.shape}")
    if W.shape[1] < 2**cfg.bits:
        raise ValueError(
            f"SqueezeLLM: rows of {W.shape[1]} weights cannot fit {2**cfg.bits} levels"
        )
    concrete = not isinstance(W, jax.core.Tracer)  # value checks only outside jit
    if concrete and not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError("SqueezeLLM: W contains NaN or Inf")
    if F is None:
        return W, jnp.ones(W.shape, jnp.float32)
    F = jnp.asarray(F)
    if F.shape != W.shape:
        raise ValueError(f"SqueezeLLM: fisher has shape {F.shape}, weight {W.shape}")
    if not jnp.issubdtype(F.dtype, jnp.floating):
        raise TypeError(f"SqueezeLLM: fisher must be a float array, got dtype {F.dtype}")
    if not isinstance(F, jax.core.Tracer):
        if not bool(jnp.all(jnp.isfinite(F))):
            raise ValueError("SqueezeLLM: fisher must be finite (no NaN or Inf)")
        if bool(jnp.any(F < 0)):
            raise ValueError("SqueezeLLM: fisher (squared gradients) must be non-negative")
    return W, F.astype(jnp.float32)


def quantize_layer(
    W: Float[Array, "m n"], stats: LayerStats, cfg: SqueezeLLMConfig, *, key: Array | None = None
) -> LayerResult:
    """SqueezeLLM of one linear. ``stats.fisher`` weights the k-means (uniform when None).

    Returns a ``DenseSparse`` over a ``LUTWeight`` (just the ``LUTWeight`` when both sparse
    fractions are 0). ``key`` seeds the k-means++ initialisation (default ``key(0)``).
    Traceable under ``jax.jit`` (``cfg`` static): the number of sparse weights is static."""
    W, F = _check(W, stats.fisher, cfg)
    if stats.fisher is None and cfg.sensitive_fraction > 0:
        raise ValueError("SqueezeLLM: sensitive_fraction > 0 needs LayerStats.fisher")
    key = jax.random.key(0) if key is None else key
    W32 = W.astype(jnp.float32)
    m, n = W.shape
    idx = sparse_indices(W32, F, cfg)
    mask = jnp.zeros(m * n, bool).at[idx].set(True).reshape(m, n)
    # the sparse weights leave the dense part: zero weight in the k-means (repo: F · (w ≠ 0))
    Fd = jnp.where(mask, 0.0, F)
    empty = jnp.sum(Fd, axis=1, keepdims=True) <= 0  # repo: a row without sensitivity → ones
    Fd = jnp.where(empty, jnp.where(mask, 0.0, 1.0), Fd)
    Wd = jnp.where(mask, 0.0, W32)
    q, obj = nonuniform_quantize(Wd, Fd, cfg.bits, key=key, iters=cfg.kmeans_iters, init=cfg.init)
    q = dataclasses.replace(q, dtype=W.dtype)
    if cfg.sparse:
        rows, cols = idx // n, idx % n
        weight = DenseSparse(q, rows, cols, W32.reshape(-1)[idx].astype(jnp.float16))
    else:
        weight = q
    n_out = int(idx.shape[0])
    info = {
        "n_outliers": n_out,
        "outlier_share": n_out / W.size,
        "bits": weight_bits(weight),
        "fisher_err": jnp.sum(obj),  # Σ F (w − Q(w))² over the dense part (a 0-d array)
        "uniform_fisher": stats.fisher is None,
    }
    return LayerResult(weight, info)
