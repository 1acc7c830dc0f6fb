"""OmniQuant, weight-only: learnable weight clipping (LWC) — the pure core.

Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language Models",
arXiv 2308.13137, §3.2 eq. (2). Checked against OpenGVLab/OmniQuant (commit 95fae1b),
``quantize/quantizer.py`` (``UniformAffineQuantizer`` with ``lwc=True``) and
``quantize/omniquant.py`` (the block-wise training loop), ``main.py`` defaults and
``scripts/Llama-2/*/w{2,3,4}a16*.sh``.

Per group of ``W[out, in]`` (groups of ``group_size`` along the input axis), eq. (2):

    h = (γ·max(W) − β·min(W)) / (2^N − 1),   z = −⌊β·min(W) / h⌉,
    W_q = clamp(⌊W / h⌉ + z, 0, 2^N − 1),    Ŵ = (W_q − z)·h,

with clipping strengths ``γ = σ(γ̃)``, ``β = σ(β̃)`` ∈ (0, 1) learned through their logits
``γ̃, β̃`` (initialised to 4.0 as the repo: σ(4) ≈ 0.982, i.e. start just inside min-max).
Rounding of ``W / h`` uses the straight-through estimator (``round_ste``); the zero point
gets no gradient (the repo rounds it with a plain ``round``), and ``h`` is clamped to
[1e-5, 1e4] (repo ``CLIPMIN``). Two choices of ours, both so that the trained fake
quantizer is exactly the stored ``QArray``: ``h`` is rounded to the scale storage dtype
(float16, with a straight-through gradient) and ``z`` is clamped into ``[0, 2^N − 1]`` (the
repo clamps it only to ±1e4; it leaves the range only for groups that do not contain 0).
Symmetric mode (not the paper's weight-only setting): ``h = max(γ·max, −β·min) / (2^(N−1) − 1)``
on signed codes.

Training (``fit``): AdamW (optax) on the logits, the repo's ``lwc_lr = 1e-2``,
``wd = 0``, ``epochs = 20`` for W3/W4 (its W2 scripts: 40 epochs plus ``aug_loss``), batches
of one calibration sequence, in order, no shuffling. ``quantize_layer`` is LWC on a single
linear with ``mean ‖X Ŵᵀ − X Wᵀ‖²`` on the calibration rows as the objective; the block-wise
objective (the repo's) lives in the model walk (``methods/omniquant/__init__.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from methods.base import LayerResult, LayerStats, check_bits, check_group, group_view, ungroup
from numerics.config import np_scale_dtype
from numerics.formats import IntFormat
from numerics.qarray import QArray
from numerics.quantize import check_input

CLIPMIN, CLIPMAX = 1e-5, 1e4  # the repo's clamp of the step h
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class OmniQuantConfig:
    bits: int = 4  # weight bits N (paper: W4/W3/W2 A16)
    group_size: int | None = 128  # input-channel group; None: per output channel
    sym: bool = False  # False: unsigned codes + zero point (the paper's weight-only setting)
    epochs: int = 20  # passes over the calibration set per block (repo W2 scripts: 40)
    lr: float = 1e-2  # AdamW learning rate of the LWC logits (repo lwc_lr)
    weight_decay: float = 0.0  # AdamW weight decay (repo wd)
    batch_size: int = 1  # calibration sequences per step (repo batch_size)
    init_logit: float = 4.0  # γ̃ = β̃ at start; σ(4) ≈ 0.982 (repo init_value)
    aug_loss: bool = False  # also match the fp block on the quantized inputs (repo W2 scripts)
    layer_batch_rows: int = 256  # quantize_layer: calibration rows per step …
    layer_steps: int = 128  # … and steps per epoch (the repo's 128 samples at batch size 1)
    scale_dtype: str = "float16"  # storage dtype of the steps h
    ragged: bool = False  # allow a shorter last group when group_size does not divide in-features

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4, 8), "OmniQuant")
        check_group(self.group_size, "OmniQuant")
        for f in ("epochs", "batch_size", "layer_batch_rows", "layer_steps"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"OmniQuant: {f} must be a positive int, got {v!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                "OmniQuant: lr must be > 0 and weight_decay >= 0, "
                f"got lr={self.lr}, weight_decay={self.weight_decay}"
            )

    @property
    def fmt(self) -> IntFormat:
        return IntFormat(bits=self.bits, signed=self.sym)


def _ste(x: Array, y: Array) -> Array:
    """Forward ``y``, gradient of ``x``."""
    return x + jax.lax.stop_gradient(y - x)


def _blocks(W: Float[Array, "out in"], cfg: OmniQuantConfig) -> Float[Array, "out ng g"]:
    """Groups of ``W``; a ragged last group is padded with copies of the last column, so its
    min and max — all that eq. (2) reads — are its own."""
    return group_view(W, cfg.group_size, ragged=cfg.ragged, who="OmniQuant", pad="edge")


def lwc_init(W: Float[Array, "out in"], cfg: OmniQuantConfig) -> dict[str, Array]:
    """Logits ``{"gamma": γ̃, "beta": β̃}`` of shape [out, n_groups], all ``cfg.init_logit``."""
    out, ng, _ = _blocks(W, cfg).shape
    full = jnp.full((out, ng), cfg.init_logit, jnp.float32)
    return {"gamma": full, "beta": full}


def lwc_step(W: Float[Array, "out in"], theta: dict[str, Array], cfg: OmniQuantConfig):
    """Per-group step ``h`` and zero point ``z`` (None when symmetric), eq. (2), each [out, ng]."""
    Wb = _blocks(W, cfg)
    hi = jax.nn.sigmoid(theta["gamma"]) * jnp.max(Wb, axis=-1)
    lo = jax.nn.sigmoid(theta["beta"]) * jnp.min(Wb, axis=-1)
    fmt = cfg.fmt
    h = (jnp.maximum(hi, -lo) / fmt.qmax) if cfg.sym else (hi - lo) / (fmt.qmax - fmt.qmin)
    h = jnp.clip(h, CLIPMIN, CLIPMAX)
    h = _ste(h, h.astype(np_scale_dtype(cfg.scale_dtype)).astype(jnp.float32))
    if cfg.sym:
        return h, None
    z = jnp.clip(jnp.round(jax.lax.stop_gradient(-lo / h)), fmt.qmin, fmt.qmax)
    return h, z


def lwc_fake_quant(
    W: Float[Array, "out in"], theta: dict[str, Array], cfg: OmniQuantConfig
) -> Float[Array, "out in"]:
    """``Ŵ`` of eq. (2) with straight-through rounding: differentiable in ``theta``."""
    Wb = _blocks(W, cfg)
    h, z = lwc_step(W, theta, cfg)
    y = Wb / h[..., None]
    q = _ste(y, jnp.round(y))
    fmt = cfg.fmt
    if z is None:
        return ungroup(jnp.clip(q, fmt.qmin, fmt.qmax) * h[..., None], W.shape[1])
    q = jnp.clip(q + z[..., None], fmt.qmin, fmt.qmax)
    return ungroup((q - z[..., None]) * h[..., None], W.shape[1])


def lwc_quantize(
    W: Float[Array, "out in"], theta: dict[str, Array], cfg: OmniQuantConfig
) -> QArray:
    """The stored ``QArray`` of the learned clipping: ``dequantize()`` equals ``lwc_fake_quant``."""
    Wb = _blocks(W, cfg)
    h, z = lwc_step(W, theta, cfg)
    fmt = cfg.fmt
    q = jnp.round(Wb / h[..., None]) + (0.0 if z is None else z[..., None])
    codes = ungroup(fmt.encode(q), W.shape[1])
    return QArray(
        codes=codes,
        scale=h.astype(np_scale_dtype(cfg.scale_dtype)),
        zero=z,
        format=fmt,
        block_shape=(1, Wb.shape[-1]),
        shape=tuple(W.shape),
        dtype=W.dtype,
    )


def fit(
    theta: Any, loss_fn: Callable[[Any, Any], Array], batches: Any, cfg: OmniQuantConfig
) -> tuple[Any, Float[Array, " epochs"]]:
    """AdamW on ``loss_fn(theta, batch)`` over ``batches`` (a pytree with a leading steps axis),
    ``cfg.epochs`` passes in order. Returns the trained ``theta`` and the mean loss of each epoch
    (the repo's logged ``loss_mean``: losses at the parameters before each step). Traceable."""
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    grad = jax.value_and_grad(loss_fn)

    def step(carry, batch):
        th, st = carry
        loss, g = grad(th, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
            upd, st = opt.update(g, st, th)
        return (optax.apply_updates(th, upd), st), loss

    def epoch(carry, _):
        carry, losses = jax.lax.scan(step, carry, batches)
        return carry, jnp.mean(losses)

    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(theta)
    (theta, _), history = jax.lax.scan(epoch, (theta, state), None, length=cfg.epochs)
    return theta, history


def output_error(X: Float[Array, "n in"], W: Array, W_hat: Array) -> Float[Array, ""]:
    """``mean((X Ŵᵀ − X Wᵀ)²)``."""
    return jnp.mean(jnp.square(jnp.matmul(X, (W_hat - W).T, precision=_HI)))


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: OmniQuantConfig, *, key=None
) -> LayerResult:
    """LWC on one linear: ``γ̃, β̃`` trained on ``mean ‖X Ŵᵀ − X Wᵀ‖²`` over ``stats.X``:
    ``cfg.epochs`` epochs of ``cfg.layer_steps`` steps, each on the next ``cfg.layer_batch_rows``
    rows of ``X`` taken cyclically (deterministic)."""
    del key  # deterministic
    check_input(W, "OmniQuant")
    if W.ndim != 2:
        raise ValueError(f"OmniQuant: W must be [out, in], got shape {tuple(W.shape)}")
    _blocks(W, cfg)  # validates the grouping
    if stats.X is None:
        raise ValueError("OmniQuant needs LayerStats.X (calibration input rows) for its objective")
    check_input(stats.X, "OmniQuant (LayerStats.X)")
    if stats.X.ndim != 2 or stats.X.shape[1] != W.shape[1]:
        raise ValueError(
            f"OmniQuant: X must be [n, {W.shape[1]}], got shape {tuple(stats.X.shape)}"
        )
    qa, history, start, end = _lwc_layer(W, stats.X, cfg)
    return LayerResult(qa, {"loss_start": start, "loss": end, "history": history})


@functools.partial(jax.jit, static_argnums=2)
def _lwc_layer(W, X, cfg: OmniQuantConfig):
    W32, X = W.astype(jnp.float32), X.astype(jnp.float32)
    rows = min(cfg.layer_batch_rows, X.shape[0])
    idx = (jnp.arange(cfg.layer_steps * rows) % X.shape[0]).reshape(cfg.layer_steps, rows)
    batches = X[idx]
    theta0 = lwc_init(W32, cfg)

    def loss(th, Xb):
        return output_error(Xb, W32, lwc_fake_quant(W32, th, cfg))

    theta, history = fit(theta0, loss, batches, cfg)
    qa = lwc_quantize(W, theta, cfg)
    return qa, history, loss(theta0, X), output_error(X, W32, qa.dequantize(jnp.float32))
