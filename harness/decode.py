"""Generation with a KV cache: prefill the prompt, then one token at a time.

    dec = Decoder(Model(cfg, result.hooks), capacity=2048)
    out = dec.generate(params, prompt_ids, max_new_tokens=64, stop_token=eos)
    out.tokens, out.logits, out.cache_bytes

The cache is the one ``Hooks.kv_quant`` describes (:mod:`harness.kvcache`; none: full
precision): codes and scales as the method's codec stores them, a full-precision ring for the
recent window, the sink tokens apart. Its capacity is fixed, so :meth:`Decoder.step` compiles
once and runs every later token without recompiling; the prompt is written by
:meth:`Decoder.prefill`, which compiles once per prompt length.

Consistency: the prompt's own attention is the scoring path's (``harness.model.Attention``
under the hook), each step reads the cache as stored, and both give query ``t`` the cache as it
stood after token ``t`` — so a step's logits equal those of scoring the whole sequence, up to
float reassociation (``tests/test_decode.py``; with the full-precision cache, equal to the
uncached forward).

Attention of a step: ``attention="reference"`` (the default) dequantizes the whole cache
(``kvcache.cached_attention``: ``read``, then ``decode_attention``); ``attention="kernel"`` reads
the quantized prefix packed through ``kernels.kv_decode`` (Pallas; ``interpret`` mode by
default off a GPU) and merges it with the full-precision window and sink tokens by
log-sum-exp (``kvcache.kernel_attention``) — the same logits up to float32 reassociation
(``tests/test_decode_kernel.py``). ``phi`` (one float per layer): FlashDecoding++'s unified
maximum in the kernel, with its overflow fallback. The kernel needs codecs exposing a kernel
layout (``KVCodec.kernel_layout``: KIVI's) and keys quantized after RoPE.

Bad input raises before anything is written: a prompt longer than the cache, a cache that would
overflow (``max_new_tokens`` past the capacity), a capacity beyond the model's context, a
capacity the codecs' chunks do not divide.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from harness import kvcache
from harness.model import Model


@dataclasses.dataclass(frozen=True)
class State:
    """A decoding state: the per-layer caches and the number of tokens they hold."""

    layers: list[dict]
    length: int  # tokens written (python int: checked before each step)


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # [B, n] generated ids (after the prompt), stop token included
    logits: np.ndarray  # [B, n, V] float32 logits each generated token was drawn from
    cache_bytes: int  # bytes the cache arrays hold (all layers, both sides)
    state: State
    step_seconds: tuple[float, ...] = ()  # wall time of each step, its logits on the host


def _kvq(model: Model) -> kvcache.KVQuant:
    kvq = model.hooks.kv_quant
    return kvcache.FULL if kvq is None else kvcache.check_kv_quant(kvq)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(model: Model, capacity: int, params: Any, tokens: Array):
    cfg, kvq = model.cfg, _kvq(model)
    h = model.embed(params, tokens)
    layers = []
    for i in range(cfg.n_layers):
        empty = kvcache.init_cache(kvq, i, batch=tokens.shape[0], capacity=capacity,
                                   kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                   dtype=cfg.compute_dtype)  # fmt: skip
        h, c = model.apply_block(
            params["blocks"][i], i, h, cache={"layer": empty, "position": None}
        )
        layers.append(c)
    return model.head(params, h), layers


@functools.partial(jax.jit, static_argnums=0)
def _step(model: Model, params: Any, layers: list[dict], token: Array, position: Array):
    h = model.embed(params, token[:, None])
    out = []
    for i in range(model.cfg.n_layers):
        h, c = model.apply_block(
            params["blocks"][i], i, h, cache={"layer": layers[i], "position": position}
        )
        out.append(c)
    return model.head(params, h)[:, 0], out


@functools.partial(jax.jit, static_argnums=2)
def _pick(logits: Array, key: Array, temperature: float) -> Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / jnp.float32(temperature)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Prefill and step functions of ``model`` over a cache of ``capacity`` tokens."""

    model: Model
    capacity: int
    attention: str = "reference"  # "reference" | "kernel"
    interpret: bool | None = None  # kernel in Pallas interpret mode (None: unless on a GPU)
    phi: tuple[float, ...] | None = None  # kernel: FlashDecoding++ unified max per layer
    safe: tuple[float, float] | None = None  # kernel: the unified max's safe range

    def __post_init__(self):
        kvcache.check_capacity(_kvq(self.model), self.capacity)
        ctx = self.model.cfg.max_seq_len
        if self.capacity > ctx:
            raise ValueError(
                f"cache capacity {self.capacity} is longer than the model's context of {ctx} tokens"
            )
        if self.attention not in ("reference", "kernel"):
            raise ValueError(f"attention must be 'reference' or 'kernel', got {self.attention!r}")
        step_model = self.model
        if self.attention == "kernel":
            cfg = self.model.cfg
            interpret = self.interpret
            if interpret is None:
                interpret = jax.devices()[0].platform != "gpu"
            kvq = kvcache.kernel_kv_quant(
                _kvq(self.model), head_dim=cfg.head_dim, kv_heads=cfg.n_kv_heads,
                n_layers=cfg.n_layers, interpret=interpret, phi=self.phi, safe=self.safe,
            )  # fmt: skip
            hooks = dataclasses.replace(self.model.hooks, kv_quant=kvq)
            step_model = dataclasses.replace(self.model, hooks=hooks)
        elif self.phi is not None or self.safe is not None:
            raise ValueError("phi / safe (the unified maximum) need attention='kernel'")
        object.__setattr__(self, "_step_model", step_model)

    def prefill(self, params: Any, tokens) -> tuple[Array, State]:
        """The prompt ``[B, P]`` written into an empty cache; its logits ``[B, P, V]``."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"prompt must be integer ids [batch, time], got {tokens.shape}")
        P = tokens.shape[1]
        if P < 1:
            raise ValueError("empty prompt: decoding needs at least one token")
        if P > self.capacity:
            raise ValueError(f"prompt of {P} tokens is longer than the cache ({self.capacity})")
        logits, layers = _prefill(self.model, self.capacity, params, tokens)
        return logits, State(layers, P)

    def step(self, params: Any, state: State, token) -> tuple[Array, State]:
        """Append one token per sequence ``[B]`` at position ``state.length``; its logits."""
        if state.length >= self.capacity:
            raise ValueError(
                f"the cache is full: {state.length} of {self.capacity} tokens; a longer "
                "generation needs a larger capacity"
            )
        token = jnp.asarray(token, jnp.int32).reshape(-1)
        logits, layers = _step(
            self._step_model, params, state.layers, token, jnp.int32(state.length)
        )
        return logits, State(layers, state.length + 1)

    def generate(
        self,
        params: Any,
        prompt,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop_token: int | None = None,
    ) -> Generation:
        """Greedy (``temperature=0``) or seeded sampling of up to ``max_new_tokens`` tokens;
        stops early once every sequence has produced ``stop_token``."""
        prompt = jnp.asarray(prompt, jnp.int32)
        if prompt.ndim == 1:
            prompt = prompt[None]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        need = prompt.shape[1] + max_new_tokens - 1  # the last token is drawn, not written
        if need > self.capacity:
            raise ValueError(
                f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) overflow the "
                f"cache capacity {self.capacity}"
            )
        logits, state = self.prefill(params, prompt)
        last = logits[:, -1]
        key = jax.random.key(seed)
        toks, lgs = [], []
        done = np.zeros(prompt.shape[0], bool)
        secs = []
        for i in range(max_new_tokens):
            key, sub = jax.random.split(key)
            tok = _pick(last, sub, float(temperature))
            toks.append(np.asarray(tok))
            lgs.append(np.asarray(last))
            if stop_token is not None:
                done |= toks[-1] == stop_token
                if done.all():
                    break
            if i + 1 < max_new_tokens:
                t0 = time.perf_counter()
                last, state = self.step(params, state, tok)
                jax.block_until_ready(last)
                secs.append(time.perf_counter() - t0)
        return Generation(
            tokens=np.stack(toks, 1),
            logits=np.stack(lgs, 1),
            cache_bytes=kvcache.cache_bytes(state.layers),
            state=state,
            step_seconds=tuple(secs),
        )
