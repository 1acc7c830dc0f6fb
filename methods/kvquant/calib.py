"""KVQuant's calibration set: every layer's keys and values on the calibration tokens, and the
Fisher information of each of their elements (arXiv 2401.18079 App. D).

As the reference's ``gradients/run-fisher.py`` does, the sensitivity of an element is the
squared gradient of the sequence's loss (the mean next-token cross-entropy, the Hugging Face
``labels=input_ids`` loss) w.r.t. that element of the ``k_proj`` / ``v_proj`` output, one per
calibration token and channel. Gradients w.r.t. activations come from one ``jax.grad`` per
sequence: the ``k_proj`` / ``v_proj`` weight leaves are wrapped in a :class:`Tap` that adds a
zero ``delta [1, t, C]`` to the projection's output through the ``Hooks.matmul`` seam, so
``∂loss/∂delta`` is ``∂loss/∂output``. The same pass returns the keys and values themselves
(the model's capture sites ``attn.k_pre_rope`` / ``attn.k`` / ``attn.v``, as
``harness.capture`` records them), so each Fisher weight sits beside its own element — the
registry's ``k_pre_rope_sample`` / ``v_sample`` keep a random subset of rows and could not be
matched with per-element gradients. Post-RoPE keys (the ablation) get the gradient rotated
with them: ``k_rot = R k`` with ``R`` orthogonal, so ``∂L/∂k_rot = R ∂L/∂k``.

The model is the full-precision one, as in the reference: quantizing the KV cache does not
change what the calibration sees (it runs without the simulated quantizers).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from harness.layers import Hooks, apply_rope, dense
from harness.model import Model, ModelConfig, default_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tap:
    """A weight ``w [out, in]`` whose product gets ``delta [b, t, out]`` added."""

    w: Array
    delta: Array


def _tap_matmul(name: str, x: Array, w: Any) -> Array:
    if isinstance(w, Tap):
        y = jnp.einsum("...i,oi->...o", x, w.w.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y + w.delta).astype(x.dtype)
    W = dense(w, x.dtype)
    return jnp.einsum("...i,oi->...o", x, W, preferred_element_type=jnp.float32).astype(x.dtype)


TAP_HOOKS = Hooks(matmul=_tap_matmul)
SIDES = ("k_proj", "v_proj")


def _with_taps(params: Any, deltas: list[dict[str, Array]]) -> Any:
    blocks = []
    for bp, d in zip(params["blocks"], deltas, strict=True):
        attn = dict(bp["attn"]) | {n: Tap(bp["attn"][n], d[n]) for n in SIDES}
        blocks.append(dict(bp) | {"attn": attn})
    return dict(params) | {"blocks": blocks}


def _pass(cfg: ModelConfig, pre_rope: bool, deltas, params, tokens):
    """Loss of one sequence ``tokens [1, t]`` and, as aux, each layer's keys and values."""
    model = Model(cfg, TAP_HOOKS)
    p = _with_taps(params, deltas)
    h = model.embed(p, tokens)
    acts = []
    for i in range(cfg.n_layers):
        h, ins = model.apply_block(p["blocks"][i], i, h, capture=True)
        acts.append((ins["attn.k_pre_rope" if pre_rope else "attn.k"], ins["attn.v"]))
    logits = model.head(p, h)[0, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[0, 1:, None].astype(jnp.int32), axis=1)[:, 0]
    return jnp.mean(nll), acts


@functools.lru_cache(maxsize=8)
def _grads_fn(cfg: ModelConfig, pre_rope: bool):
    def f(params, tokens):
        t = tokens.shape[1]
        C = cfg.n_kv_heads * cfg.head_dim
        zero = jnp.zeros((1, t, C), jnp.float32)
        deltas = [{"k_proj": zero, "v_proj": zero} for _ in range(cfg.n_layers)]
        grads, acts = jax.grad(lambda d: _pass(cfg, pre_rope, d, params, tokens), has_aux=True)(
            deltas
        )
        out = []
        for i, (g, (k, v)) in enumerate(zip(grads, acts, strict=True)):
            gk = g["k_proj"]
            if not pre_rope:  # the gradient w.r.t. the rotated keys: rotate it too
                shape = (1, t, cfg.n_kv_heads, cfg.head_dim)
                pos = default_positions(tokens)
                gk = apply_rope(gk.reshape(shape), pos, cfg.rope_inv_freq(i)).reshape(gk.shape)
            out.append((k[0], v[0], gk[0], g["v_proj"][0]))
        return out

    return jax.jit(f)


