"""Decoder tests on tiny random configs of both families: shapes, causality, sliding window,
bf16 vs fp32, jit, block-by-block API, RoPE properties, and the seam (quantized weight leaves,
act_quant / matmul / kv_quant hooks)."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import kvcache
from harness.layers import Hooks, apply_rope, causal_attention, linear, rope_frequencies
from harness.model import (
    ADAPTERS,
    BLOCK_LINEARS,
    KV_SITES,
    OUTPUT_SITE,
    Model,
    ModelConfig,
    cast_params,
    default_positions,
    get_param,
    init_params,
    linear_names,
    set_param,
)

LLAMA = ModelConfig(
    family="llama",
    vocab_size=97,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    rope_theta=1e5,
)
GEMMA = ModelConfig(
    family="gemma3",
    vocab_size=97,
    d_model=32,
    n_layers=3,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    d_ff=64,
    norm_eps=1e-6,
    rope_theta=1e6,
    rope_local_theta=1e4,
    sliding_window=4,
    layer_types=("local", "local", "global"),
    mlp_activation="gelu_tanh",
    qk_norm=True,
    post_norms=True,
    embed_scale=True,
    query_scale=16**-0.5,
    final_logit_softcap=30.0,
)
CONFIGS = {"llama": LLAMA, "gemma3": GEMMA}
B, T = 2, 12


def random_params(cfg, seed=0):
    """init_params with norm weights perturbed around 1 (so norms are not identities)."""
    rng = np.random.default_rng(seed + 1)
    perturb = lambda path, x: (
        jnp.asarray(1.0 + 0.2 * rng.normal(size=x.shape).astype(np.float32))
        if "norm" in jax.tree_util.keystr(path)
        else x
    )
    return jax.tree_util.tree_map_with_path(perturb, init_params(cfg, seed))


def tokens(cfg, seed=0, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


_PARAMS = {k: random_params(c) for k, c in CONFIGS.items()}
_FWD = {k: jax.jit(Model(c).forward) for k, c in CONFIGS.items()}


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    cfg = CONFIGS[request.param]
    return cfg, Model(cfg), _PARAMS[cfg.family], _FWD[cfg.family]


def test_shapes_finite_and_block_api_composes_to_forward(setup):
    cfg, model, p, fwd = setup
    toks = tokens(cfg)
    logits = fwd(p, toks)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    h = jax.jit(model.embed)(p, toks)
    assert h.shape == (B, T, cfg.d_model) and h.dtype == jnp.float32
    block = jax.jit(model.block, static_argnums=1)
    for i in range(cfg.n_layers):
        h = block(p, i, h, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T)))
    np.testing.assert_allclose(
        np.asarray(jax.jit(model.head)(p, h)), np.asarray(logits), rtol=1e-5, atol=1e-5
    )


@given(pos=st.integers(0, T - 1), new=st.integers(0, 96))
def test_causality_later_token_never_changes_earlier_logits(pos, new):
    for cfg in CONFIGS.values():
        p = _PARAMS[cfg.family]
        toks = tokens(cfg, 2)
        changed = toks.at[:, pos].set(
            (toks[:, pos] + 1 + new % (cfg.vocab_size - 1)) % cfg.vocab_size
        )
        a, b = _FWD[cfg.family](p, toks), _FWD[cfg.family](p, changed)
        np.testing.assert_array_equal(np.asarray(a[:, :pos]), np.asarray(b[:, :pos]))
        assert float(jnp.max(jnp.abs(a[:, pos] - b[:, pos]))) > 1e-4  # the changed token matters


@given(
    T=st.integers(1, 24),
    chunk=st.integers(3, 11),
    window=st.none() | st.integers(1, 9),
    heads=st.sampled_from([(4, 2), (3, 1), (2, 2)]),
    seed=st.integers(0, 2**16),
)
def test_chunked_in_order_attention_equals_the_masked_full_product(T, chunk, window, heads, seed):
    """The in-order path (query chunks reading only the keys they can see) against the full
    [T, T] masked product with explicit positions 0..T-1. Masked scores become exactly 0 after
    the softmax either way, so only float32 summation order differs: 1e-6 on O(1) outputs."""
    H, KV = heads
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(2, T, n, 8)).astype(np.float32)) for n in (H, KV, KV))
    full = causal_attention(q, k, v, default_positions(q), scale=0.3, window=window)
    fast = causal_attention(q, k, v, None, scale=0.3, window=window, query_chunk=chunk)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_in_order_forward_equals_explicit_positions(setup):
    for cfg in CONFIGS.values():
        p, toks = _PARAMS[cfg.family], tokens(cfg, 2)
        model = Model(cfg)
        a = jax.jit(model.forward)(p, toks)
        b = jax.jit(model.forward)(p, toks, default_positions(toks))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_in_order_batch_path_for_accelerators(monkeypatch):
    """CPU maps over the batch one sequence at a time; accelerators vmap it. Same numbers."""
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(3, 20, 4, 8)).astype(np.float32))
    k = jnp.asarray(r.normal(size=(3, 20, 2, 8)).astype(np.float32))
    full = causal_attention(q, k, k, default_positions(q), scale=0.3, window=6)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    fast = causal_attention(q, k, k, None, scale=0.3, window=6, query_chunk=7)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_attention_rejects_bad_shapes():
    q = jnp.zeros((1, 4, 3, 8), jnp.float32)
    kv = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="do not divide"):
        causal_attention(q, kv, kv, None, scale=1.0)
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="as many keys as queries"):
        causal_attention(q, kv[:, :3], kv[:, :3], None, scale=1.0)
    with pytest.raises(ValueError, match="query_chunk"):
        causal_attention(q, kv, kv, None, scale=1.0, query_chunk=0)


def test_sliding_window_limits_receptive_field():
    # One local layer of window 3: position t sees t-2..t, so token 0 reaches positions 0..2 only.
    cfg = dataclasses.replace(GEMMA, n_layers=1, layer_types=("local",), sliding_window=3)
    p, f = random_params(cfg), jax.jit(Model(cfg).forward)
    toks = tokens(cfg, 3)
    d = jnp.max(
        jnp.abs(f(p, toks) - f(p, toks.at[:, 0].set((toks[:, 0] + 1) % cfg.vocab_size))),
        axis=(0, 2),
    )
    assert bool(jnp.all(d[:3] > 1e-5)) and bool(jnp.all(d[3:] == 0.0))
    # the same layer as global sees everything
    g = dataclasses.replace(cfg, layer_types=("global",))
    fg = jax.jit(Model(g).forward)
    dg = jnp.max(
        jnp.abs(fg(p, toks) - fg(p, toks.at[:, 0].set((toks[:, 0] + 1) % cfg.vocab_size))),
        axis=(0, 2),
    )
    assert bool(jnp.all(dg > 1e-5))


def test_bfloat16_close_to_float32(setup):
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2%); weights and activations are
    rounded at every matmul of 2-3 blocks, so logits drift by a few unit roundoffs: relative L2
    error below 3% (≈ 8·2^-8) and the argmax kept almost everywhere."""
    cfg, _, p, fwd = setup
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    toks = tokens(cfg, 4, (4, T))
    ref = fwd(p, toks)
    out = jax.jit(Model(bf).forward)(cast_params(p, jnp.bfloat16), toks)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.03, rel
    assert float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))) >= 0.9


