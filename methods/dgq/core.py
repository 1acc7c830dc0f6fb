"""DGQ — Dual Grained Quantization, W4A8 (Zhang et al., arXiv 2310.04836).

Weights (§3.1): asymmetric UINT4 groups (fine grain, g = 128) whose float group scales s' are
re-expressed as UINT8 integers S⁽²⁾ times one float16 scale s⁽¹⁾ per output channel (coarse
grain), and the codes are limited so that every S⁽²⁾·(q − z) is an INT8:

    W ≈ s⁽¹⁾ · S⁽²⁾ · (q − z),     x·Wᵀ = s_x · s⁽¹⁾ · (x_int8 · [S⁽²⁾(q − z)]_int8ᵀ)

so the int4 weights are widened to int8 once and the product with per-token INT8 activations is
one int8 GEMM with a per-token × per-channel epilogue (the layout ``numerics.scales.dgq_quantize``
builds with a ``channel_ratio``). The two scales are found by the paper's **two-phase grid
search** (§3.2), each phase minimising the layer's output error on calibration inputs:

* phase 1 — per (row, group): the clipping ratio r_g of the group's min-max range,
  r_g ∈ {1.02 − (i+1)·0.22/20}, minimising ‖(W_g − Ŵ_g) X_gᵀ‖² per row;
* phase 2 — per row, with the phase-1 s', z fixed: the ratio r_c of the per-channel INT8 range,
  s⁽¹⁾ = r_c·max|W_row|/127, r_c ∈ {1.02 − (i+1)·0.82/80}, minimising ‖(W − Ŵ) Xᵀ‖² per row.

Activations (§3.3): 8-bit, after the paper's **percentile clipping smoothing**: per input
channel s_j = max(1, m_j / m_(p)), m_j = max|X_j| over calibration and m_(p) the value ranked
⌊0.005·d + 1.5⌋-th from the top (the top ~0.5 % of channels are scaled down to it); x/s is
folded into the preceding RMSNorm (or linear) and W·diag(s) into the weights
(:func:`percentile_smoothing`; the fold is ``methods.dgq.quantize_model``'s).

Checked against the official repository ilur98/DGQ (``dgq/quant/quantizer_helper.py``
``searchquant`` with ``W4W8``, ``dgq/quant/smooth.py`` ``smooth_ln_fcs`` / ``smooth_llama_mlp``).

Details as in the reference: the two grids (20 ratios from 1.009 down to 0.80; 80 from 1.01 down
to 0.20), the per-row mean-squared output error as the objective of both phases, S⁽²⁾ ≥ 1, the
codes clamped to [max(z − ⌊127/S⁽²⁾⌋, 0), min(z + ⌊127/S⁽²⁾⌋, 15)], W clamped to ±127·s⁽¹⁾, the
0.5 % percentile baseline of the smoothing and smoothing down_proj's inputs through up_proj.

Differences, on purpose:
* phase 1 uses the exact per-group output error Δ_g H_gg Δ_gᵀ from the calibration Hessian
  H = 2XᵀX/n (every calibration token) instead of the reference's one captured sequence;
  phase 2 uses the first ``search_tokens`` rows of the calibration row sample (reduced cost);
* group ranges include 0 (the project's asymmetric INT convention) and S⁽²⁾ ≤ 255 (UINT8);
* activations: dynamic per-token INT8 by default (the reference's script uses static
  per-tensor scales; ``act_granularity="tensor"`` gives dynamic per-tensor);
* the reference's weight-based o_proj smoothing (``smooth_fc_weight``) is not done: with
  grouped-query attention v_proj has fewer rows than o_proj has inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, check_bits, check_groups, group_view
from numerics.config import rtn
from numerics.quantize import check_input, quantize
from numerics.scales import clip_groups, dgq_quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class DGQConfig:
    bits: int = 4  # weight bits of the fine-grained groups
    group_size: int = 128  # fine-grained group size
    ragged: bool = False  # a shorter last group when group_size does not divide in-features
    act_bits: int = 8  # activation bits (16: float)
    act_granularity: str = "token"  # "token" (dynamic per-token) | "tensor" (dynamic)
    group_grid: int = 20  # phase 1 ratios 1.02 − (i+1)·0.22/group_grid (reference: 20)
    channel_grid: int = 80  # phase 2 ratios 1.02 − (i+1)·0.82/channel_grid (reference: 80)
    search_tokens: int = 256  # calibration rows of the phase-2 output error
    smooth: bool = True  # percentile clipping smoothing of the activations (§3.3)
    smooth_top: float = 0.005  # fraction of channels above the smoothing baseline

    def __post_init__(self) -> None:
        check_bits(self.bits, (2, 3, 4), "DGQ")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"DGQ: group_size must be a positive int, got {self.group_size!r}")
        for f in ("group_grid", "channel_grid", "search_tokens"):
            if getattr(self, f) < 1:
                raise ValueError(f"DGQ: {f} must be ≥ 1, got {getattr(self, f)}")
        if not 0.0 <= self.smooth_top < 1.0:
            raise ValueError(f"DGQ: smooth_top must be in [0, 1), got {self.smooth_top}")
        self.act_config()

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.act_bits, granularity=self.act_granularity)


def group_ratios(n: int) -> Float[Array, " n"]:
    """Phase-1 grid ``1.02 − (i+1)·0.22/n`` (reference: n = 20, 1.009 … 0.80)."""
    return 1.02 - (jnp.arange(n, dtype=jnp.float32) + 1.0) / n * 0.22


def channel_ratios(n: int) -> Float[Array, " n"]:
    """Phase-2 grid ``1.02 − (i+1)·0.82/n`` (reference: n = 80, 1.01 … 0.20)."""
    return 1.02 - (jnp.arange(n, dtype=jnp.float32) + 1.0) / n * 0.82


def percentile_smoothing(m: Float[Array, " d"], top: float = 0.005) -> Float[Array, " d"]:
    """§3.3: ``s_j = max(1, m_j / m_(p))`` with ``m_(p)`` the ⌊top·d + 1.5⌋-th largest of the
    per-channel maxima ``m`` (only the outlier channels are scaled down); all ones when the
    baseline is below 1e-4 (a dead input), as the reference returns early."""
    m = jnp.asarray(m, jnp.float32)
    k = int(m.shape[0] * top + 1.5)
    base = jnp.sort(m)[-k]
    s = jnp.where(m > base, m / jnp.where(base > 0, base, 1.0), 1.0)
    return jnp.where(base < 1e-4, jnp.ones_like(s), s)


def phase1(W: Float[Array, "out in"], H: Float[Array, "in in"], cfg: DGQConfig) -> Array:
    """Per (row, group) clipping ratio minimising ``Δ_g H_gg Δ_gᵀ`` (the group's output error)."""
    how = rtn(cfg.bits, group_size=cfg.group_size, sym=False, ragged=cfg.ragged)
    d_in = W.shape[1]
    g = cfg.group_size
    ng = -(-d_in // g)
    Hp = jnp.pad(H.astype(jnp.float32), ((0, ng * g - d_in), (0, ng * g - d_in)))
    Hb = jnp.stack([Hp[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(ng)])
    Wg = group_view(W, g, ragged=cfg.ragged, who="DGQ")

    def err(r):
        Wq = quantize(clip_groups(W, r, how), how).dequantize(jnp.float32)
        D = Wg - group_view(Wq, g, ragged=cfg.ragged, who="DGQ")
        return jnp.einsum("okg,kgh,okh->ok", D, Hb, D)

    ratios = group_ratios(cfg.group_grid)
    errs = jax.lax.map(err, ratios)  # [grid, out, ng]
    return ratios[jnp.argmin(errs, axis=0)]


def phase2(
    W: Float[Array, "out in"], r_g: Array, X: Float[Array, "n in"], cfg: DGQConfig
) -> Float[Array, " out"]:
    """Per-row ratio of the INT8 channel range minimising ``‖(W − Ŵ) Xᵀ‖²`` (phase-1 fixed)."""
    Wf = W.astype(jnp.float32)
    Xf = X.astype(jnp.float32)

    def err(r):
        qa = dgq_quantize(
            W, bits=cfg.bits, group_size=cfg.group_size, ragged=cfg.ragged,
            group_ratio=r_g, channel_ratio=r,
        )  # fmt: skip
        D = Wf - qa.dequantize(jnp.float32)
        return jnp.sum(jnp.square(Xf @ D.T), axis=0)

    ratios = channel_ratios(cfg.channel_grid)
    errs = jax.lax.map(err, ratios)  # [grid, out]
    return ratios[jnp.argmin(errs, axis=0)]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _search(W, H, X, cfg: DGQConfig):
    r_g = phase1(W, H, cfg)
    r_c = phase2(W, r_g, X, cfg)
    qa = dgq_quantize(
        W, bits=cfg.bits, group_size=cfg.group_size, ragged=cfg.ragged,
        group_ratio=r_g, channel_ratio=r_c,
    )  # fmt: skip
    return qa, jnp.mean(r_g), jnp.mean(r_c)


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: DGQConfig, *, key=None
) -> LayerResult:
    """One linear: the two-phase search on its calibration inputs (``H``, ``X``); the result
    carries the per-token INT8 quantizer of its input."""
    del key
    check_input(W, "DGQ")
    if W.ndim != 2:
        raise ValueError(f"DGQ: expected a weight [out, in], got shape {W.shape}")
    check_groups(W.shape[1], cfg.group_size, ragged=cfg.ragged, who="DGQ")
    if stats.H is None or stats.X is None:
        raise ValueError("DGQ needs the calibration statistics H and X of the layer's inputs")
    X = stats.X[: cfg.search_tokens]
    qa, r_g, r_c = _search(W, stats.H, X, cfg)
    act = act_quantizer(cfg.act_config(), who="DGQ")
    return LayerResult(qa, info={"group_ratio": r_g, "channel_ratio": r_c}, act=act)