def kv_gradients(
    params: Any, cfg: ModelConfig, tokens: Int[Array, "1 t"], *, pre_rope: bool = True
) -> list[tuple[Array, Array, Array, Array]]:
    """Per layer ``(K, V, ∂L/∂K, ∂L/∂V)`` ``[t, kv·hd]`` of one sequence's mean loss ``L``."""
    return _grads_fn(cfg, pre_rope)(params, jnp.asarray(tokens))


@functools.lru_cache(maxsize=8)
def _acts_fn(cfg: ModelConfig, pre_rope: bool):
    def f(params, tokens):
        model = Model(cfg)
        h = model.embed(params, tokens)
        out = []
        for i in range(cfg.n_layers):
            h, ins = model.apply_block(params["blocks"][i], i, h, capture=True)
            out.append((ins["attn.k_pre_rope" if pre_rope else "attn.k"][0], ins["attn.v"][0]))
        return out

    return jax.jit(f)


def kv_calibration(
    params: Any,
    cfg: ModelConfig,
    calib_tokens: Int[Array, "n t"],
    *,
    pre_rope: bool = True,
    fisher: bool = True,
    sink: int = 0,
) -> list[dict[str, np.ndarray | None]]:
    """Per layer ``{"K", "V", "FK", "FV"}``: keys (pre- or post-RoPE) and values
    ``[n·(t − sink), kv·hd]`` and their Fisher information (``None`` without ``fisher``); the
    first ``sink`` tokens of every sequence are left out (§3.5)."""
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.size == 0:
        raise ValueError(
            "calib_tokens must be a non-empty integer array [n, t], got "
            f"{tokens.dtype}{tokens.shape}"
        )
    if tokens.shape[1] <= sink + 1:
        raise ValueError(
            f"calibration sequences of {tokens.shape[1]} tokens leave no rows after the {sink} "
            "sink token(s) (and fewer than 2 tokens give no loss)"
        )
    if fisher and cfg.qk_norm:
        raise ValueError(
            "KVQuant's Fisher taps the k_proj output; with qk_norm the cached keys come after a "
            "norm, so the gradient would be of the wrong activation: use fisher=False"
        )
    layers = _calibration_pass(params, cfg, tokens, pre_rope, fisher)
    cut = lambda a: _drop_sink(a, tokens.shape[1], sink)
    return [{"K": cut(d["K"]), "V": cut(d["V"]), "FK": cut(d["FK"]) if fisher else None,
             "FV": cut(d["FV"]) if fisher else None} for d in layers]  # fmt: skip


def _drop_sink(a: np.ndarray, t: int, sink: int) -> np.ndarray:
    return a.reshape(-1, t, a.shape[-1])[:, sink:].reshape(-1, a.shape[-1])


_LAST: list = []  # the last few passes: (params, tokens digest, cfg, pre_rope, fisher, layers)


def _calibration_pass(params, cfg, tokens, pre_rope: bool, fisher: bool) -> list[dict]:
    """All calibration rows (sink included) of every layer. The last passes are kept, so the
    settings of one table (bits, the ablations of the levels, outliers and sink) share one:
    the result is a function of these arguments alone."""
    digest = hashlib.sha1(np.asarray(tokens).tobytes()).hexdigest() + str(tokens.shape)
    for p, d, c, r, f, layers in _LAST:
        if p is params and (d, c, r) == (digest, cfg, pre_rope) and (f or not fisher):
            return layers
    fn = _grads_fn(cfg, pre_rope) if fisher else _acts_fn(cfg, pre_rope)
    parts = [fn(params, tokens[j : j + 1]) for j in range(tokens.shape[0])]
    layers = []
    for i in range(cfg.n_layers):
        cat = lambda a, i=i: np.concatenate([np.asarray(p[i][a]) for p in parts])
        sq = lambda a, cat=cat: np.square(cat(a)) if fisher else None
        layers.append({"K": cat(0), "V": cat(1), "FK": sq(2), "FV": sq(3)})
    _LAST[:] = [*_LAST[-1:], (params, digest, cfg, pre_rope, fisher, layers)]
    return layers
