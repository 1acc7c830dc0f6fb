"""AWQ — activation-aware weight quantization: the pure core (no model knowledge).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
arXiv 2306.00978, §3.2. Checked against mit-han-lab/llm-awq (commit d6e797a),
``awq/quantize/auto_scale.py`` (``_search_module_scale``), ``auto_clip.py``
(``auto_clip_layer``) and ``quantizer.py`` (``pseudo_quantize_tensor``).

A few input channels of a linear carry much larger activations than the rest; scaling those
weight columns up before quantization (and the inputs down by the same factor) protects them.
With ``s_X`` the per-input-channel mean ``|x|`` of the calibration inputs (paper §3.2):

* ``s = s_X^α`` (clamped below at 1e-4), normalised ``s ← s / sqrt(max(s)·min(s))`` (repo);
* ``α* = argmin_α L(α)``, ``L(α) = ‖Q(W·diag(s))·(diag(s)⁻¹X) − WX‖²`` (paper eq. 5), with
  ``α ∈ {0, 1/n, …, (n−1)/n}``, ``n = 20`` (the repo's ``range(n_grid)``; α = 1 is not tried).
  α = 0 gives ``s = 1``: plain RTN, so the search can never do worse than RTN on ``L``.
  ``L`` is the mean squared error over all outputs (the repo's ``pow(2).mean()``);
* weight clipping (``auto_clip_layer``): per output channel and input group, the clip value
  ``m = max|w|·(1 − i/n_clip)``, ``i < max_shrink·n_clip`` (20 and 0.5: ten ratios
  1, 0.95, …, 0.55), minimising the group's partial output error
  ``mean_tokens (Σ_{k∈group} x_k (Q(clamp(w, −m, m))_k − w_k))²`` on ~512 sampled tokens.

Scales are rounded to float16 (the repo folds them into an fp16 model), so the searched loss
is exactly the loss of the weight returned. Which linears share a scale and where it is folded
(the preceding RMSNorm or the rows of the preceding linear) is the model walk's business
(``methods/awq/__init__.py``); here ``quantize_layer`` is AWQ for one linear on its own, and its
weight is a ``numerics.leaves.ScaledQArray`` — ``Q(W·diag(s))`` with ``s`` kept beside it, the
unfolded form (importable from here too).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from methods.base import (
    LayerResult,
    LayerStats,
    check_bits,
    check_group,
    check_groups,
    group_view,
    ungroup,
)
from numerics.config import QuantConfig, rtn
from numerics.leaves import ScaledQArray  # the leaf lives in numerics; re-exported here
from numerics.quantize import check_input, fake_quant, quantize

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQConfig:
    bits: int = 4  # weight bits (paper: INT4 / INT3)
    group_size: int | None = 128  # input-channel group per scale; None: per output channel
    sym: bool = False  # False: unsigned codes + zero point (repo default zero_point=True)
    n_grid: int = 20  # α ∈ {0, 1/n_grid, …, (n_grid − 1)/n_grid}
    clip: bool = True  # the weight-clipping search after scaling (repo: mse_range=True)
    clip_grid: int = 20  # clip ratios 1 − i/clip_grid …
    clip_max_shrink: float = 0.5  # … for i < clip_max_shrink·clip_grid
    clip_n_tokens: int = 512  # about this many input rows (evenly strided) for the clip search
    scale_dtype: str = "float16"  # storage dtype of the quantization scales
    propagate: str = "fp"  # model walk: next block sees "fp" outputs (repo) or "quantized" ones
    ragged: bool = False  # allow a shorter last group when group_size does not divide in-features

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4, 8) if self.sym else (1, 2, 3, 4, 8), "AWQ")
        check_group(self.group_size, "AWQ")
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ValueError(f"AWQ: n_grid must be a positive int, got {self.n_grid!r}")
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ValueError(f"AWQ: clip_grid must be a positive int, got {self.clip_grid!r}")
        if not 0.0 < self.clip_max_shrink < 1.0:
            raise ValueError(f"AWQ: clip_max_shrink must be in (0, 1), got {self.clip_max_shrink}")
        if not isinstance(self.clip_n_tokens, int) or self.clip_n_tokens < 1:
            raise ValueError(
                f"AWQ: clip_n_tokens must be a positive int, got {self.clip_n_tokens!r}"
            )
        if self.propagate not in ("fp", "quantized"):
            raise ValueError(f"AWQ: propagate must be 'fp' or 'quantized', got {self.propagate!r}")

    def quant_config(self) -> QuantConfig:
        return rtn(
            self.bits,
            group_size=self.group_size,
            sym=self.sym,
            scale_dtype=self.scale_dtype,
            ragged=self.ragged,
        )


def alpha_grid(n_grid: int) -> Float[Array, " n_grid"]:
    """The repo's grid ``α = i / n_grid`` for ``i in range(n_grid)``."""
    return jnp.asarray(np.arange(n_grid) / n_grid, jnp.float32)