# ----------------------------------------------------------------------------- the seam


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedInt4:
    """A stand-in for the numerics core's QArray: two 4-bit codes per byte, flat, plus a
    per-row scale — its leaves do not have the weight's shape."""

    packed: jax.Array  # uint8 [out * in / 2]
    scale: jax.Array  # float32 [out, 1]
    shape: tuple = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def quantize(w):
        scale = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 7.0
        codes = (jnp.clip(jnp.round(w / scale), -8, 7) + 8).astype(jnp.uint8).reshape(-1)
        return PackedInt4(codes[0::2] | (codes[1::2] << 4), scale, tuple(w.shape))

    def dequantize(self):
        lo, hi = self.packed & 15, self.packed >> 4
        codes = jnp.stack([lo, hi], axis=1).reshape(self.shape).astype(jnp.float32) - 8.0
        return codes * self.scale


@functools.partial(jax.jit, static_argnums=0)
def _quantize_all(cfg, p):
    qp, fp = p, p
    for name in linear_names(cfg):
        q = PackedInt4.quantize(get_param(p, name))
        qp, fp = set_param(qp, name, q), set_param(fp, name, q.dequantize())
    return qp, fp


def test_quantized_leaf_gives_same_logits_as_its_dequantized_floats(setup):
    cfg, model, p, fwd = setup
    qp, fp = _quantize_all(cfg, p)
    leaf = get_param(qp, "blocks.0.attn.q_proj")
    assert leaf.packed.shape != (cfg.n_heads * cfg.head_dim, cfg.d_model)  # no shape check trips
    # the embedding (tied: also the head) quantized too
    qp = dict(qp, embed=PackedInt4.quantize(p["embed"]))
    fp = dict(fp, embed=qp["embed"].dequantize())
    toks = tokens(cfg, 5)
    np.testing.assert_allclose(
        np.asarray(fwd(qp, toks)), np.asarray(fwd(fp, toks)), rtol=1e-6, atol=1e-6
    )
    assert cast_params(qp, jnp.bfloat16)["blocks"][0]["attn"]["q_proj"] is leaf  # left alone


