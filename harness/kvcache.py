"""The KV cache as a method stores it: codecs, the policy that says which tokens are quantized,
and the two attentions that read it (scoring a window, and decoding one token at a time).

A KV-cache method hands the model a :class:`KVQuant` in ``Hooks.kv_quant``:

* ``key`` / ``value`` — one :class:`KVCodec` each: how a chunk of ``chunk`` consecutive tokens
  ``[B, chunk, kv_heads, head_dim]`` is stored (``encode`` → a pytree of codes, scales,
  outliers, as stored) and read back (``decode``). Chunks are encoded independently, so a
  token's stored value depends only on the tokens of its own chunk (KIVI's per-channel key
  groups along tokens are chunks of ``G``; per-token schemes have ``chunk=1``);
* ``window`` ``R`` and ``flush`` ``F`` of each codec — the recent tokens kept in full precision.
  With ``L`` tokens in the cache the oldest

      Q(L) = F · ⌊max(L − R, 0) / F⌋

  are stored quantized and the rest are full precision. ``R = 0, F = 1``: every token quantized
  as soon as it is written (KVQuant); ``R = 1, F = 1``: every token but the current one
  (WKVQuant's past-only scheme); KIVI's keys ``R = 1, F = 128`` (a residual of 1…128 full
  precision tokens, quantized 128 at a time) and values ``R = 128, F = 1`` (the last 128);
* ``sink`` — the first tokens, always kept in full precision (attention sinks, KVQuant §3.5);
* ``pre_rope`` — keys are stored before RoPE and rotated when read (KVQuant §3.2).

Both attention paths see exactly the same cache. Scoring a window (:func:`mixed_attention`,
used by ``harness.model.Attention`` under the hook) gives query ``t`` the cache as it stands
after token ``t`` was written: key ``s`` quantized iff ``sink ≤ s < Q_key(t + 1)``, likewise
values. Decoding (:func:`init_cache`, :func:`write`, :func:`read`) keeps codes and scales as
the codec stores them in a fixed-capacity store, the full-precision tokens in a ring of
``R + F`` slots and the sink tokens apart, so the step function compiles once.
:data:`FULL` (no hook) is the full-precision cache: an identity codec, every token "quantized"
into a float store.

A third reader, for decoding through ``kernels.kv_decode`` (:func:`kernel_kv_quant`,
``Decoder(attention="kernel")``): a codec may expose its store in the kernel's packed layout
(:meth:`KVCodec.kernel_layout`); the tokens quantized on both sides are attended by the kernel
straight from the codes, the full-precision window and the sink tokens apart, and the parts
merged by log-sum-exp (:func:`kernel_attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

FP_BITS = 16  # a full-precision cache element as deployments store it (fp16 / bf16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCodec:
    """How one side of the cache (keys or values) is stored; subclass and define
    ``encode`` / ``decode`` / ``element_bits``. Frozen and hashable: it is part of the jit key."""

    chunk: int = 1  # tokens encoded together (their groups never straddle chunks)
    window: int = 0  # R: the most recent tokens kept in full precision
    flush: int = 1  # F: tokens leave the window F at a time (a multiple of chunk)

    def __post_init__(self):
        for f, lo in (("chunk", 1), ("window", 0), ("flush", 1)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{type(self).__name__}.{f} must be an int >= {lo}, got {v!r}")
        if self.flush % self.chunk:
            raise ValueError(
                f"{type(self).__name__}: flush={self.flush} is not a multiple of "
                f"chunk={self.chunk}; a chunk must be complete when it is encoded"
            )

    def encode(self, layer: int, x: Array) -> Any:
        """``x`` float32 ``[B, chunk, kv_heads, head_dim]`` → the stored pytree of arrays."""
        raise NotImplementedError

    def decode(self, layer: int, code: Any) -> Array:
        """The stored pytree → float32 ``[B, chunk, kv_heads, head_dim]``."""
        raise NotImplementedError

    def element_bits(self, head_dim: int) -> float:
        """Stored bits per element of a quantized token: codes + scales + outliers."""
        raise NotImplementedError

    def kernel_layout(self, layer: int, store: Any) -> KernelLayout | None:
        """Optional: the decode store (chunk-major, leaves ``[n, B, chunk, ...]`` as
        :func:`init_cache` keeps them) in ``kernels.kv_decode``'s layout, or ``None`` when the
        codec cannot be read by that kernel (the default). See :class:`KernelLayout`."""
        return None

    def fake(self, layer: int, x: Array) -> Array:
        """Every whole chunk of ``x [B, T, kv, hd]`` encoded and decoded; a last partial chunk
        (never read as quantized: ``Q(L)`` is a multiple of ``chunk``) is left as it is."""
        B, T, H, D = x.shape
        n = T // self.chunk
        if n == 0:
            return x
        head = x[:, : n * self.chunk].astype(jnp.float32)
        chunks = jnp.moveaxis(head.reshape(B, n, self.chunk, H, D), 1, 0)
        out = jax.vmap(lambda c: self.decode(layer, self.encode(layer, c)))(chunks)
        out = jnp.moveaxis(out, 0, 1).reshape(B, n * self.chunk, H, D).astype(x.dtype)
        return jnp.concatenate([out, x[:, n * self.chunk :]], axis=1)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """A quantized store as ``kernels.kv_decode`` reads it (head-major): ``codes`` uint32
    ``[B, kv, T, D·b/32]`` packed along D, ``scale`` / ``zero`` ``[B, kv, T/gt, D/gd]`` with
    ``x̂ = (format.decode(code) − zero) · scale`` per group, ``group = (gt, gd)``: keys
    ``(Gk, 1)`` (per channel over ``Gk`` tokens), values ``(1, Gv)`` (per token)."""

    codes: Array
    scale: Array
    zero: Array | None
    format: Any  # numerics.formats.Format
    group: tuple[int, int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity(KVCodec):
    """Full precision: the stored value is the value (the cache without a method)."""

    def encode(self, layer, x):
        return x

    def decode(self, layer, code):
        return code

    def element_bits(self, head_dim):
        return float(FP_BITS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuant:
    """A method's KV-cache numerics (``Hooks.kv_quant``): see the module docstring."""

    key: KVCodec
    value: KVCodec
    pre_rope: bool = False  # keys stored before RoPE, rotated when read
    sink: int = 0  # first tokens kept in full precision

    def __post_init__(self):
        for side in ("key", "value"):
            if not isinstance(getattr(self, side), KVCodec):
                raise TypeError(f"KVQuant.{side} must be a KVCodec, got {getattr(self, side)!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"KVQuant.sink must be an int >= 0, got {self.sink!r}")

    @property
    def all_quantized(self) -> bool:
        """Every token quantized as soon as it is written: scoring needs no mixed attention."""
        return self.sink == 0 and all(
            c.window == 0 and c.flush == 1 for c in (self.key, self.value)
        )

    def bits_per_element(self, n_tokens: int, head_dim: int) -> float:
        """Mean bits per cached key / value element at ``n_tokens`` tokens: codes, scales and
        outliers of the quantized tokens, :data:`FP_BITS` for the full-precision window and
        sink tokens."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        total = 0.0
        for c in (self.key, self.value):
            q = max(quantized_prefix(c, n_tokens) - self.sink, 0)
            total += q * c.element_bits(head_dim) + (n_tokens - q) * FP_BITS
        return total / (2 * n_tokens)


FULL = KVQuant(key=Identity(), value=Identity())


def quantized_prefix(codec: KVCodec, length):
    """``Q(L) = F·⌊max(L − R, 0)/F⌋``: how many of the first ``L`` tokens are stored quantized
    (python ints, numpy or jax arrays)."""
    if isinstance(length, int | np.integer):
        return codec.flush * (max(int(length) - codec.window, 0) // codec.flush)
    xp = jnp if isinstance(length, jax.Array) else np
    return codec.flush * (xp.maximum(length - codec.window, 0) // codec.flush)


def check_kv_quant(kvq: Any) -> KVQuant:
    if not isinstance(kvq, KVQuant):
        raise TypeError(
            f"Hooks.kv_quant must be a harness.kvcache.KVQuant (key / value codecs), got "
            f"{type(kvq).__name__}"
        )
    return kvq


# --------------------------------------------------------------------------------------------
# Scoring a window: each query sees the cache as it stood when it was written.


def quantized_masks(kvq: KVQuant, pq, pk):
    """Boolean ``[.., t, s]`` masks: key / value ``s`` is read quantized by query ``t``."""
    after_sink = pk >= kvq.sink
    mk = after_sink & (pk < quantized_prefix(kvq.key, pq + 1))
    mv = after_sink & (pk < quantized_prefix(kvq.value, pq + 1))
    return mk, mv


def mixed_attention(
    q: Array,
    k: Array,
    k_hat: Array,
    v: Array,
    v_hat: Array,
    kvq: KVQuant,
    *,
    scale: float,
    window: int | None,
    query_chunk: int = 128,
) -> Array:
    """In-order causal attention where query ``t`` reads key ``s`` as ``k_hat`` (quantized) or
    ``k`` (full precision) by :func:`quantized_masks`, and likewise values. ``q [B, T, H, D]``
    (post-RoPE), ``k``/``k_hat``/``v``/``v_hat`` ``[B, T, KV, D]`` (keys post-RoPE). Queries
    run in chunks that read only the keys they can see, as ``harness.layers.causal_attention``.
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    f32 = jnp.float32
    qh = jnp.transpose(q.reshape(B, T, KV, G, D), (0, 2, 3, 1, 4))  # [B, KV, G, T, D]
    heads = lambda a: jnp.transpose(a, (0, 2, 1, 3))  # [B, KV, S, D]
    kh, khq, vh, vhq = heads(k), heads(k_hat), heads(v), heads(v_hat)
    ein = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=f32)
    outs = []
    for t0 in range(0, T, query_chunk):
        t1 = min(t0 + query_chunk, T)
        s0 = 0 if window is None else max(0, t0 - window + 1)
        # masks from iotas in the graph, not numpy constants (8192 tokens: 64 chunks of them)
        pq = jnp.arange(t0, t1, dtype=jnp.int32)[:, None]
        pk = jnp.arange(s0, t1, dtype=jnp.int32)[None, :]
        allowed = pk <= pq if window is None else (pk <= pq) & (pq - pk < window)
        mk, mv = quantized_masks(kvq, pq, pk)
        qc = qh[:, :, :, t0:t1]
        qk = "bkgtd,bksd->bkgts"
        s = jnp.where(mk, ein(qk, qc, khq[:, :, s0:t1]), ein(qk, qc, kh[:, :, s0:t1]))
        s = jnp.where(allowed, s * f32(scale), f32(-1e30))
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        pv = "bkgts,bksd->bkgtd"
        outs.append(
            ein(pv, jnp.where(mv, p, 0), vhq[:, :, s0:t1])
            + ein(pv, jnp.where(mv, 0, p), vh[:, :, s0:t1])
        )
    o = jnp.concatenate(outs, axis=3)
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Decoding: a fixed-capacity cache holding what the codecs store.