def awq_scales(s_X: Float[Array, " d_in"], alpha: Float[Array, ""]) -> Float[Array, " d_in"]:
    """``s = s_X^α`` clamped at 1e-4, divided by ``sqrt(max(s)·min(s))``, rounded to float16."""
    s = jnp.maximum(jnp.power(s_X.astype(jnp.float32), alpha), 1e-4)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    return s.astype(jnp.float16).astype(jnp.float32)


def scaled_fake_quant(
    W: Float[Array, "out in"], s: Float[Array, " in"], qcfg: QuantConfig
) -> Float[Array, "out in"]:
    """``Q(W·diag(s))·diag(s)⁻¹`` in float32."""
    return fake_quant(W.astype(jnp.float32) * s[None, :], qcfg) / s[None, :]


def output_error(
    X: Float[Array, "n in"], W: Float[Array, "out in"], W_hat: Float[Array, "out in"]
) -> Float[Array, ""]:
    """``mean((X Ŵᵀ − X Wᵀ)²)`` over all tokens and outputs."""
    D = (W_hat - W).astype(jnp.float32)
    return jnp.mean(jnp.square(jnp.matmul(X.astype(jnp.float32), D.T, precision=_HI)))


def search_alpha(loss_of_s, s_X: Float[Array, " d_in"], n_grid: int):
    """Grid search of α (paper eq. 5): evaluates the traceable ``loss_of_s(s)`` at every α.

    Returns ``(s*, α*, losses[n_grid])``; ties go to the smallest α (the repo's strict ``<``)."""
    alphas = alpha_grid(n_grid)
    losses = jax.lax.map(lambda a: loss_of_s(awq_scales(s_X, a)), alphas)
    i = jnp.argmin(losses)
    return awq_scales(s_X, alphas[i]), alphas[i], losses