def test_act_quant_hook_sees_every_linear_once_in_order(setup):
    cfg, _, p, fwd = setup
    seen = []

    def act_quant(name, x):
        seen.append((name, x.shape[-1]))
        return x

    toks = tokens(cfg, 6)
    out = jax.jit(Model(cfg, Hooks(act_quant=act_quant)).forward)(
        p, toks
    )  # traced once: one call per linear
    assert [n for n, _ in seen] == linear_names(cfg) + ["lm_head"]
    d_in = {"attn.o_proj": cfg.n_heads * cfg.head_dim, "mlp.down_proj": cfg.d_ff}
    for name, width in seen[:-1]:
        assert width == d_in.get(name.split(".", 2)[2], cfg.d_model)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(p, toks)), rtol=1e-5, atol=1e-5)
    # a quantizing hook changes the numerics, under jit too
    crush = Hooks(act_quant=lambda name, x: jnp.round(x * 2.0) / 2.0)
    assert float(jnp.max(jnp.abs(jax.jit(Model(cfg, crush).forward)(p, toks) - out))) > 1e-3


def test_matmul_hook_receives_the_raw_leaf(setup):
    cfg, _, p, fwd = setup
    qp, _ = _quantize_all(cfg, p)
    kinds = {}

    def matmul(name, x, w):
        kinds[name] = type(w).__name__
        W = w.dequantize() if isinstance(w, PackedInt4) else w
        return jnp.einsum("...i,oi->...o", x, W.astype(x.dtype))

    toks = tokens(cfg, 7)
    out = jax.jit(Model(cfg, Hooks(matmul=matmul)).forward)(qp, toks)
    assert all(kinds[n] == "PackedInt4" for n in linear_names(cfg)) and "lm_head" in kinds
    np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(qp, toks)), rtol=1e-5, atol=1e-5)


_UIDS = itertools.count()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Record(kvcache.KVCodec):
    """A scoring-only codec: records what it is given and returns it (or zeros)."""

    log: list = dataclasses.field(default_factory=list, compare=False, hash=False)
    zero: bool = False
    uid: int = dataclasses.field(default_factory=lambda: next(_UIDS))  # no jit cache sharing

    def fake(self, layer, x):
        self.log.append((layer, x))
        return jnp.zeros_like(x) if self.zero else x


