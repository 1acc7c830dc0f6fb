"""Stateless building blocks of the decoder, and THE SEAM through which every linear layer runs.

* :class:`Hooks` — a frozen, hashable bundle of optional callables that a method passes to the
  model to change its numerics without editing model code:

  - ``act_quant(name, x) -> x``: quantize the input activations of linear ``name`` before the
    matmul (per-token, per-tensor, ... as the method chooses);
  - ``matmul(name, x, w_leaf) -> y``: replace the matmul itself; receives the *raw* weight leaf
    (a float array or a quantized object, e.g. the numerics core's ``QArray``), so a Pallas
    kernel can consume packed codes directly;
  - ``kv_quant``: a ``harness.kvcache.KVQuant`` — how keys and values are stored in the cache
    (key / value codecs, the full-precision window and sink tokens, keys before or after RoPE).
    Scoring a window and decoding token by token (``harness.decode``) both read it.

* :func:`linear` — ``y = x @ W.T (+ b)`` with ``W`` stored ``[out, in]`` (the paper / GGUF
  convention). ``W`` may be a float array or *any* object with a ``.dequantize()`` method
  (a pytree of codes whose leaves need not have the weight's shape).

* RMSNorm, RoPE (half-split, Hugging Face / "NEOX" layout) and causal grouped-query attention
  with an optional sliding window.

Layer names passed to hooks are stable strings: ``blocks.3.attn.q_proj``,
``blocks.3.mlp.down_proj``, ``lm_head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


@dataclass(frozen=True, kw_only=True)
class Hooks:
    """Optional numerics overrides; hashable, so it can be a static argument of ``jax.jit``.

    Build one ``Hooks`` object and reuse it: functions hash by identity, a fresh lambda per call
    means a fresh compilation.
    """

    act_quant: Callable[[str, Array], Array] | None = None  # (name, x) -> x before the matmul
    matmul: Callable[[str, Array, Any], Array] | None = None  # (name, x, raw weight leaf) -> y
    kv_quant: Any = None  # harness.kvcache.KVQuant: the KV cache's codecs and windows


NO_HOOKS = Hooks()


def is_quantized(w: Any) -> bool:
    """True for a weight leaf that is a quantized object: every ``numerics.leaves.WeightLeaf``
    (``QArray``, ``DenseSparse``, ``ScaledQArray``, ``LUTWeight``: ``shape``, ``dtype``,
    ``dequantize()``, ``bits_per_weight()``), and any other object with ``.dequantize()`` — the
    seam needs nothing more, so a stand-in leaf runs too (only the bit count needs the rest)."""
    return hasattr(w, "dequantize") and not isinstance(w, jax.Array | np.ndarray)


def dense(w: Any, dtype: Any) -> Array:
    """The float value of a weight leaf: a float array as is, a quantized object dequantized."""
    if is_quantized(w):
        w = w.dequantize()
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"weight leaf has integer dtype {w.dtype}; store floats or an object with .dequantize()"
        )
    return w.astype(dtype)


def linear(
    x: Float[Array, "*batch d_in"],
    w: Any,
    b: Float[Array, " d_out"] | None = None,
    *,
    name: str,
    hooks: Hooks = NO_HOOKS,
) -> Float[Array, "*batch d_out"]:
    """The one seam of every linear layer: ``y = act_quant(x) @ W.T + b``.

    ``w`` is the raw leaf from the params pytree (``[d_out, d_in]`` floats, or an object with
    ``.dequantize()``). With ``hooks.matmul`` set, the product is delegated to it (it receives
    the raw leaf); otherwise the leaf is dequantized and multiplied in ``x.dtype`` with float32
    accumulation.
    """
    if hooks.act_quant is not None:
        x = hooks.act_quant(name, x)
    if hooks.matmul is not None:
        y = hooks.matmul(name, x, w)
    else:
        W = dense(w, x.dtype)
        if W.ndim != 2 or W.shape[1] != x.shape[-1]:
            raise ValueError(f"{name}: weight shape {W.shape} does not take inputs of {x.shape}")
        y = jnp.einsum("...i,oi->...o", x, W, preferred_element_type=jnp.float32).astype(x.dtype)
    if b is not None:
        b = jnp.asarray(b).astype(y.dtype)
        y = y + b.reshape((1,) * (y.ndim - 1) + b.shape)
    return y


def rms_norm(x: Float[Array, "*batch d"], scale: Float[Array, " d"], eps: float) -> Array:
    """RMSNorm (arXiv:1910.07467 eq. 4): ``x / sqrt(mean(x²) + eps) * scale``, in float32.

    ``scale`` is the *effective* multiplier. Gemma's ``(1 + w)`` form is not applied here: the
    GGUF converter already stores ``1 + w`` (see harness/gguf_loader.py).
    """
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))
    s = jnp.asarray(scale).astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (x.shape[-1],))
    return (x32 * inv * s).astype(x.dtype)


def rope_frequencies(
    head_dim: int,
    theta: float,
    *,
    scaling: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_len: int = 8192,
) -> np.ndarray:
    """RoPE inverse frequencies ``θ_i = theta^(-2i/d)``, ``i < d/2`` (RoFormer, arXiv:2104.09864
    eq. 15), float32 ``[head_dim // 2]``.

    ``scaling``: ``"none"``; ``"linear"`` (position interpolation, arXiv:2306.15595: θ / factor);
    ``"llama3"`` (Llama 3.1: wavelengths beyond ``original_max_len / low_freq_factor`` divided by
    ``factor``, those below ``original_max_len / high_freq_factor`` kept, a linear blend between).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling == "none":
        pass
    elif scaling == "linear":
        inv = inv / factor
    elif scaling == "llama3":
        wavelen = 2.0 * math.pi / inv
        long_wl = original_max_len / low_freq_factor
        short_wl = original_max_len / high_freq_factor
        blend = (original_max_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        mid = (1.0 - blend) * inv / factor + blend * inv
        inv = np.where(wavelen > long_wl, inv / factor, np.where(wavelen < short_wl, inv, mid))
    else:
        raise ValueError(f"unknown RoPE scaling {scaling!r}; use 'none', 'linear' or 'llama3'")
    return inv.astype(np.float32)


def apply_rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], inv_freq: np.ndarray
) -> Float[Array, "b t h d"]:
    """Rotate ``x`` by RoPE in the half-split layout: dimension ``i`` pairs with ``i + d/2``.

    This is the Hugging Face layout ("NEOX" in llama.cpp). LLaMA-architecture GGUF files store
    Q/K rows permuted for llama.cpp's interleaved pairs (0,1),(2,3)…; the GGUF loader permutes
    them back, so one RoPE serves every family.
    """
    half = x.shape[-1] // 2
    ang = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