def check_capacity(kvq: KVQuant, capacity: int) -> None:
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"cache capacity must be a positive int, got {capacity!r}")
    for side in ("key", "value"):
        c = getattr(kvq, side)
        if capacity % c.chunk:
            raise ValueError(
                f"cache capacity {capacity} is not a multiple of the {side} codec's chunk {c.chunk}"
            )


def _store_like(codec: KVCodec, layer: int, B: int, H: int, D: int, n: int, dtype) -> Any:
    x = jax.ShapeDtypeStruct((B, codec.chunk, H, D), jnp.float32)
    shapes = jax.eval_shape(lambda a: codec.encode(layer, a), x)
    if codec.__class__ is Identity:  # the float store holds the compute dtype
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
    return jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), shapes)


def init_cache(kvq: KVQuant, layer: int, *, batch: int, capacity: int, kv_heads: int,
               head_dim: int, dtype) -> dict:  # fmt: skip
    """One layer's empty cache: the quantized stores (chunk-major), the full-precision rings
    of ``window + flush`` slots and the sink tokens."""
    check_capacity(kvq, capacity)
    out = {}
    for side, c in (("k", kvq.key), ("v", kvq.value)):
        out[side + "q"] = _store_like(
            c, layer, batch, kv_heads, head_dim, capacity // c.chunk, dtype
        )
        ring = min(c.window + c.flush, capacity)
        out[side + "f"] = jnp.zeros((batch, ring, kv_heads, head_dim), dtype)
        out[side + "s"] = jnp.zeros((batch, kvq.sink, kv_heads, head_dim), dtype)
    return out