@pytest.mark.parametrize("pre_rope", [False, True])
def test_kv_quant_hook(setup, pre_rope):
    cfg, _, p, fwd = setup
    keys, values = _Record(), _Record()
    kvq = kvcache.KVQuant(key=keys, value=values, pre_rope=pre_rope)
    toks = tokens(cfg, 8)
    out = jax.jit(Model(cfg, Hooks(kv_quant=kvq)).forward)(p, toks)
    assert [c[0] for c in keys.log] == [c[0] for c in values.log] == list(range(cfg.n_layers))
    shape = (B, T, cfg.n_kv_heads, cfg.head_dim)
    assert all(c[1].shape == shape for c in keys.log + values.log)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(p, toks)), rtol=1e-5, atol=1e-5)
    # what the codec returns is what attention uses
    zero_v = kvcache.KVQuant(key=_Record(), value=_Record(zero=True), pre_rope=pre_rope)
    changed = jax.jit(Model(cfg, Hooks(kv_quant=zero_v)).forward)(p, toks) - out
    assert float(jnp.max(jnp.abs(changed))) > 1e-3


def test_kv_hook_pre_rope_keys_rotate_into_post_rope_keys(setup):
    cfg, model, p, _ = setup
    h = model.embed(p, tokens(cfg, 9))
    got = {}
    for pre in (False, True):
        keys = _Record()
        kvq = kvcache.KVQuant(key=keys, value=kvcache.Identity(), pre_rope=pre)
        Model(cfg, Hooks(kv_quant=kvq)).apply_block(p["blocks"][0], 0, h)  # eager
        got[pre] = keys.log[0][1]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    rotated = apply_rope(got[True], pos, cfg.rope_inv_freq(0))
    np.testing.assert_allclose(np.asarray(rotated), np.asarray(got[False]), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got[True][:, 1:] - got[False][:, 1:]))) > 1e-3


def test_kv_quant_hook_must_be_a_policy(setup):
    cfg, _, p, _ = setup
    with pytest.raises(TypeError, match="KVQuant"):
        Model(cfg, Hooks(kv_quant=lambda layer, k, v: (k, v))).forward(p, tokens(cfg, 1))


def test_linear_seam_bias_and_shape_errors():
    x = jnp.ones((2, 3, 4), jnp.float32)
    w = jnp.arange(20, dtype=jnp.float32).reshape(5, 4)
    b = jnp.arange(5, dtype=jnp.float32)
    np.testing.assert_allclose(
        np.asarray(linear(x, w, b, name="t")), np.asarray(x @ w.T + b[None, None, :])
    )
    with pytest.raises(ValueError, match="does not take"):
        linear(x, w.T, name="t")
    with pytest.raises(TypeError, match="integer"):
        linear(x, w.astype(jnp.int32), name="t")


# ----------------------------------------------------------------------------- RoPE, config, table


@given(
    m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 500), seed=st.integers(0, 99)
)
def test_rope_scores_depend_only_on_relative_position(m, n, shift, seed):
    """RoFormer (arXiv:2104.09864) eq. 16: <R_m q, R_n k> = <q, R_{n-m} k>."""
    inv = rope_frequencies(16, 1e4)
    q, k = np.random.default_rng(seed).normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
    rot = lambda x, p: apply_rope(jnp.asarray(x), jnp.full((1, 1), p, jnp.int32), inv)
    s1 = float(jnp.sum(rot(q, m) * rot(k, n)))
    s2 = float(jnp.sum(rot(q, m + shift) * rot(k, n + shift)))
    assert abs(s1 - s2) <= 2e-3 * (1 + abs(s1))
    assert (
        abs(float(jnp.linalg.norm(rot(q, m))) - float(np.linalg.norm(q)))
        < 1e-4 * float(np.linalg.norm(q)) + 1e-6
    )


