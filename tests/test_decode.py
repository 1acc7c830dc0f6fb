"""Generation with a KV cache (harness.decode, harness.kvcache).

* Full-precision cached decoding gives the uncached forward's logits at every position.
* A quantized cache: every step's logits equal those of scoring the whole sequence under the
  same hook (both give query t the cache as it stood after token t), for random policies —
  windows, flush sizes, chunked codecs, sink tokens, keys before RoPE.
* The cache holds what the codec stores (integer codes, not floats), and bad input raises
  before anything is written.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import kvcache
from harness.decode import Decoder
from harness.layers import Hooks
from harness.model import Model, ModelConfig, init_params
from methods.kivi import KIVIConfig, kv_quant

LLAMA = ModelConfig(
    vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=64
)
GEMMA = ModelConfig(
    family="gemma3", vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=1,
    head_dim=32, d_ff=64, qk_norm=True, post_norms=True, embed_scale=True,
    layer_types=("local", "local", "global"), sliding_window=8, rope_local_theta=1e4,
    mlp_activation="gelu_tanh",
)  # fmt: skip
ATOL = 1e-4  # float32 logits of order 1: reassociated sums differ in the last bits (~1e-6)


def _tokens(cfg, shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def _decode_all(dec, params, toks, n_prompt):
    """Prompt logits, then one step per remaining token: logits ``[B, T, V]``."""
    logits, state = dec.prefill(params, toks[:, :n_prompt])
    out = [logits]
    for t in range(n_prompt, toks.shape[1]):
        step, state = dec.step(params, state, toks[:, t])
        out.append(step[:, None])
    return jnp.concatenate(out, axis=1), state


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA], ids=["llama", "gemma3"])
def test_full_precision_cache_gives_the_uncached_logits_at_every_position(cfg):
    params = init_params(cfg, 1)
    toks = _tokens(cfg, (2, 24))
    model = Model(cfg)
    want = model.forward(params, toks)
    got, state = _decode_all(Decoder(model, capacity=32), params, toks, 5)
    assert state.length == 24
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ATOL)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_steps_equal_scoring_the_whole_sequence(bits):
    params = init_params(LLAMA, 2)
    toks = _tokens(LLAMA, (2, 70), 3)
    model = Model(LLAMA, Hooks(kv_quant=kv_quant(KIVIConfig(bits=bits, group=16, residual=32))))
    want = model.forward(params, toks)
    got, _ = _decode_all(Decoder(model, capacity=80), params, toks, 20)  # flushes at 33, 65
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ATOL)
    plain = Model(LLAMA).forward(params, toks)
    assert float(jnp.max(jnp.abs(want - plain))) > 100 * ATOL  # the cache is quantized


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid(kvcache.KVCodec):
    """A test codec: int8 codes on a per-chunk, per-channel absmax grid of ``levels``."""

    levels: int = 3

    def encode(self, layer, x):
        s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / self.levels + 1e-6
        return {"q": jnp.round(x / s).astype(jnp.int8), "s": s}

    def decode(self, layer, code):
        return code["q"].astype(jnp.float32) * code["s"]

    def element_bits(self, head_dim):
        return 3.0 + 32.0 / self.chunk


policies = st.builds(
    lambda kc, kf, kw, vc, vf, vw, sink, pre: kvcache.KVQuant(
        key=Grid(chunk=kc, flush=kc * kf, window=kw),
        value=Grid(chunk=vc, flush=vc * vf, window=vw, levels=2),
        sink=sink, pre_rope=pre,
    ),  # fmt: skip
    st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(0, 5),
    st.sampled_from([1, 2]), st.integers(1, 3), st.integers(0, 5),
    st.integers(0, 3), st.booleans(),
)  # fmt: skip


@settings(max_examples=8, deadline=None)
@given(kvq=policies, n_prompt=st.integers(1, 12), cfg=st.sampled_from([LLAMA, GEMMA]))
def test_any_policy_decodes_as_it_scores(kvq, n_prompt, cfg):
    params = init_params(cfg, 4)
    toks = _tokens(cfg, (1, 24), 5)
    model = Model(cfg, Hooks(kv_quant=kvq))
    want = model.forward(params, toks)
    got, _ = _decode_all(Decoder(model, capacity=24), params, toks, n_prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ATOL)


def test_quantized_prefix_and_bits_per_element():
    keys = Grid(chunk=4, window=1, flush=8)
    assert [kvcache.quantized_prefix(keys, L) for L in (1, 8, 9, 16, 17, 25)] == [
        0,
        0,
        8,
        8,
        16,
        24,
    ]
    np.testing.assert_array_equal(kvcache.quantized_prefix(keys, np.array([9, 17])), [8, 16])
    past_only = Grid(window=1)
    assert kvcache.quantized_prefix(past_only, 5) == 4
    kvq = kvcache.KVQuant(key=past_only, value=past_only, sink=2)
    # 10 tokens: 2 sink + 1 current in 16 bits, 7 quantized at 3 + 32 bits
    assert kvq.bits_per_element(10, 32) == pytest.approx((7 * 35 + 3 * 16) / 10)
    assert kvcache.FULL.bits_per_element(100, 64) == 16


def test_the_cache_holds_codes_and_counts_its_bits():
    params = init_params(LLAMA, 0)
    toks = _tokens(LLAMA, (1, 40))
    cap, kivi = 256, KIVIConfig(bits=2, group=16, residual=16)
    kvq = kv_quant(kivi)
    _, s_fp = Decoder(Model(LLAMA), capacity=cap).prefill(params, toks)
    _, s_q = Decoder(Model(LLAMA, Hooks(kv_quant=kvq)), capacity=cap).prefill(params, toks)
    layer = s_q.layers[0]
    codes = [a for a in jax.tree.leaves(layer["kq"]) + jax.tree.leaves(layer["vq"])
             if jnp.issubdtype(a.dtype, jnp.integer)]  # fmt: skip
    assert codes and all(a.dtype == jnp.uint32 for a in codes)  # packed 2-bit codes
    # the stores hold exactly what element_bits counts: codes + fp16 scales and zero points
    D, H = LLAMA.head_dim, LLAMA.n_kv_heads
    bits = kvq.key.element_bits(D) + kvq.value.element_bits(D)
    stored = kvcache.cache_bytes([layer["kq"], layer["vq"]])
    assert stored == cap * H * D * bits / 8
    assert kvcache.cache_bytes(s_q.layers) < 0.3 * kvcache.cache_bytes(s_fp.layers)


def test_generate_greedy_sampled_and_stop_token():
    params = init_params(LLAMA, 0)
    dec = Decoder(Model(LLAMA), capacity=32)
    prompt = _tokens(LLAMA, (1, 6))
    g = dec.generate(params, prompt, max_new_tokens=8)
    assert g.tokens.shape == (1, 8) and g.state.length == 6 + 7
    # greedy: each token is the argmax of the logits it was drawn from, which are the
    # uncached forward's at the previous position
    seq = jnp.concatenate([prompt, jnp.asarray(g.tokens)], axis=1)
    want = Model(LLAMA).forward(params, seq)[:, 5:-1]
    np.testing.assert_allclose(g.logits, np.asarray(want), atol=ATOL)
    assert (g.tokens == np.argmax(g.logits, -1)).all()
    a = dec.generate(params, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    b = dec.generate(params, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    c = dec.generate(params, prompt, max_new_tokens=8, temperature=1.0, seed=4)
    assert (a.tokens == b.tokens).all() and not (a.tokens == c.tokens).all()
    stop = int(g.tokens[0, 2])
    s = dec.generate(params, prompt, max_new_tokens=8, stop_token=stop)
    first = int(np.argmax(g.tokens[0] == stop))
    assert s.tokens.shape[1] == first + 1 and s.tokens[0, -1] == stop


def test_bad_input_is_refused_before_the_cache_changes():
    params = init_params(LLAMA, 0)
    dec = Decoder(Model(LLAMA), capacity=16)
    with pytest.raises(ValueError, match="longer than the cache"):
        dec.prefill(params, _tokens(LLAMA, (1, 17)))
    with pytest.raises(ValueError, match="overflow the cache capacity"):
        dec.generate(params, _tokens(LLAMA, (1, 10)), max_new_tokens=8)
    _, state = dec.prefill(params, _tokens(LLAMA, (1, 15)))
    _, state = dec.step(params, state, jnp.asarray([1]))
    before = jax.tree.map(np.asarray, state.layers)
    with pytest.raises(ValueError, match="cache is full"):
        dec.step(params, state, jnp.asarray([1]))
    after = jax.tree.leaves(state.layers)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), after, strict=True))
    with pytest.raises(ValueError, match="longer than the model's context"):
        Decoder(Model(LLAMA), capacity=LLAMA.max_seq_len + 1)
    kivi = Model(LLAMA, Hooks(kv_quant=kv_quant(KIVIConfig(group=16, residual=32))))
    with pytest.raises(ValueError, match="not a multiple of the key codec's chunk 16"):
        Decoder(kivi, capacity=40)
    with pytest.raises(ValueError, match="bits=5"):
        KIVIConfig(bits=5)
    with pytest.raises(ValueError, match="multiple of the group"):
        KIVIConfig(group=32, residual=48)
    with pytest.raises(ValueError, match="empty prompt"):
        dec.prefill(params, jnp.zeros((1, 0), jnp.int32))
    with pytest.raises(ValueError, match="flush=3 is not a multiple of chunk=2"):
        Grid(chunk=2, flush=3)


def test_steps_compile_once():
    params = init_params(LLAMA, 0)
    dec = Decoder(Model(LLAMA, Hooks(kv_quant=kv_quant(KIVIConfig(group=16, residual=16)))),
                  capacity=64)  # fmt: skip
    events = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    _, state = dec.prefill(params, _tokens(LLAMA, (1, 8)))
    _, state = dec.step(params, state, jnp.asarray([1]))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for t in range(30):  # crosses flushes at lengths 17 and 33
            logits, state = dec.step(params, state, jnp.asarray([t % LLAMA.vocab_size]))
        jax.block_until_ready(logits)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert events == [], f"{len(events)} compilation(s) over 30 steps"
