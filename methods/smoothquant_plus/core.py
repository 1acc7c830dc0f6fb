"""SmoothQuant+ — smoothing for 4-bit weight-only quantization (Pan et al., arXiv 2312.03788).

Activation outliers amplify the error of quantized weights (‖ΔW x‖ grows with the outlier
channels of x), so SmoothQuant+ smooths them before group-wise 4-bit weight quantization with
SmoothQuant's per-input-channel scale (arXiv 2211.10438 eq. 4)

    s_j = max|X_j|^α / max|W_j|^(1−α),     x·Wᵀ = (x / s)·(W·diag(s))ᵀ,

folded into the preceding RMSNorm (q/k/v, gate/up) or linear (up_proj's rows for down_proj;
v_proj's for o_proj where the shapes allow), then W·diag(s) is quantized to INT4 g128 (W4A16;
activations stay float). The smoothing strength α is **searched once per model** (§3): every
α of a grid is applied to the whole model, the model quantized, and the α whose quantized model
output is closest (mean squared error of the logits) to the float model's on calibration
sequences is kept (``methods.smoothquant_plus.quantize_model``).

:func:`quantize_layer` is the per-linear core of the contract: on one linear alone the same
search runs on the linear's own output error ``tr(ΔW H ΔWᵀ)`` and the result keeps its
``s`` (``methods.awq.ScaledQArray``).

Checked against: Adlik/smoothquantplus's README (the code was "to be released"; no
implementation read). The scale formula (``smoothing_scales``) is SmoothQuant's, as the paper
states; clamps at 1e-5 as mit-han-lab/smoothquant ``smooth_ln_fcs``.

Details as in the paper: per-channel smoothing of every linear's input with one α for the whole
model, group-wise (g128) asymmetric INT4 RTN of the smoothed weights, float activations.

Differences, on purpose: the grid (``n_grid`` values of α evenly in [0, 1]) and the model-level
objective (logit MSE on the first ``search_seqs`` calibration sequences) are ours — the paper
searches α on its calibration set with the model's output loss, details unverified.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from methods.awq.core import ScaledQArray
from methods.base import LayerResult, LayerStats, check_bits, check_group
from numerics.config import QuantConfig, rtn
from numerics.quantize import check_input, fake_quant, quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantPlusConfig:
    bits: int = 4  # weight bits
    group_size: int | None = 128  # None: per output channel
    ragged: bool = False  # a shorter last group when group_size does not divide in-features
    n_grid: int = 11  # α ∈ {0, 1/(n−1), …, 1}
    search_seqs: int = 4  # calibration sequences of the model-level α search

    def __post_init__(self) -> None:
        check_bits(self.bits, (2, 3, 4, 8), "SmoothQuant+")
        check_group(self.group_size, "SmoothQuant+")
        if self.n_grid < 2:
            raise ValueError(f"SmoothQuant+: n_grid must be ≥ 2, got {self.n_grid}")
        if self.search_seqs < 1:
            raise ValueError(f"SmoothQuant+: search_seqs must be ≥ 1, got {self.search_seqs}")

    def quant_config(self) -> QuantConfig:
        return rtn(
            self.bits, group_size=self.group_size, sym=False, ragged=self.ragged,
            scale_dtype="float16",
        )  # fmt: skip

    def alphas(self) -> Float[Array, " n"]:
        return jnp.linspace(0.0, 1.0, self.n_grid, dtype=jnp.float32)


def smoothing_scales(
    act_absmax: Float[Array, " d"], w_absmax: Float[Array, " d"], alpha: float | Array
) -> Float[Array, " d"]:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (arXiv 2211.10438 eq. 4), both
    maxima and the result clamped at 1e-5."""
    a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), 1e-5)
    w = jnp.maximum(jnp.asarray(w_absmax, jnp.float32), 1e-5)
    return jnp.maximum(jnp.power(a, alpha) / jnp.power(w, 1.0 - alpha), 1e-5)


def column_absmax(*Ws: Float[Array, "out in"]) -> Float[Array, " in"]:
    """``max|W_j|`` per input channel over every linear sharing the input."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(W.astype(jnp.float32)), axis=0) for W in Ws]), 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_search(W, H, m, cfg: SmoothQuantPlusConfig):
    Wf = W.astype(jnp.float32)
    wmax = column_absmax(Wf)

    def err(alpha):
        s = smoothing_scales(m, wmax, alpha).astype(jnp.float16).astype(jnp.float32)
        D = Wf - fake_quant(Wf * s[None, :], cfg.quant_config()) / s[None, :]
        return jnp.sum((D @ H.astype(jnp.float32)) * D)

    alphas = cfg.alphas()
    errs = jax.lax.map(err, alphas)
    best = alphas[jnp.argmin(errs)]
    s = smoothing_scales(m, wmax, best).astype(jnp.float16)
    return quantize(Wf * s.astype(jnp.float32)[None, :], cfg.quant_config()), s, best, errs


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: SmoothQuantPlusConfig, *, key=None
) -> LayerResult:
    """One linear alone: α searched on its own output error (module docstring)."""
    del key
    check_input(W, "SmoothQuant+")
    if W.ndim != 2:
        raise ValueError(f"SmoothQuant+: expected a weight [out, in], got shape {W.shape}")
    if stats.H is None or stats.act_absmax is None:
        raise ValueError("SmoothQuant+ needs the calibration statistics H and act_absmax")
    q, s, alpha, errs = _layer_search(W, stats.H, stats.act_absmax, cfg)
    q = dataclasses.replace(q, dtype=W.dtype)
    return LayerResult(ScaledQArray(q, s), info={"alpha": alpha, "loss": jnp.min(errs)})
