"""One decoder for the LLaMA family (SmolLM2, LLaMA, Mistral, Qwen2) and Gemma 3.

The families differ only by :class:`ModelConfig` fields:

===========================  =====================  ==========================================
field                        SmolLM2 / LLaMA        Gemma 3
===========================  =====================  ==========================================
``mlp_activation``           ``silu`` (SwiGLU)      ``gelu_tanh`` (GeGLU, tanh-approx GELU)
``qk_norm``                  False                  True (RMSNorm over head_dim on q and k)
``post_norms``               False                  True (RMSNorm on attn / MLP outputs)
``embed_scale``              False                  True (embeddings × √d_model)
``layer_types``              all global             5 local (window 512, RoPE 1e4) : 1 global (1e6)
``query_scale``              head_dim^-½            head_dim^-½ (query_pre_attn_scalar^-½)
===========================  =====================  ==========================================

Layout and conventions
----------------------
* Params are a plain pytree::

      {"embed": [V, d], "final_norm": [d], ("lm_head": [V, d] when untied),
       "blocks": [ {"attn_norm", "mlp_norm", ("attn_post_norm", "mlp_post_norm"),
                    "attn": {"q_proj", "k_proj", "v_proj", "o_proj", ("q_norm", "k_norm"),
                             ("q_proj_bias", "k_proj_bias", "v_proj_bias")},
                    "mlp": {"gate_proj", "up_proj", "down_proj"}}, ... ]}

  Linear weights are ``W [out, in]`` and ``y = x @ W.T``. The dotted layer name
  ``blocks.3.attn.q_proj`` is the path of its leaf (:func:`get_param` / :func:`set_param`).
* Any weight leaf may be replaced by an object with ``.dequantize()`` (e.g. the numerics core's
  ``QArray``) or by fake-quantized floats; the blocks read weights with ``Module.variable``, not
  ``Module.param``, so flax's shape check never sees the (packed) codes. All products go through
  :func:`harness.layers.linear` — the seam for :class:`harness.layers.Hooks`.
* Norm weights are the effective multipliers (Gemma's ``1 + w`` already folded in).
* Blocks are flax linen modules; the embedding and head are plain functions. :class:`Model`
  bundles ``embed / block / head / forward`` for layer-by-layer use (calibration).
* Precision: float32 matmuls use XLA's default precision, which is TF32 on recent NVIDIA GPUs;
  wrap calls in ``jax.default_matmul_precision("highest")`` for exact float32 there. Norms,
  RoPE, attention scores and softmax always run in float32; matmuls accumulate in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from harness import kvcache
from harness.layers import (
    NO_HOOKS,
    Hooks,
    apply_rope,
    causal_attention,
    dense,
    glu_activation,
    is_quantized,
    linear,
    rms_norm,
    rope_frequencies,
)
from harness.structure import (  # the adapter table lives there; re-exported for old imports
    ADAPTERS,
    BLOCK_LINEARS,
    KV_SITES,
    OUTPUT_SITE,
    LinearGroup,
    get_param,
    linear_names,
    maybe_param,
    set_param,
)

__all__ = [
    "ADAPTERS",
    "BLOCK_LINEARS",
    "KV_SITES",
    "MLP",
    "OUTPUT_SITE",
    "Attention",
    "Block",
    "LinearGroup",
    "Model",
    "ModelConfig",
    "cast_params",
    "default_positions",
    "get_param",
    "init_params",
    "linear_names",
    "param_shapes",
    "set_param",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_FAMILIES = tuple(ADAPTERS)  # a family is a model whose blocks have an adapter table


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of a decoder; every architectural difference is a field here."""

    family: str = "llama"  # "llama" (LLaMA/Mistral/Qwen2/SmolLM2) | "gemma3": ADAPTERS key
    vocab_size: int  # V, rows of the embedding
    d_model: int  # residual width d
    n_layers: int  # number of decoder blocks
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention when < n_heads)
    head_dim: int  # per-head width (Gemma 3: 256, not d_model / n_heads)
    d_ff: int  # hidden width of the gated MLP
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base of global layers
    rope_local_theta: float | None = None  # RoPE base of local layers (Gemma 3: 1e4); None: same
    rope_scaling: str = "none"  # "none" | "linear" | "llama3", applied to global-layer RoPE
    rope_factor: float = 1.0  # scaling factor of "linear" / "llama3"
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_len: int = 8192  # "llama3" only: pre-training context length
    sliding_window: int | None = None  # attention window of "local" layers
    layer_types: tuple[str, ...] = ()  # per block "global" | "local"; () means all global
    mlp_activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Gemma 3)
    post_norms: bool = False  # RMSNorm on attention and MLP outputs before the residual (Gemma)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
    tie_embeddings: bool = True  # lm_head is the embedding matrix
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2)
    query_scale: float | None = None  # attention logit scale; None: head_dim ** -0.5
    final_logit_softcap: float | None = None  # logits = c·tanh(logits / c) when set
    max_seq_len: int = 2048  # trained context length (informational)
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.family not in _FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {_FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}")
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise ValueError(f"unknown rope_scaling {self.rope_scaling!r}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries, n_layers={self.n_layers}"
                )
            bad = set(self.layer_types) - {"global", "local"}
            if bad:
                raise ValueError(f"layer_types entries must be 'global' or 'local', got {bad}")
            if "local" in self.layer_types and not self.sliding_window:
                raise ValueError("'local' layers need a positive sliding_window")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "global"

    def window(self, i: int) -> int | None:
        """Sliding-window size of block ``i`` (None for global attention)."""
        return self.sliding_window if self.layer_type(i) == "local" else None

    def rope_inv_freq(self, i: int) -> np.ndarray:
        """RoPE inverse frequencies of block ``i``: local layers use ``rope_local_theta``
        unscaled (Gemma 3), when it is set; otherwise the (scaled) global frequencies."""
        if self.layer_type(i) == "local" and self.rope_local_theta is not None:
            return rope_frequencies(self.head_dim, self.rope_local_theta)
        return rope_frequencies(
            self.head_dim,
            self.rope_theta,
            scaling=self.rope_scaling,
            factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_len=self.rope_original_max_len,
        )

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5


