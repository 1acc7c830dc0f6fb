"""SmoothQuant (Xiao et al., arXiv 2211.10438) and the naive W8A8 baseline: the pure cores.

**Smoothing** (sec. 4, eq. 3–4). A linear ``Y = X W^T`` whose input ``X [tokens, j]`` has a few
huge channels is rewritten ``Y = (X diag(s)^{-1}) (W diag(s))^T`` with one factor per input
channel ``j``

    s_j = max|X_j|^α / max|W_j|^(1−α)                                   (eq. 4)

(``max|W_j|`` over the output rows of *every* linear that reads ``X``: q/k/v share one ``s``,
gate/up another). ``X / s`` is folded into the preceding RMSNorm's weight, ``W · s`` into the
weights, offline: the float model is unchanged. α = 0.5 is the paper's default ("migration
strength", sec. 4, Fig. 10 sweeps it); α → 1 moves all the difficulty into the weights, α = 0
gives ``s_j = 1 / max|W_j|`` (the weights' columns normalised — *not* the identity: "no
smoothing" is the ``w8a8`` baseline, which never rescales).

**Quantization levels** (Table 2, quoted): weights per-tensor at every level;

* ``O1`` — activations per-token dynamic;
* ``O2`` — activations per-tensor dynamic;
* ``O3`` — activations per-tensor static (one scale per linear from calibration; the most
  efficient, the paper's headline kernel setting, Fig. 7 / sec. 5.3).

The paper's "W8A8" baseline row of Table 2 is per-tensor weights with per-tensor *dynamic*
activations (= ``w8a8`` at ``O2``); ``w8a8`` at ``O3`` is the same without smoothing at O3.

Details as in the reference (mit-han-lab/smoothquant ``smoothquant/smooth.py``,
``smooth_ln_fcs_llama_like`` / ``smooth_lm``, read for this port): the activation statistic is the
per-channel ``max|X_j|`` of the full-precision model's calibration inputs; ``max|W_j|`` is the
maximum over the concatenated rows of the group's linears; both factors are clamped at 1e-5
before the division and ``s`` too (``.clamp(min=1e-5)``); for LLaMA-like models only the
``input_layernorm → q/k/v`` and ``post_attention_layernorm → gate/up`` pairs are smoothed
(o_proj and down_proj are not).

Differences, on purpose: the official fake-quant for LLaMA (``quantize_llama_like``) uses
per-channel weights; we follow Table 2's per-tensor weights at every level
(``weight_granularity="channel"`` gives the repo's choice). Static O3 scales come from the
smoothed inputs' ``max|X_j / s_j|`` (the same calibration pass: ``max|X_j| / s_j`` exactly) —
the repo's static path calibrates the smoothed model in a second pass, which gives the same
numbers up to float rounding. Calibration here is C4 (the repo: 512 Pile validation samples).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, check_bits
from numerics.config import QuantConfig
from numerics.formats import IntFormat
from numerics.quantize import quantize

LEVELS: dict[str, dict[str, object]] = {  # Table 2: activation granularity per level
    "O1": {"granularity": "token", "static": False},
    "O2": {"granularity": "tensor", "static": False},
    "O3": {"granularity": "tensor", "static": True},
}
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_BITS = (4, 6, 8, 16)
WEIGHT_GRANULARITIES = ("tensor", "channel")
CLAMP = 1e-5  # the reference's clamp on max|X|, max|W| and s


@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8Config:
    """Naive W8A8: int weights (per tensor) and int activations at a SmoothQuant level."""

    bits: int = 8  # weight bits (symmetric INT)
    act_bits: int = 8  # activation bits (16: float)
    level: str = "O3"  # Table 2: O1 per-token dynamic, O2 per-tensor dynamic, O3 per-tensor static
    weight_granularity: str = "tensor"  # Table 2; "channel": the repo's LLaMA fake quant

    def __post_init__(self) -> None:
        check_bits(self.bits, WEIGHT_BITS, type(self).__name__)
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits!r} not supported; choose one of {ACT_BITS}")
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r} not one of {sorted(LEVELS)} (paper Table 2)")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"weight_granularity {self.weight_granularity!r} not one of {WEIGHT_GRANULARITIES}"
            )

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.act_bits, **LEVELS[self.level])

    def weight_config(self) -> QuantConfig:
        return QuantConfig(
            format=IntFormat(bits=self.bits, signed=True),
            granularity=self.weight_granularity,
            axis=-1,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(W8A8Config):
    alpha: float = 0.5  # migration strength α of eq. 4, in [0, 1]

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0.0 <= a <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be a number in [0, 1], got {a!r}")


def smoothing_scales(
    act_absmax: Float[Array, " j"], weights: list[Float[Array, "o j"]], alpha: float
) -> Float[Array, " j"]:
    """Eq. 4: ``s_j = max|X_j|^α / max_j|W|^(1−α)`` over the rows of every linear in ``weights``
    (the linears sharing the input ``X``), with the reference's clamps at 1e-5."""
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha!r}")
    x = jnp.asarray(act_absmax, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("SmoothQuant: the calibration max|X_j| has NaN / inf entries")
    w = jnp.max(jnp.concatenate([jnp.abs(jnp.asarray(W, jnp.float32)) for W in weights]), axis=0)
    if w.shape != x.shape:
        raise ValueError(f"SmoothQuant: {x.shape[0]} activation channels, weights have {w.shape}")
    x, w = jnp.maximum(x, CLAMP), jnp.maximum(w, CLAMP)
    return jnp.maximum(x**alpha / w ** (1.0 - alpha), CLAMP)


def _check_weight(W: Array, who: str) -> None:
    if not jnp.issubdtype(jnp.asarray(W).dtype, jnp.floating):
        raise TypeError(f"{who}: W must be a float array, got {jnp.asarray(W).dtype}")
    if W.ndim != 2:
        raise ValueError(f"{who}: W must be 2-D [out, in], got shape {W.shape}")


def quantize_weight(W: Float[Array, "o i"], cfg: W8A8Config):
    """Symmetric INT weights at ``cfg.weight_granularity`` (traceable)."""
    return quantize(W, cfg.weight_config())


def jit_inner(W, stats: LayerStats, cfg: W8A8Config, *, key=None):
    """The traced part of :func:`quantize_layer`: the weight quantization."""
    del stats, key
    return quantize_weight(W, cfg)


EAGER_ONLY = (
    "the O3 static activation scale is checked on concrete calibration values (a zero or "
    "non-finite max|X| is refused) and NaN weights are refused, before anything is traced"
)


def quantize_layer(
    W: Float[Array, "o i"], stats: LayerStats, cfg: W8A8Config, *, key: jax.Array | None = None
) -> LayerResult:
    """One (already smoothed) linear: INT weights plus its input's run-time quantizer.

    ``stats.act_absmax`` (the max|X_j| of this linear's — smoothed — inputs) sets the O3 static
    scale; O1 / O2 need no statistics."""
    who = type(cfg).__name__
    _check_weight(W, who)
    if bool(jnp.any(jnp.isnan(W))):
        raise ValueError(f"{who}: W has NaN entries")
    acfg = cfg.act_config()
    if acfg.static and stats.act_absmax is None:
        raise ValueError(f"{who}: level {cfg.level} (static) needs the act_absmax statistic")
    act = act_quantizer(acfg, stats.act_absmax, who=who)
    return LayerResult(weight=jit_inner(W, stats, cfg, key=key), info={}, act=act)
