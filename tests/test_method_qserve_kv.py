"""QServe KV4 + SmoothAttention: decoding = scoring, λ (RoPE pairs shared, commutes with RoPE),
the in-codec smoothing = folding λ into W_q / W_k, the KV4 codec's invariants, SmoothAttention
helps keys with outlier channels, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.decode import Decoder
from harness.layers import apply_rope
from harness.model import Model, ModelConfig, init_params
from methods.base import get_method
from methods.qserve_kv import (
    QServeKVConfig,
    QServeKVPlainConfig,
    TokenHeadCodec,
    fold_smooth_attention,
    kv_quant,
    quantize_model,
    smooth_attention_scales,
    smooth_scales,
)

CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, 0)
    # one outlier channel pair in each layer's keys (as LLM keys have), so λ is not flat
    blocks = []
    for b in params["blocks"]:
        k = b["attn"]["k_proj"].at[3].multiply(8.0).at[3 + 8].multiply(8.0)
        blocks.append(dict(b, attn=dict(b["attn"], k_proj=k)))
    params = dict(params, blocks=blocks)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, CFG.vocab_size, size=(4, 32)).astype(np.int32)
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 24)).astype(np.int32)
    return params, calib, tokens


@pytest.fixture(scope="module")
def result(tiny):
    params, calib, _ = tiny
    return quantize_model(params, CFG, calib, QServeKVConfig())


def test_decoding_equals_scoring(tiny):
    """On the unscaled tiny model (keys of O(1): RoPE's float differences between the two paths
    stay far from INT4 rounding boundaries)."""
    _, calib, tokens = tiny
    params = init_params(CFG, 0)
    model = Model(CFG, quantize_model(params, CFG, calib, QServeKVConfig()).hooks)
    full = np.asarray(model.forward(params, tokens))
    dec = Decoder(model, capacity=32)
    P = 7
    logits, state = dec.prefill(params, tokens[:, :P])
    np.testing.assert_allclose(np.asarray(logits), full[:, :P], atol=1e-4, rtol=1e-4)
    for t in range(P, tokens.shape[1]):
        step, state = dec.step(params, state, tokens[:, t])
        np.testing.assert_allclose(
            np.asarray(step).reshape(full[:, t].shape), full[:, t], atol=1e-4, rtol=1e-4
        )


def test_result_is_the_paper_configuration(result):
    kvq = result.hooks.kv_quant
    assert not kvq.pre_rope and kvq.sink == 0 and kvq.all_quantized
    assert kvq.key.bits == kvq.value.bits == 4
    assert len(kvq.key.smooth) == CFG.n_layers and not kvq.value.smooth
    assert result.kv_bits == pytest.approx(4 + 32 / 16)  # fp16 scale + zero per token and head


def test_lambda_pairs_and_rope():
    m = jnp.asarray(np.random.default_rng(1).uniform(0.1, 9.0, size=32), jnp.float32)
    lam = np.asarray(smooth_attention_scales(m, 16, 0.5))
    per_head = np.asarray(m).reshape(2, 2, 8)
    expect = np.sqrt(np.maximum(per_head[:, 0], per_head[:, 1]))  # the pair's larger max, ^α
    np.testing.assert_allclose(lam.reshape(2, 2, 8), np.stack([expect, expect], 1), rtol=1e-6)
    # a diagonal scale shared by each RoPE pair commutes with RoPE
    k = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    inv = CFG.rope_inv_freq(0)
    lam4 = jnp.asarray(lam.reshape(1, 1, 2, 16))
    np.testing.assert_allclose(
        np.asarray(apply_rope(k / lam4, pos, inv)),
        np.asarray(apply_rope(k, pos, inv) / lam4),
        atol=1e-6,
    )
    # a dead channel pair gets λ = 1; α = 0 is no smoothing
    dead = np.asarray(smooth_attention_scales(m.at[:8].set(0.0).at[8:16].set(0.0), 16, 0.5))
    assert np.all(dead[:16] == 1.0)
    assert np.all(np.asarray(smooth_attention_scales(m, 16, 0.0)) == 1.0)


def test_codec_smoothing_equals_folding_into_weights(tiny, result):
    """Λ in the codec (weights untouched) = Λ folded into W_q and W_k with the plain codec."""
    params, calib, tokens = tiny
    lam = result.hooks.kv_quant.key.smooth
    blocks = []
    for i, b in enumerate(params["blocks"]):
        a = b["attn"]
        wq, wk, _, _ = fold_smooth_attention(
            a["q_proj"], a["k_proj"], jnp.asarray(lam[i], jnp.float32),
            n_heads=CFG.n_heads, n_kv_heads=CFG.n_kv_heads,
        )  # fmt: skip
        blocks.append(dict(b, attn=dict(a, q_proj=wq, k_proj=wk)))
    folded = dict(params, blocks=blocks)
    # without KV quantization the fold changes nothing
    fp = np.asarray(Model(CFG).forward(params, tokens))
    np.testing.assert_allclose(np.asarray(Model(CFG).forward(folded, tokens)), fp, atol=1e-4)
    plain = kv_quant(QServeKVPlainConfig())
    in_codec = np.asarray(Model(CFG, result.hooks).forward(params, tokens))
    by_fold = np.asarray(
        Model(CFG, dataclasses.replace(result.hooks, kv_quant=plain)).forward(folded, tokens)
    )
    unsmoothed = np.asarray(
        Model(CFG, dataclasses.replace(result.hooks, kv_quant=plain)).forward(params, tokens)
    )
    # equal up to float rounding (a code on a rounding boundary may flip) ...
    assert np.mean(np.abs(in_codec - by_fold)) < 1e-3
    # ... and far from the unsmoothed cache
    assert np.mean(np.abs(in_codec - unsmoothed)) > 20 * np.mean(np.abs(in_codec - by_fold))


def test_codec_invariants():
    x = jax.random.normal(jax.random.key(2), (3, 1, 2, 16)) * 3.0
    codec = TokenHeadCodec(bits=4)
    code = codec.encode(0, x)
    assert code.codes.dtype == jnp.uint8 and int(code.codes.max()) <= 15
    assert code.scale.shape == (3, 1, 2, 1) and code.scale.dtype == jnp.float16
    assert code.zero.shape == (3, 1, 2, 1)
    out = codec.decode(0, code)
    assert out.shape == x.shape and out.dtype == jnp.float32
    s = np.asarray(code.scale, np.float32)
    assert np.all(np.abs(np.asarray(out - x)) <= s / 2 + 1e-5)  # within half a step
    assert codec.element_bits(64) == 4.5 and codec.element_bits(128) == 4.25
    # per token: a token's stored value does not depend on the others
    one = codec.decode(0, codec.encode(0, x[1:2]))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(out[1:2]))


def test_smoothing_helps_keys_with_outlier_channels():
    """The paper's Fig. 7 premise: a few key channels are far larger than the rest; dividing by
    λ = max|K|^0.5 evens the channels, and the error of the attention scores q·k̂ drops."""
    rng = np.random.default_rng(4)
    k = rng.normal(size=(1, 512, 2, 16)).astype(np.float32)
    k[..., [2, 10]] *= 10.0  # a RoPE pair of outlier channels per head
    k = jnp.asarray(k)
    q = jnp.asarray(rng.normal(size=(64, 2, 16)).astype(np.float32))
    lam = smooth_attention_scales(jnp.max(jnp.abs(k), axis=(0, 1)).reshape(-1), 16, 0.5)
    smooth = TokenHeadCodec(bits=4, smooth=(tuple(float(v) for v in lam),))
    plain = TokenHeadCodec(bits=4)
    score_err = lambda c: float(jnp.mean(
        jnp.einsum("qhd,bthd->qht", q, c.decode(0, c.encode(0, k)) - k) ** 2
    ))  # fmt: skip
    assert score_err(smooth) < 0.5 * score_err(plain)


def test_plain_ablation(tiny):
    params, calib, _ = tiny
    qm = get_method("qserve_kv_plain").quantize_model(params, CFG, calib, QServeKVPlainConfig())
    assert not qm.hooks.kv_quant.key.smooth and qm.report == []


@pytest.mark.parametrize(
    "kw, match", [({"bits": 5}, "bits"), ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha")]
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        QServeKVConfig(**kw)


def test_bad_statistics_and_shapes(tiny):
    params, calib, _ = tiny
    m = jnp.ones((32,), jnp.float32)
    with pytest.raises(ValueError, match="NaN"):
        smooth_attention_scales(m.at[0].set(jnp.nan), 16, 0.5)
    with pytest.raises(ValueError, match="dead"):
        smooth_attention_scales(jnp.zeros((32,), jnp.float32), 16, 0.5)
    with pytest.raises(ValueError, match="even head_dim"):
        smooth_attention_scales(m, 12, 0.5)
    with pytest.raises(ValueError, match="do not fit"):
        fold_smooth_attention(jnp.ones((48, 8)), jnp.ones((32, 8)), m, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="needs the per-layer"):
        kv_quant(QServeKVConfig())
    with pytest.raises(ValueError, match="non-empty"):
        smooth_scales(params, CFG, np.zeros((0, 4), np.int32), 0.5)
    dead = dict(params, blocks=[dict(b, attn=dict(b["attn"])) for b in params["blocks"]])
    dead["blocks"][1]["attn"]["k_proj"] = jnp.zeros_like(params["blocks"][1]["attn"]["k_proj"])
    with pytest.raises(ValueError, match="layer 1.*dead"):
        quantize_model(dead, CFG, calib, QServeKVConfig())