def _encode_into(codec: KVCodec, layer: int, store: Any, first_chunk, x: Array) -> Any:
    """Encode ``x [B, n·chunk, kv, hd]`` as ``n`` chunks written from chunk ``first_chunk``."""
    B, T, H, D = x.shape
    n = T // codec.chunk
    chunks = jnp.moveaxis(x.astype(jnp.float32).reshape(B, n, codec.chunk, H, D), 1, 0)
    codes = jax.vmap(lambda c: codec.encode(layer, c))(chunks)
    return jax.tree.map(
        lambda s, c: jax.lax.dynamic_update_slice_in_dim(s, c.astype(s.dtype), first_chunk, 0),
        store,
        codes,
    )


def write_prompt(kvq: KVQuant, layer: int, cache: dict, k: Array, v: Array) -> dict:
    """Fill an empty layer cache with a prompt's keys / values ``[B, P, kv, hd]`` (``P`` static;
    keys pre-RoPE when ``kvq.pre_rope``)."""
    P = k.shape[1]
    out = dict(cache)
    for side, c, x in (("k", kvq.key, k), ("v", kvq.value, v)):
        Q = quantized_prefix(c, P)
        if Q:
            out[side + "q"] = _encode_into(c, layer, cache[side + "q"], 0, x[:, :Q])
        ring = cache[side + "f"]
        W = ring.shape[1]
        pos = np.arange(max(P - W, 0), P)
        out[side + "f"] = ring.at[:, pos % W].set(x[:, pos].astype(ring.dtype))
        S = min(kvq.sink, P)
        out[side + "s"] = cache[side + "s"].at[:, :S].set(x[:, :S].astype(ring.dtype))
    return out