def clip_search(
    W: Float[Array, "out in"],
    X: Float[Array, "n in"],
    qcfg: QuantConfig,
    *,
    group_size: int | None,
    ragged: bool = False,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> Float[Array, "out n_groups"]:
    """Per (output channel, input group) clip value ``m`` minimising the group's partial output
    error ``mean_n (Σ_k x_nk (Q(clamp(w, −m, m))_k − w_k))²`` (repo ``auto_clip_layer``).
    A ragged last group is zero-padded in both ``W`` and ``X``: its range and error are exact."""
    out, _ = W.shape
    Wg = group_view(W, group_size, ragged=ragged, who="AWQ")
    Xg = group_view(X, group_size, ragged=ragged, who="AWQ")
    ng, g = Wg.shape[1:]
    amax = jnp.max(jnp.abs(Wg), axis=-1)  # [out, ng]
    qpad = qcfg.replace(ragged=False)  # the padded view has whole groups

    def err(m):
        Wc = jnp.clip(Wg, -m[..., None], m[..., None])
        D = fake_quant(Wc.reshape(out, ng * g), qpad).reshape(out, ng, g) - Wg
        e = jnp.einsum("ngk,ogk->ogn", Xg, D, precision=_HI)
        return jnp.mean(jnp.square(e), axis=-1)

    def body(i, carry):
        best_err, best_m = carry
        m = amax * (1.0 - i.astype(jnp.float32) / n_grid)
        e = err(m)
        better = e < best_err
        return jnp.where(better, e, best_err), jnp.where(better, m, best_m)

    init = (jnp.full(amax.shape, jnp.inf, jnp.float32), amax)
    _, m = jax.lax.fori_loop(0, int(max_shrink * n_grid), body, init)
    return m


def apply_clip(
    W: Float[Array, "out in"], m: Float[Array, "out n_groups"], group_size: int | None
) -> Float[Array, "out in"]:
    """``clamp(w, −m, m)`` per (output channel, input group of ``group_size``; the last group
    may be shorter)."""
    d_in = W.shape[1]
    Wg = group_view(W, group_size, ragged=True, who="AWQ")
    if Wg.shape[1] != m.shape[1]:
        raise ValueError(f"AWQ: {m.shape[1]} clip groups for {Wg.shape[1]} weight groups")
    return ungroup(jnp.clip(Wg, -m[..., None], m[..., None]), d_in).astype(W.dtype)


def clip_rows(X: Float[Array, "n in"], n_tokens: int) -> Float[Array, "k in"]:
    """Evenly strided rows ``X[0 :: n // n_tokens]`` (the repo's token sampling for clipping)."""
    return X[:: max(X.shape[0] // n_tokens, 1)]


def _check(W, stats: LayerStats, cfg: AWQConfig):
    check_input(W, "AWQ")
    if W.ndim != 2:
        raise ValueError(f"AWQ: W must be [out, in], got shape {tuple(W.shape)}")
    check_groups(W.shape[1], cfg.group_size, ragged=cfg.ragged, who="AWQ")
    if stats.X is None:
        raise ValueError("AWQ needs LayerStats.X (calibration input rows) for its output error")
    check_input(stats.X, "AWQ (LayerStats.X)")
    if stats.X.ndim != 2 or stats.X.shape[1] != W.shape[1]:
        raise ValueError(f"AWQ: X must be [n, {W.shape[1]}], got shape {tuple(stats.X.shape)}")


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: AWQConfig, *, key=None
) -> LayerResult:
    """AWQ on one linear: scale search on ``stats.X`` (``s_X`` = ``stats.act_absmean``, else
    ``mean|X|``), then the clipping search; the weight is a :class:`ScaledQArray`."""
    del key  # deterministic
    _check(W, stats, cfg)
    s_X = stats.act_absmean if stats.act_absmean is not None else jnp.mean(jnp.abs(stats.X), axis=0)
    Wq, s, alpha, losses = _awq_layer(W, stats.X, s_X, cfg)
    Wq = dataclasses.replace(Wq, dtype=W.dtype)  # dequantize() returns the input's dtype
    return LayerResult(
        ScaledQArray(Wq, s.astype(jnp.float16)),
        {"alpha": alpha, "loss": jnp.min(losses), "loss_rtn": losses[0], "losses": losses},
    )


@functools.partial(jax.jit, static_argnums=3)
def _awq_layer(W, X, s_X, cfg: AWQConfig):
    qcfg = cfg.quant_config()
    W = W.astype(jnp.float32)
    X = X.astype(jnp.float32)
    s, alpha, losses = search_alpha(
        lambda s: output_error(X, W, scaled_fake_quant(W, s, qcfg)), s_X, cfg.n_grid
    )
    Ws = W * s[None, :]
    if cfg.clip:
        Xs = clip_rows(X, cfg.clip_n_tokens) / s[None, :]
        m = clip_search(
            Ws,
            Xs,
            qcfg,
            group_size=cfg.group_size,
            ragged=cfg.ragged,
            n_grid=cfg.clip_grid,
            max_shrink=cfg.clip_max_shrink,
        )
        Ws = apply_clip(Ws, m, cfg.group_size)
    return quantize(Ws, qcfg), s, alpha, losses