QUERY_CHUNK = 128  # queries per chunk of the in-order path; 128 measured fastest on CPU at T=2048


def causal_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    positions: Int[Array, "b t"] | None,
    *,
    scale: float,
    window: int | None = None,
    query_chunk: int = QUERY_CHUNK,
) -> Float[Array, "b t h d"]:
    """Softmax attention (arXiv:1706.03762 eq. 1) with grouped-query heads (arXiv:2305.13245).

    Query head ``j`` reads key/value head ``j // (h / kv)``. Token ``t`` sees token ``s`` iff
    ``pos_s <= pos_t`` and, with a sliding ``window``, ``pos_t - pos_s < window`` (the Mistral /
    Gemma / llama.cpp "standard" SWA convention). Scores and softmax in float32.

    ``positions=None`` means the tokens are in order (``pos_t = t``, every caller's case). Then
    the queries run in chunks of ``query_chunk``, and each chunk reads only the keys it can see
    (``[t0 - window + 1, t0 + chunk)``): half the T×T work is skipped, and each chunk's scores
    stay small enough for the CPU caches (4.8× faster than the full masked product at T = 2048,
    ``scripts/bench_eval.py``); on CPU a batch runs one sequence after another for the same
    reason.
    With explicit ``positions`` the full ``[T, S]`` scores are masked.
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    if H % KV:
        raise ValueError(f"{H} query heads do not divide into {KV} key/value heads")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    G = H // KV
    # Head-major once: q [B, KV, G, T, D], k / v [B, KV, S, D].
    qh = jnp.transpose(q.reshape(B, T, KV, G, D), (0, 2, 3, 1, 4))
    kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))

    def attend(qc, kc, vc, allowed, b=""):  # b="b": with the batch axis in front
        f32 = jnp.float32
        s = jnp.einsum(f"{b}kgtd,{b}ksd->{b}kgts", qc, kc, preferred_element_type=f32)
        s = jnp.where(allowed, s * f32(scale), f32(-1e30))
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum(f"{b}kgts,{b}ksd->{b}kgtd", p, vc, preferred_element_type=f32)

    if positions is not None:
        pq, pk = positions[:, :, None], positions[:, None, :]
        allowed = pk <= pq
        if window is not None:
            allowed = allowed & (pq - pk < window)
        o = attend(qh, kh, vh, allowed[:, None, None], "b")
        return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, D).astype(q.dtype)

    if k.shape[1] != T:
        raise ValueError(
            f"in-order attention needs as many keys as queries, got {k.shape[1]} vs {T}"
        )

    def one_sequence(qkv):  # [KV, G, T, D], [KV, T, D], [KV, T, D]
        qs, ks, vs = qkv
        outs = []
        for t0 in range(0, T, query_chunk):
            t1 = min(t0 + query_chunk, T)
            s0 = 0 if window is None else max(0, t0 - window + 1)
            pq, pk = np.arange(t0, t1)[:, None], np.arange(s0, t1)[None, :]
            allowed = pk <= pq if window is None else (pk <= pq) & (pq - pk < window)
            outs.append(attend(qs[:, :, t0:t1], ks[:, s0:t1], vs[:, s0:t1], allowed))
        return jnp.concatenate(outs, axis=2)

    # On CPU one sequence at a time: a batch's chunk scores together would spill out of the
    # caches again (8 × 2048 calibration batches: 1.6× slower than this loop). Accelerators
    # take the whole batch at once.
    if B == 1:
        o = one_sequence((qh[0], kh[0], vh[0]))[None]
    elif jax.default_backend() == "cpu":
        o = jax.lax.map(one_sequence, (qh, kh, vh))
    else:
        o = jax.vmap(one_sequence)((qh, kh, vh))
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, D).astype(q.dtype)


def glu_activation(kind: str) -> Callable[[Array], Array]:
    """Gate nonlinearity of the gated MLP (arXiv:2002.05202): SwiGLU (``silu``) or GeGLU with
    the tanh approximation of GELU (``gelu_tanh``, Gemma)."""
    if kind == "silu":
        return jax.nn.silu
    if kind == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown MLP activation {kind!r}; use 'silu' or 'gelu_tanh'")
