"""OmniQuant weight-only model walk: LWC trained block by block (arXiv 2308.13137 §3.1;
OpenGVLab/OmniQuant ``quantize/omniquant.py``).

Two streams of hidden states run through the model, as in the repo: ``fp`` (the full-precision
model; its block outputs are the targets) and ``quant`` (the already quantized blocks; its
hidden states are the inputs of the block being trained). For block ``i`` the logits
``γ̃, β̃`` of all seven linears are trained together with AdamW to minimise

    MSE(fp_block(fp_in), q_block(quant_in))   (+ MSE(fp_block(quant_in), q_block(quant_in))
                                               with ``aug_loss``),

then the block's weights become ``QArray``s of the learned clipping and its outputs on
``quant_in`` are the next block's ``quant_in``. The walk (calibration forward, resume from
``checkpoint_dir``, report, timing) is ``methods.walk.walk_blocks``; a resumed run recomputes
the fp stream through the full-precision blocks. LET (learnable equivalent transformation) is
not implemented here (weight-only).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness import capture, structure
from harness.model import Model, ModelConfig, get_param, set_param
from methods.base import Method, QuantizedModel, register
from methods.omniquant import core
from methods.omniquant.core import OmniQuantConfig, quantize_layer
from methods.walk import walk_blocks
from numerics.sparse import weight_bits

__all__ = ["OmniQuantConfig", "quantize_layer", "quantize_model", "train_block"]


def _fake_block(bp: Any, theta: dict[str, Any], cfg: OmniQuantConfig) -> Any:
    for n in theta:
        bp = set_param(bp, n, core.lwc_fake_quant(get_param(bp, n), theta[n], cfg))
    return bp


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train(model: Model, layer: int, cfg: OmniQuantConfig, bp, xq, y, y2):
    """``xq, y, y2`` [steps, bs, t, d] (whole, in-order sequences).
    Returns (theta, history, final loss)."""
    names = structure.block_linears(model.cfg.family)
    theta0 = {n: core.lwc_init(get_param(bp, n), cfg) for n in names}

    def loss(theta, batch):
        x, target, target2 = batch
        out = model.apply_block(_fake_block(bp, theta, cfg), layer, x)
        err = jnp.mean(jnp.square(out - target))
        if cfg.aug_loss:
            err = err + jnp.mean(jnp.square(out - target2))
        return err

    return core.fit(theta0, loss, (xq, y, y2), cfg)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model: Model, layer: int, bp, h):
    return model.apply_block(bp, layer, h)


def _outputs(model: Model, layer: int, bp, h, batch_size: int):
    return jnp.concatenate(
        [
            _forward(model, layer, bp, h[s : s + batch_size])
            for s in range(0, h.shape[0], batch_size)
        ],
        axis=0,
    )


def train_block(
    model: Model,
    i: int,
    bp,
    fp_in,
    quant_in,
    cfg: OmniQuantConfig,
    *,
    eval_batch: int = 8,
) -> tuple[Any, Any, dict[str, Any]]:
    """LWC for block ``i``: returns ``(quantized block, fp block outputs on fp_in, info)``."""
    rep = capture.shared_layer(model, i)
    y = _outputs(model, rep, bp, fp_in, eval_batch)
    y2 = _outputs(model, rep, bp, quant_in, eval_batch) if cfg.aug_loss else y
    n = quant_in.shape[0]
    bs = min(cfg.batch_size, n)
    steps = n // bs  # the repo's nsamples // batch_size (remainder dropped)

    def stack(a):
        return a[: steps * bs].reshape((steps, bs) + a.shape[1:])

    theta, history = _train(model, rep, cfg, bp, stack(quant_in), stack(y), stack(y2))
    bq = bp
    for name in theta:
        bq = set_param(bq, name, core.lwc_quantize(get_param(bp, name), theta[name], cfg))
    return bq, y, {"history": history, "theta": theta}


def _fp_stream(model: Model, params, tokens, upto: int, batch_size: int):
    """Full-precision hidden states entering block ``upto`` (for a resumed run)."""
    tokens = jnp.asarray(tokens)
    embed = jax.jit(model.embed)
    h = jnp.concatenate(
        [embed(params, tokens[s : s + batch_size]) for s in range(0, tokens.shape[0], batch_size)]
    )
    for j in range(upto):
        h = _outputs(model, capture.shared_layer(model, j), params["blocks"][j], h, batch_size)
    return h


def quantize_model(
    params,
    model_cfg: ModelConfig,
    calib_tokens,
    cfg: OmniQuantConfig,
    *,
    batch_size: int = 8,
    **walk: Any,
) -> QuantizedModel:
    """OmniQuant (LWC, weight-only) over every block; ``batch_size`` is the evaluation micro-batch
    (the training batch is ``cfg.batch_size``).

    ``walk`` goes to ``methods.walk.walk_blocks``: ``progress``, ``checkpoint_dir`` (save each
    finished block, resume after the last saved one), ``on_block_done(i)``."""
    model = Model(model_cfg)
    state: dict[str, Any] = {}

    def step(i, bp, calib):
        if "fp" not in state:  # block 0: both streams start at the embeddings
            state["fp"] = (
                calib.inputs if i == 0 else _fp_stream(model, params, calib_tokens, i, batch_size)
            )
        bq, y, info = train_block(
            model, i, bp, state["fp"], calib.inputs, cfg, eval_batch=batch_size
        )
        state["fp"] = y
        hist = np.asarray(info["history"])
        rows = []
        for name in structure.block_linears(model_cfg.family):  # the report's order
            theta = info["theta"][name]
            rows.append(
                {
                    "name": f"blocks.{i}.{name}",
                    "bits": weight_bits(get_param(bq, name)),
                    "loss_first_epoch": float(hist[0]),
                    "loss_last_epoch": float(hist[-1]),
                    "gamma_mean": float(jnp.mean(jax.nn.sigmoid(theta["gamma"]))),
                    "beta_mean": float(jnp.mean(jax.nn.sigmoid(theta["beta"]))),
                }
            )
        return bq, rows

    return walk_blocks(
        params,
        model_cfg,
        calib_tokens,
        step,
        run_parts=(repr(cfg), "methods.omniquant"),
        accumulators={},  # the block's inputs (calib.inputs) only, no statistics
        names=(),
        batch_size=batch_size,
        **walk,
    )


METHOD = register(
    Method(
        name="omniquant",
        config=OmniQuantConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2308.13137",
        needs=("X",),
        beats_rtn=True,
    )
)