def write_token(kvq: KVQuant, layer: int, cache: dict, k: Array, v: Array, p: Array) -> dict:
    """Append one token's keys / values ``[B, 1, kv, hd]`` at position ``p`` (traced int32)."""
    out = dict(cache)
    L = p + 1
    for side, c, x in (("k", kvq.key, k), ("v", kvq.value, v)):
        ring = cache[side + "f"]
        W = ring.shape[1]
        ring = jax.lax.dynamic_update_slice_in_dim(ring, x.astype(ring.dtype), p % W, 1)
        out[side + "f"] = ring
        if kvq.sink:
            sink = cache[side + "s"]
            put = jax.lax.dynamic_update_slice_in_dim(
                sink, x.astype(sink.dtype), jnp.minimum(p, kvq.sink - 1), 1
            )
            out[side + "s"] = jnp.where(p < kvq.sink, put, sink)
        q_old, q_new = quantized_prefix(c, L - 1), quantized_prefix(c, L)

        def flush(store, c=c, ring=ring, q_old=q_old, W=W):  # [q_old, q_old + F) leave the ring
            x = ring[:, (q_old + jnp.arange(c.flush)) % W]
            return _encode_into(c, layer, store, q_old // c.chunk, x)

        out[side + "q"] = jax.lax.cond(q_new > q_old, flush, lambda s: s, cache[side + "q"])
    return out


def _read_side(codec: KVCodec, layer: int, kvq: KVQuant, cache: dict, side: str, L) -> Array:
    store, ring, sink = cache[side + "q"], cache[side + "f"], cache[side + "s"]
    dec = jax.vmap(lambda c: codec.decode(layer, c))(store)  # [n, B, chunk, kv, hd]
    n, B, ch, H, D = dec.shape
    X = jnp.moveaxis(dec, 0, 1).reshape(B, n * ch, H, D).astype(jnp.float32)
    s = jnp.arange(n * ch)
    W = ring.shape[1]
    recent = ring[:, s % W].astype(jnp.float32)
    X = jnp.where((s < quantized_prefix(codec, L))[None, :, None, None], X, recent)
    if kvq.sink:
        first = jnp.zeros_like(X).at[:, : kvq.sink].set(sink.astype(jnp.float32))
        X = jnp.where((s < kvq.sink)[None, :, None, None], first, X)
    return X


def read(kvq: KVQuant, layer: int, cache: dict, L) -> tuple[Array, Array]:
    """The cache of ``L`` tokens as float32 keys and values ``[B, capacity, kv, hd]`` (keys
    before RoPE when ``kvq.pre_rope``); slots ``>= L`` hold stale values (mask them)."""
    return _read_side(kvq.key, layer, kvq, cache, "k", L), _read_side(
        kvq.value, layer, kvq, cache, "v", L
    )


def cached_attention(kvq: KVQuant, layer: int, cache: dict, q: Array, L, *, rope, scale: float,
                     window: int | None) -> Array:  # fmt: skip
    """A decoding step's attention: ``q [B, 1, H, D]`` (post-RoPE, position ``L − 1``) over the
    stored cache of ``L`` tokens. Under a :class:`KernelKVQuant` through the kernel
    (:func:`kernel_attention`); otherwise dequantize-then-attend: :func:`read`, RoPE on keys
    stored before it (``rope(K, positions)``), :func:`decode_attention`."""
    if isinstance(kvq, KernelKVQuant):
        return kernel_attention(q, kvq, layer, cache, L, scale=scale, window=window)
    K, V = read(kvq, layer, cache, L)
    if kvq.pre_rope:
        B, S = K.shape[:2]
        K = rope(K, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S)))
    return decode_attention(q, K, V, L, scale=scale, window=window)