def cast_params(params: Any, dtype: Any) -> Any:
    """Cast float leaves to ``dtype``; quantized leaves (with ``.dequantize()``) are kept."""

    def f(x):
        if is_quantized(x):
            return x
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(f, params, is_leaf=is_quantized)


# --------------------------------------------------------------------------------------------
# Flax modules of one block.


def _normal(std: float):
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def _ones(key, shape):
    del key
    return jnp.ones(shape, jnp.float32)


def _zeros(key, shape):
    del key
    return jnp.zeros(shape, jnp.float32)


class _Seamed(nn.Module):
    """Shared helpers: weights read with ``variable`` (no shape check), linears via the seam."""

    cfg: ModelConfig
    layer: int
    hooks: Hooks = NO_HOOKS
    prefix: str = ""

    def _w(self, pname, shape, init):
        return self.variable("params", pname, lambda: init(self.make_rng("params"), shape)).value

    def _norm(self, pname, x):
        return rms_norm(x, self._w(pname, (x.shape[-1],), _ones), self.cfg.norm_eps)

    def _lin(self, pname, x, d_out, *, bias=False):
        w = self._w(pname, (d_out, x.shape[-1]), _normal(x.shape[-1] ** -0.5))
        b = self._w(pname + "_bias", (d_out,), _zeros) if bias else None
        self.sow("linear_inputs", pname, x)  # recorded (before act_quant) only when capturing
        return linear(x, w, b, name=f"blocks.{self.layer}.{self.prefix}{pname}", hooks=self.hooks)