def test_rope_frequency_scalings():
    base = rope_frequencies(64, 5e5)
    np.testing.assert_allclose(rope_frequencies(64, 5e5, scaling="linear", factor=4.0), base / 4.0)
    l3 = rope_frequencies(
        64,
        5e5,
        scaling="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_len=8192,
    )
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(l3[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high freq kept
    np.testing.assert_allclose(l3[wavelen > 8192], base[wavelen > 8192] / 8.0)  # low freq scaled
    assert np.all(l3 <= base) and np.all(l3 >= base / 8.0)
    with pytest.raises(ValueError, match="scaling"):
        rope_frequencies(64, 1e4, scaling="yarn")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_kv_heads=3), "multiple"),
        (dict(layer_types=("global",)), "entries"),
        (dict(layer_types=("local", "local")), "sliding_window"),
        (dict(layer_types=("fast", "global")), "global"),
        (dict(dtype="float16"), "dtype"),
        (dict(head_dim=7), "even"),
        (dict(d_model=0), "positive"),
        (dict(family="gpt2"), "family"),
        (dict(mlp_activation="relu"), "activation"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_config_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(LLAMA, **change)


def test_bad_tokens_and_block_index():
    p, m = _PARAMS["llama"], Model(LLAMA)
    with pytest.raises(TypeError, match="integer"):
        m.forward(p, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(TypeError, match="integer"):
        m.forward(p, jnp.zeros((4,), jnp.int32))
    with pytest.raises(IndexError):
        m.block(p, LLAMA.n_layers, jnp.zeros((1, 2, LLAMA.d_model), jnp.float32))
    with pytest.raises(KeyError, match="no parameter"):
        get_param(p, "blocks.0.attn.w_proj")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_adapter_table_covers_each_linear_once_and_names_exist(family):
    cfg, p = CONFIGS[family], _PARAMS[family]
    names = [n for g in ADAPTERS[family] for n in g.names]
    assert sorted(names) == sorted(BLOCK_LINEARS) and len(set(names)) == len(names)
    blk = p["blocks"][0]
    for g in ADAPTERS[family]:
        shapes = {get_param(blk, n).shape[1] for n in g.names}
        assert len(shapes) == 1  # members share an input width
        if g.norm:
            assert get_param(blk, g.norm).shape == (cfg.d_model,)
        if g.prev:
            assert g.prev in BLOCK_LINEARS
    assert get_param(blk, "mlp.up_proj").shape[0] == get_param(blk, "mlp.down_proj").shape[1]
    assert len(linear_names(cfg)) == cfg.n_layers * len(BLOCK_LINEARS)


def test_capture_mode_returns_each_linear_input(setup):
    cfg, model, p, _ = setup
    h = model.embed(p, tokens(cfg, 10))
    out, ins = model.apply_block(p["blocks"][0], 0, h, capture=True)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(model.apply_block(p["blocks"][0], 0, h)), rtol=1e-6
    )
    assert set(ins) == set(BLOCK_LINEARS) | set(KV_SITES) | {OUTPUT_SITE}
    np.testing.assert_array_equal(np.asarray(ins["attn.q_proj"]), np.asarray(ins["attn.v_proj"]))
    assert ins["mlp.down_proj"].shape == (B, T, cfg.d_ff)
    kv = cfg.n_kv_heads * cfg.head_dim
    assert all(ins[s].shape == (B, T, kv) for s in KV_SITES)
    np.testing.assert_array_equal(np.asarray(ins[OUTPUT_SITE]), np.asarray(out))
    # the values are v_proj's output; the keys before RoPE are k_proj's (after q/k norm)
    v = np.asarray(ins["attn.v_proj"]) @ np.asarray(p["blocks"][0]["attn"]["v_proj"]).T
    np.testing.assert_allclose(np.asarray(ins["attn.v"]), v, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(ins["attn.k"]), np.asarray(ins["attn.k_pre_rope"]))
