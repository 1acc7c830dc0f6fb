"""MixLLM — global mixed precision between output features (Zheng et al., arXiv 2412.14590).

Each output feature (row j of ``W[out, in]``) of every linear is kept at 8 bits or quantized to
4; which rows get 8 bits is decided **globally** — over all linears of the model, not per layer
— by a salience ranking, within a budget (the paper's default: 10 % of the weights at 8 bits).
Weights: asymmetric INT4 in groups of 128 for the low rows, symmetric INT8 per channel for the
salient rows (the ``numerics.mixed.RowMixed`` leaf); activations: INT8 per token (§4, the
"W4.4A8" sweet spot of the paper's system design).

Salience of row j (the loss increase if the row is quantized to 4 bits, second-order Taylor
expansion around the converged float model, gradient term ≈ 0, empirical Fisher F ≈ E[g²] as
the Hessian diagonal):

    S_j = ½ Σ_i F_ji (W_ji − Q₄(W)_ji)²

S is in units of the model loss, so rows of different linears compare directly; the rows are
sorted by S over the whole model and the top ones are promoted until their weights reach
``high_frac`` of all block-linear weights (``methods.mixllm.quantize_model``). A layer on its
own (:func:`quantize_layer` without a global ``threshold``) promotes its own top
``high_frac`` of rows.

Checked against: no official repository was read (the paper's code link was not stored);
the salience estimator and the 8-bit format are our reading of the paper's §3 and marked so in
the card.

Details as in the paper (as we read it): output-feature granularity, the global ranking, 10 %
at 8 bits, 4-bit asymmetric g128, 8-bit per-token activations.

Differences, on purpose: the Fisher information is the project's one estimator
(``methods.squeezellm.fisher``: mean squared per-sequence gradients on the calibration set);
the budget counts weights (a row of down_proj holds 1536 of them, a row of q_proj 576); each
promoted row's index is stored and counted (16 bits).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, check_bits, check_group
from numerics.config import QuantConfig, rtn
from numerics.mixed import RowMixed
from numerics.quantize import check_input, fake_quant, quantize

EAGER_ONLY = "the number of 8-bit rows of a layer depends on the data (the salience ranking)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixLLMConfig:
    bits: int = 4  # bits of the low-precision rows
    group_size: int | None = 128  # groups of the low rows (None: per channel)
    ragged: bool = False  # a shorter last group when group_size does not divide in-features
    high_bits: int = 8  # bits of the salient rows (symmetric, one scale per row)
    high_frac: float = 0.10  # fraction of all weights kept at high_bits (the budget)
    act_bits: int = 8  # activation bits (16: float)
    act_granularity: str = "token"  # "token" (dynamic per-token) | "tensor" (dynamic)
    threshold: float | None = None  # global salience threshold (set by quantize_model)

    def __post_init__(self) -> None:
        check_bits(self.bits, (2, 3, 4), "MixLLM")
        check_bits(self.high_bits, (8,), "MixLLM high_bits")
        check_group(self.group_size, "MixLLM")
        if not 0.0 <= self.high_frac <= 1.0:
            raise ValueError(f"MixLLM: high_frac must be in [0, 1], got {self.high_frac}")
        ActQuantConfig(bits=self.act_bits, granularity=self.act_granularity)

    def low_config(self) -> QuantConfig:
        return rtn(
            self.bits, group_size=self.group_size, sym=False, ragged=self.ragged,
            scale_dtype="float16",
        )  # fmt: skip

    def high_config(self) -> QuantConfig:
        return rtn(self.high_bits, group_size=None, sym=True, scale_dtype="float16")

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.act_bits, granularity=self.act_granularity)


@functools.partial(jax.jit, static_argnames=("cfg",))
def salience(
    W: Float[Array, "out in"], F: Float[Array, "out in"], cfg: MixLLMConfig
) -> Float[Array, " out"]:
    """``S_j = ½ Σ_i F_ji (W_ji − Q₄(W)_ji)²`` per output row (module docstring)."""
    W = W.astype(jnp.float32)
    D = W - fake_quant(W, cfg.low_config())
    return 0.5 * jnp.sum(F.astype(jnp.float32) * jnp.square(D), axis=1)


def mixed_quantize(W: Float[Array, "out in"], high: np.ndarray, cfg: MixLLMConfig) -> RowMixed:
    """The ``RowMixed`` leaf: rows where ``high`` at ``high_bits``, the rest at ``bits``."""
    high = np.asarray(high, bool)
    if high.shape != (W.shape[0],):
        raise ValueError(f"MixLLM: row mask of shape {high.shape} for a weight of {W.shape}")
    rows_high = np.nonzero(high)[0].astype(np.int32)
    rows_low = np.nonzero(~high)[0].astype(np.int32)
    low = quantize(W[rows_low], cfg.low_config()) if rows_low.size else None
    hi = quantize(W[rows_high], cfg.high_config()) if rows_high.size else None
    return RowMixed(low, hi, jnp.asarray(rows_low), jnp.asarray(rows_high))


def jit_inner(W, stats: LayerStats, cfg: MixLLMConfig, *, key=None):
    """The traced part (battery): salience and both fake-quantized candidates of every row."""
    del key
    F = stats.fisher if stats.fisher is not None else jnp.ones_like(W, jnp.float32)
    return salience(W, F, cfg), fake_quant(W, cfg.low_config()), fake_quant(W, cfg.high_config())


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: MixLLMConfig, *, key=None
) -> LayerResult:
    """Rows with salience ≥ ``cfg.threshold`` (the global ranking's) at 8 bits — or, without a
    threshold, this layer's own top ``high_frac`` of rows; needs the Fisher information."""
    del key
    check_input(W, "MixLLM")
    if W.ndim != 2:
        raise ValueError(f"MixLLM: expected a weight [out, in], got shape {W.shape}")
    if stats.fisher is None:
        raise ValueError("MixLLM needs the Fisher information (stats.fisher) of the weight")
    if stats.fisher.shape != W.shape:
        raise ValueError(f"MixLLM: fisher of shape {stats.fisher.shape} for a weight {W.shape}")
    S = np.asarray(salience(W, stats.fisher, cfg))
    if cfg.threshold is None:
        k = int(round(cfg.high_frac * W.shape[0]))
        high = np.zeros(W.shape[0], bool)
        high[np.argsort(-S, kind="stable")[:k]] = True
    else:
        high = S >= cfg.threshold
    leaf = mixed_quantize(W, high, cfg)
    info = {"high_rows": int(high.sum()), "salience_sum": float(S.sum())}
    return LayerResult(leaf, info=info, act=act_quantizer(cfg.act_config(), who="MixLLM"))


def global_threshold(saliences: list[np.ndarray], widths: list[int], frac: float) -> float:
    """The salience threshold promoting the globally top rows until their weights reach
    ``frac`` of all weights (rows of linear n hold ``widths[n]`` weights each); +inf for 0."""
    S = np.concatenate([np.asarray(s, np.float64) for s in saliences])
    w = np.concatenate(
        [np.full(len(s), n, np.float64) for s, n in zip(saliences, widths, strict=True)]
    )
    budget = frac * w.sum()
    order = np.argsort(-S, kind="stable")
    cum = np.cumsum(w[order])
    n = int(np.searchsorted(cum, budget, side="right"))
    return float("inf") if n == 0 else float(S[order[n - 1]])