class Attention(_Seamed):
    def _sow_kv(self, site: str, a: Array) -> None:
        """Record keys / values ``[b, t, kv, hd]`` as ``[b, t, kv·hd]`` when capturing."""
        self.sow("linear_inputs", site, a.reshape(*a.shape[:2], -1))

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b t d"],
        positions: Int[Array, "b t"] | None,
        mix: Array | None = None,
        cache: dict | None = None,
    ):
        """``positions=None``: tokens in order (``pos_t = t``), the fast attention path.
        ``mix``: the heads' attention output (o_proj's input) computed earlier with the same
        q/k/v weights — then only o_proj runs (calibration reuses it; see ``apply_block``).
        ``cache``: decoding (``harness.decode``), ``{"layer": this layer's cache, "position":
        p}``. ``p=None``: the ``t`` tokens are the prompt, written into the empty cache;
        otherwise one token at position ``p`` (traced int32). Returns ``(output, cache)``."""
        c, hk = self.cfg, self.hooks
        B, T, _ = x.shape
        if mix is not None:
            return self._lin("o_proj", mix, c.d_model)
        q = self._lin("q_proj", x, c.n_heads * c.head_dim, bias=c.attn_bias)
        k = self._lin("k_proj", x, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        v = self._lin("v_proj", x, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        q = q.reshape(B, T, c.n_heads, c.head_dim)
        k = k.reshape(B, T, c.n_kv_heads, c.head_dim)
        v = v.reshape(B, T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q = self._norm("q_norm", q)
            k = self._norm("k_norm", k)
        self._sow_kv("k_pre_rope", k)  # the capture sites (harness.stats), before kv_quant
        self._sow_kv("v", v)
        kvq = kvcache.FULL if hk.kv_quant is None else kvcache.check_kv_quant(hk.kv_quant)
        inv_freq = c.rope_inv_freq(self.layer)
        rope = lambda a, pos: apply_rope(a, pos, inv_freq)
        window = c.window(self.layer)
        L = None if cache is None else cache["position"]  # None: no step (scoring / prompt)
        if L is not None:  # one decoding step
            rope_pos = jnp.broadcast_to(L, (B, 1)).astype(jnp.int32)
        else:
            rope_pos = default_positions(x) if positions is None else positions
        k_rot = rope(k, rope_pos)
        q = rope(q, rope_pos)
        self._sow_kv("k", k_rot)
        k_src = k if kvq.pre_rope else k_rot  # what the key codec stores
        if L is not None:
            layer_cache = kvcache.write_token(kvq, self.layer, cache["layer"], k_src, v, L)
            o = kvcache.cached_attention(kvq, self.layer, layer_cache, q, L + 1, rope=rope,
                                         scale=c.scale, window=window)  # fmt: skip
            return self._lin("o_proj", o.reshape(B, T, -1), c.d_model), layer_cache
        if hk.kv_quant is None:
            o = causal_attention(q, k_rot, v, positions, scale=c.scale, window=window)
        else:
            k_hat, v_hat = kvq.key.fake(self.layer, k_src), kvq.value.fake(self.layer, v)
            if kvq.pre_rope:
                k_hat = rope(k_hat, rope_pos)
            if kvq.all_quantized:
                o = causal_attention(q, k_hat, v_hat, positions, scale=c.scale, window=window)
            else:
                if positions is not None:
                    raise ValueError(
                        "a KV cache with a full-precision window or sink tokens is scored "
                        "in order (positions=None)"
                    )
                o = kvcache.mixed_attention(
                    q, k_rot, k_hat, v, v_hat, kvq, scale=c.scale, window=window
                )
        out = self._lin("o_proj", o.reshape(B, T, c.n_heads * c.head_dim), c.d_model)
        if cache is None:
            return out
        return out, kvcache.write_prompt(kvq, self.layer, cache["layer"], k_src, v)


class MLP(_Seamed):
    @nn.compact
    def __call__(self, x: Float[Array, "b t d"], down_in: Array | None = None) -> Array:
        """``down_in``: down_proj's input computed earlier with the same gate/up weights — then
        only down_proj runs (calibration reuses it; see ``apply_block``)."""
        c = self.cfg
        if down_in is not None:
            return self._lin("down_proj", down_in, c.d_model)
        act = glu_activation(c.mlp_activation)
        g = self._lin("gate_proj", x, c.d_ff)
        u = self._lin("up_proj", x, c.d_ff)
        return self._lin("down_proj", act(g) * u, c.d_model)


class Block(_Seamed):
    """Pre-norm residual block; with ``post_norms`` the Gemma sandwich
    ``h + post_norm(f(pre_norm(h)))``."""

    @nn.compact
    def __call__(
        self,
        h: Float[Array, "b t d"],
        positions: Int[Array, "b t"] | None,
        mix: Array | None = None,
        down_in: Array | None = None,
        cache: dict | None = None,
    ):
        """``cache``: decoding (see :class:`Attention`); returns ``(h, layer cache)`` then."""
        c = self.cfg
        a = Attention(c, self.layer, self.hooks, "attn.", name="attn")(
            self._norm("attn_norm", h), positions, mix, cache
        )
        if cache is not None:
            a, new_cache = a
        if c.post_norms:
            a = self._norm("attn_post_norm", a)
        h = h + a
        m = MLP(c, self.layer, self.hooks, "mlp.", name="mlp")(self._norm("mlp_norm", h), down_in)
        if c.post_norms:
            m = self._norm("mlp_post_norm", m)
        return h + m if cache is None else (h + m, new_cache)


# --------------------------------------------------------------------------------------------
# The whole model, layer by layer.


def default_positions(tokens_or_h: Array) -> Int[Array, "b t"]:
    B, T = tokens_or_h.shape[:2]
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))


@dataclass(frozen=True)
class Model:
    """Functional decoder: ``embed → block 0..L-1 → head``. Hashable; ``jax.jit(model.forward)``."""

    cfg: ModelConfig
    hooks: Hooks = field(default=NO_HOOKS)

    def embed(self, params: Any, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(
                f"tokens must be an integer array [batch, time], got {tokens.dtype}{tokens.shape}"
            )
        E = dense(params["embed"], jnp.float32)
        h = jnp.take(E, tokens, axis=0)
        if self.cfg.embed_scale:
            h = h * jnp.float32(math.sqrt(self.cfg.d_model))
        return h.astype(self.cfg.compute_dtype)

    def block_module(self, i: int) -> Block:
        if not 0 <= i < self.cfg.n_layers:
            raise IndexError(f"block {i} out of range for {self.cfg.n_layers} layers")
        return Block(self.cfg, i, self.hooks)

    def apply_block(
        self,
        block_params: Any,
        i: int,
        h: Array,
        positions: Array | None = None,
        *,
        capture: bool = False,
        mix: Array | None = None,
        down_in: Array | None = None,
        cache: dict | None = None,
    ):
        """Block ``i`` on ``h`` with its own params. With ``capture=True`` also returns the input
        of every linear that ran: ``{"attn.q_proj": x, ..., "mlp.down_proj": x}`` (before
        act_quant), the keys and values at ``KV_SITES`` (before kv_quant, flattened over heads)
        and the block output at ``OUTPUT_SITE``. ``mix`` ``[b, t, n_heads·head_dim]``: the
        attention heads' output (o_proj's captured input) from an earlier call with the same
        q/k/v/norm weights; q/k/v and the attention itself are then skipped (and not captured)
        — the block's result is unchanged.
        ``down_in`` ``[b, t, d_ff]``: likewise down_proj's input (gate/up and the activation
        are skipped)
        ``positions=None`` (the default) means in order, ``0 … t-1``: the same result as
        ``default_positions(h)``, through the faster chunked attention.
        ``cache``: decoding (``harness.decode``); returns ``(h, layer cache)``."""
        mod = self.block_module(i)
        if cache is not None:
            return mod.apply({"params": block_params}, h, None, None, None, cache)
        if not capture:
            return mod.apply({"params": block_params}, h, positions, mix, down_in)
        out, state = mod.apply(
            {"params": block_params}, h, positions, mix, down_in, mutable=["linear_inputs"]
        )
        ins = state["linear_inputs"]
        got = {n: v[0] for n in BLOCK_LINEARS + KV_SITES if (v := maybe_param(ins, n)) is not None}
        return out, got | {OUTPUT_SITE: out}

    def block(self, params: Any, i: int, h: Array, positions: Array | None = None) -> Array:
        return self.apply_block(params["blocks"][i], i, h, positions)

    def head(self, params: Any, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """Final norm and output projection (the tied embedding, or ``lm_head``); float32 logits."""
        x = rms_norm(h, params["final_norm"], self.cfg.norm_eps)
        w = params["embed"] if self.cfg.tie_embeddings else params["lm_head"]
        logits = linear(x, w, name="lm_head", hooks=self.hooks).astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))
        return logits

    def hidden(self, params: Any, tokens: Array, positions: Array | None = None) -> Array:
        """Residual stream after the last block (before the final norm)."""
        h = self.embed(params, tokens)
        for i in range(self.cfg.n_layers):
            h = self.block(params, i, h, positions)
        return h

    def forward(
        self, params: Any, tokens: Int[Array, "b t"], positions: Array | None = None
    ) -> Array:
        """Logits ``[B, T, V]`` (float32) of a causal LM pass."""
        return self.head(params, self.hidden(params, tokens, positions))

    __call__ = forward


def param_shapes(cfg: ModelConfig) -> dict:
    """The params pytree of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    h = jax.ShapeDtypeStruct((1, 2, cfg.d_model), cfg.compute_dtype)
    pos = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    model = Model(cfg)
    blocks = [
        jax.eval_shape(
            lambda h, pos, i=i: model.block_module(i).init(jax.random.key(0), h, pos)["params"],
            h,
            pos,
        )
        for i in range(cfg.n_layers)
    ]
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    out = {
        "embed": f32(cfg.vocab_size, cfg.d_model),
        "final_norm": f32(cfg.d_model),
        "blocks": blocks,
    }
    if not cfg.tie_embeddings:
        out["lm_head"] = f32(cfg.vocab_size, cfg.d_model)
    return out


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random float32 parameters for tests: weights ~ N(0, 1/d_in), norms 1, biases 0.

    Drawn with numpy from ``seed`` (no XLA compilation, unlike a traced flax ``init``)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(s.shape, jnp.float32)
        if name.endswith("_bias']"):
            return jnp.zeros(s.shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, s.shape[-1] ** -0.5, s.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))