def decode_attention(q: Array, K: Array, V: Array, L, *, scale: float, window: int | None):
    """One query per sequence ``q [B, 1, H, D]`` (position ``L − 1``) over ``K``/``V``
    ``[B, S, KV, D]`` whose first ``L`` slots are valid; float32 scores and softmax."""
    B, _, H, D = q.shape
    S, KV = K.shape[1], K.shape[2]
    qg = q.astype(jnp.float32).reshape(B, KV, H // KV, D)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, K.astype(jnp.float32)) * jnp.float32(scale)
    pos = jnp.arange(S)
    ok = pos < L
    if window is not None:
        ok = ok & (L - 1 - pos < window)
    s = jnp.where(ok[None, None, None, :], s, jnp.float32(-1e30))
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgs,bskd->bkgd", p, V.astype(jnp.float32))
    return o.reshape(B, 1, H, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Decoding through the kernel: the quantized prefix read packed by kernels.kv_decode, the
# full-precision window and the sink tokens attended apart, the parts merged by log-sum-exp.


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelKVQuant(KVQuant):
    """A :class:`KVQuant` whose decode steps attend through ``kernels.kv_decode`` (build with
    :func:`kernel_kv_quant`). ``phi``: FlashDecoding++'s unified maximum per layer (``None``:
    the exact running max), ``safe`` its range (``kernels.kv_decode.F32_SAFE``)."""

    interpret: bool = False
    phi: tuple[float, ...] | None = None
    safe: tuple[float, float] = (-64.0, 64.0)


def kernel_kv_quant(kvq: KVQuant, *, head_dim: int, kv_heads: int, n_layers: int,
                    interpret: bool = False, phi=None, safe=None) -> KernelKVQuant:  # fmt: skip
    """``kvq`` on the kernel path, after checking the kernel can read its store: keys quantized
    after RoPE, both codecs exposing a :meth:`KVCodec.kernel_layout` with keys grouped along
    tokens and values along channels."""
    from kernels.kv_decode import F32_SAFE, check_safe

    kvq = check_kv_quant(kvq)
    if kvq.pre_rope:
        raise ValueError(
            "the kv_decode kernel cannot read keys quantized before RoPE: it scores the stored "
            "keys as they are, and a pre-RoPE key needs its rotation applied after dequantizing "
            "(use attention='reference')"
        )
    for side, c, want in (("key", kvq.key, "(Gk, 1)"), ("value", kvq.value, "(1, Gv)")):
        got = []

        def probe(c=c, got=got):  # the layout of a one-chunk store, traced abstractly
            lay = c.kernel_layout(0, _store_like(c, 0, 1, kv_heads, head_dim, 1, jnp.float32))
            got.append(lay)
            return jnp.zeros(())

        jax.eval_shape(probe)
        lay = got[0]
        if lay is None:
            raise ValueError(
                f"the {side} codec {type(c).__name__} has no kernel layout "
                "(KVCodec.kernel_layout): the kv_decode kernel reads packed low-bit codes only"
            )
        gt, gd = lay.group
        ok = (gd == 1 and gt == c.chunk) if side == "key" else (gt == 1 and c.chunk == 1)
        if not ok:
            raise ValueError(
                f"the kv_decode kernel reads {side}s grouped {want} (tokens, channels); "
                f"{type(c).__name__} gives {lay.group} with chunk {c.chunk}"
            )
    if phi is not None:
        phi = tuple(float(x) for x in phi)
        if len(phi) != n_layers or not all(np.isfinite(phi)):
            raise ValueError(f"phi must be {n_layers} finite numbers (one per layer), got {phi}")
    safe = check_safe(F32_SAFE if safe is None else safe)
    return KernelKVQuant(key=kvq.key, value=kvq.value, pre_rope=False, sink=kvq.sink,
                         interpret=bool(interpret), phi=phi, safe=safe)  # fmt: skip


def _recent(codec: KVCodec, layer: int, cache: dict, side: str, L, N: int, sink: int) -> Array:
    """float32 ``[B, N, kv, hd]``: tokens ``L − N … L − 1`` as :func:`read` gives them (sink,
    dequantized or from the ring), dequantizing only the chunks they fall in."""
    store, ring, sinks = cache[side + "q"], cache[side + "f"], cache[side + "s"]
    n = jax.tree.leaves(store)[0].shape[0]
    ch = codec.chunk
    nc = min(n, -(-N // ch) + 1)
    c0 = jnp.clip((L - N) // ch, 0, n - nc)
    part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, c0, nc, 0), store)
    dec = jax.vmap(lambda c: codec.decode(layer, c))(part)  # [nc, B, ch, kv, hd]
    _, B, _, H, D = dec.shape
    dec = jnp.moveaxis(dec, 0, 1).reshape(B, nc * ch, H, D).astype(jnp.float32)
    s = L - N + jnp.arange(N)
    X = dec[:, jnp.clip(s - c0 * ch, 0, nc * ch - 1)]
    W = ring.shape[1]
    fresh = ring[:, s % W].astype(jnp.float32)
    X = jnp.where((s < quantized_prefix(codec, L))[None, :, None, None], X, fresh)
    if sink:
        first = sinks[:, jnp.clip(s, 0, sink - 1)].astype(jnp.float32)
        X = jnp.where((s < sink)[None, :, None, None], first, X)
    return X


def _part(qg: Array, K: Array, V: Array, ok: Array, scale: float) -> tuple[Array, Array]:
    """Exact attention of ``qg [B, kv, g, D]`` over ``K``/``V [B, n, kv, D]`` where ``ok
    [n]``: ``(o [B, kv, g, D], lse [B, kv, g])``, ``lse = −inf`` when nothing is valid."""
    ok = ok[None, None, None, :]
    s = jnp.einsum("bkgd,bskd->bkgs", qg, K) * jnp.float32(scale)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(ok, jnp.exp(s - m[..., None]), 0.0)
    l = jnp.sum(e, axis=-1)
    o = jnp.einsum("bkgs,bskd->bkgd", e, V) / jnp.where(l > 0, l, 1.0)[..., None]
    return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def kernel_attention(q: Array, kvq: KernelKVQuant, layer: int, cache: dict, L, *, scale: float,
                     window: int | None) -> Array:  # fmt: skip
    """:func:`decode_attention` of ``q [B, 1, H, D]`` over the stored cache of ``L`` tokens, in
    three disjoint parts merged by log-sum-exp (``kernels.kv_decode.merge_partials``): the
    tokens quantized on both sides, ``[k0, k1)`` with ``k0 = max(sink, L − window)`` and
    ``k1 = max(min(Q_key(L), Q_value(L)), k0)``, by the kernel straight from the packed codes;
    the sink tokens below ``k1``; and the recent ``[k1, L)`` (full precision, or quantized on
    one side only), exactly as :func:`read` gives them."""
    from kernels.kv_decode import kv_decode, merge_partials

    B, _, H, D = q.shape
    ks = kvq.key.kernel_layout(layer, cache["kq"])
    vs = kvq.value.kernel_layout(layer, cache["vq"])
    KV, T = ks.codes.shape[1], ks.codes.shape[2]
    k0 = jnp.maximum(kvq.sink, 0 if window is None else L - window)
    k1 = jnp.maximum(jnp.minimum(quantized_prefix(kvq.key, L), quantized_prefix(kvq.value, L)), k0)
    full = lambda x: jnp.full((B,), x, jnp.int32)
    phi = None if kvq.phi is None else kvq.phi[layer]
    kern = kv_decode(
        q[:, 0].astype(jnp.float32), ks.codes, ks.scale, ks.zero, vs.codes, vs.scale, vs.zero,
        full(k1), k_fmt=ks.format, v_fmt=vs.format, sm_scale=scale, interpret=kvq.interpret,
        starts=full(jnp.minimum(k0, k1)), return_lse=True, phi=phi, safe=kvq.safe,
    )  # fmt: skip
    # the sink tokens below k1 and the recent tokens [k1, L), attended exactly in jnp
    N = min(max(kvq.key.window + kvq.key.flush, kvq.value.window + kvq.value.flush), T)
    pos = L - N + jnp.arange(N)
    Kr = _recent(kvq.key, layer, cache, "k", L, N, kvq.sink)
    Vr = _recent(kvq.value, layer, cache, "v", L, N, kvq.sink)
    ok = (pos >= k1) & (pos >= 0)
    if kvq.sink:
        sp = jnp.arange(kvq.sink)
        Kr = jnp.concatenate([cache["ks"].astype(jnp.float32), Kr], axis=1)
        Vr = jnp.concatenate([cache["vs"].astype(jnp.float32), Vr], axis=1)
        ok = jnp.concatenate([(sp < k1) & (sp < L), ok])
        pos = jnp.concatenate([sp, pos])
    if window is not None:
        ok = ok & (L - 1 - pos < window)
    qg = q.astype(jnp.float32).reshape(B, KV, H // KV, D)
    o_r, lse_r = _part(qg, Kr, Vr, ok, scale)
    o, _ = merge_partials([(kern.o, kern.lse), (o_r.reshape(B, H, D), lse_r.reshape(B, H))])
    return o.reshape(B, 1, H, D).astype(q.dtype)


def cache_bytes(cache: Any) -> int:
    """Bytes the arrays of a cache (or a list of layer caches) hold."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache))


def cache_mib(kvq: KVQuant, *, n_tokens: int, n_layers: int, kv_heads: int, head_dim: int):
    """Cache MiB of ``n_tokens`` tokens at :meth:`KVQuant.bits_per_element` (both sides)."""
    bits = kvq.bits_per_element(n_tokens, head_dim)
    return 2 * n_layers * kv_heads * head_dim * n_tokens * bits / 8 / 2**20


__all__ = [
    "FP_BITS", "FULL", "Identity", "KVCodec", "KVQuant", "KernelKVQuant", "KernelLayout",
    "cache_bytes", "cache_mib", "check_capacity", "check_kv_quant", "decode_attention",
    "init_cache", "kernel_attention", "kernel_kv_quant", "mixed_attention", "quantized_masks",
    "quantized_prefix", "read", "write_prompt", "write_token",
]  # fmt: skip
