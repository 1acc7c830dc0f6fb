"""SqueezeLLM's sensitivity: the Fisher information diagonal of every block linear.

arXiv 2306.07629 §4.1: the Hessian of the loss is approximated by the Fisher information
``F = (1/N) Σ_s g_s g_sᵀ`` over calibration samples, of which only the diagonal is used:
``F_ij = (1/N) Σ_s (∂ℓ_s/∂W_ij)²``. As kssteven418/SqueezeLLM-gradients ``run.py`` does, a
sample is one calibration sequence and ``ℓ_s`` its mean next-token cross-entropy (the
Hugging Face ``labels=input_ids`` loss); the gradients are squared per sequence, then averaged
(the repo sums; the scale does not change the weighted k-means).

Gradients come from ``jax.grad`` of ``harness.model.Model.forward``. ``batch_size`` sequences
are differentiated at once (``jax.vmap`` of the per-sequence gradient, so memory grows with it);
the result does not depend on it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from harness.layers import is_quantized
from harness.model import Model, ModelConfig, get_param, linear_names, set_param


def sequence_loss(
    params: Any, model_cfg: ModelConfig, tokens: Int[Array, " t"]
) -> Float[Array, ""]:
    """Mean next-token cross-entropy of one sequence (predicting tokens[1:] from tokens[:-1])."""
    logits = Model(model_cfg).forward(params, tokens[None, :])[0, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[1:, None].astype(jnp.int32), axis=1)[:, 0]
    return jnp.mean(nll)


def fisher_information(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Int[Array, "N t"],
    batch_size: int = 1,
) -> dict[str, Float[Array, "out in"]]:
    """``{"blocks.i.attn.q_proj": F, ...}``: per-weight mean over sequences of the squared
    gradient of the sequence's loss, for every block linear (float32, shape of the weight)."""
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.size == 0:
        raise ValueError(
            "calib_tokens must be a non-empty integer array [N, t], "
            f"got {tokens.dtype}{tokens.shape}"
        )
    if tokens.shape[1] < 2:
        raise ValueError("calibration sequences need at least 2 tokens (one prediction)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    names = linear_names(model_cfg)
    lin = {}
    for name in names:
        w = get_param(params, name)
        if is_quantized(w):
            raise TypeError(
                f"{name} is already quantized; the Fisher information needs float weights"
            )
        lin[name] = jnp.asarray(w, jnp.float32)

    def loss(lin_w, p, seq):
        for name, w in lin_w.items():
            p = set_param(p, name, w)
        return sequence_loss(p, model_cfg, seq)

    @jax.jit
    def accumulate(acc, lin_w, p, seqs):
        # the other params are an argument, not a closure: as constants XLA would fold them
        # (the embedding) into the program, at a great cost in compile time
        g = jax.vmap(jax.grad(loss), in_axes=(None, None, 0))(lin_w, p, seqs)
        return jax.tree.map(lambda a, gi: a + jnp.sum(jnp.square(gi), axis=0), acc, g)

    acc = jax.tree.map(jnp.zeros_like, lin)
    N = tokens.shape[0]
    for s in range(0, N, batch_size):
        acc = accumulate(acc, lin, params, tokens[s : s + batch_size])
    return {name: acc[name] / np.float32(N) for name in names}
