"""BFP KV cache with K-sort (arXiv 2403.20137): the codec's invariants, K-sort's permutation
and its effect, decoding against scoring, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.decode import Decoder
from harness.model import Model, ModelConfig, init_params
from methods.base import get_method
from methods.bfp_kv import (
    BFPCodec,
    BFPKVConfig,
    PlainBFPKVConfig,
    channel_magnitudes,
    permutations,
    quantize_model,
)
from methods.bfp_kv.core import head_block, ksort, wk_norms
from methods.compare import config_for
from numerics.config import block_fp
from numerics.quantize import fake_quant

# GQA (6 query heads on 2 key heads), head_dim 32: blocks of 16 give two blocks per head.
CFG = ModelConfig(
    vocab_size=96, d_model=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32, d_ff=96,
    max_seq_len=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, 0)
    calib = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 24)).astype(np.int32)
    return params, calib


def keys_with_outliers(seed=0, shape=(2, 40, 3, 32), n_out=4):
    """Keys whose large channels are fixed (as in LLMs) and spread over the blocks."""
    rng = np.random.default_rng(seed)
    scale = np.ones(shape[-1])
    scale[rng.choice(shape[-1], n_out, replace=False)] = 30.0
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def roundtrip(codec, x, layer=0):
    return codec.decode(layer, codec.encode(layer, x))


def sqnr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2))


# ------------------------------------------------------------------------------- the codec


@pytest.mark.parametrize("bits,block", [(4, 16), (4, 32), (8, 32), (3, 8)])
def test_codec_shapes_and_bits(bits, block):
    c = BFPCodec(bits=bits, block=block)
    x = keys_with_outliers(shape=(2, 1, 3, 32))
    code = c.encode(0, x)
    assert code.codes.shape == x.shape and code.codes.dtype == jnp.uint8
    assert roundtrip(c, x).shape == x.shape and roundtrip(c, x).dtype == jnp.float32
    b = head_block(block, 32)
    assert c.element_bits(32) == pytest.approx(bits + 8 / b)


def test_codec_is_numerics_block_fp_and_idempotent():
    x = keys_with_outliers(1)
    y = roundtrip(BFPCodec(bits=4, block=16), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fake_quant(x, block_fp(4, 16))))
    np.testing.assert_array_equal(np.asarray(roundtrip(BFPCodec(bits=4, block=16), y)), y)


def test_grid_values_are_exact():
    """A block whose max lands in [2^(M−2), 2^(M−1)) of the mantissa grid round-trips exactly."""
    rng = np.random.default_rng(2)
    m = rng.integers(-7, 8, size=(1, 1, 2, 32)).astype(np.float32)
    m[..., ::16] = 7.0  # each 16-block's max is 7 = 0b111
    x = jnp.asarray(m * 2.0**-3)
    np.testing.assert_array_equal(np.asarray(roundtrip(BFPCodec(bits=4, block=16), x)), m / 8)


def test_permuted_codec_is_unpermute_of_quantized_permuted_keys():
    x = keys_with_outliers(3)
    perm = ksort(np.abs(np.asarray(x)).max(axis=(0, 1)))  # [3, 32]
    c = BFPCodec(bits=4, block=16, perm=(tuple(map(tuple, perm.tolist())),))
    kp = jnp.take_along_axis(x, jnp.broadcast_to(jnp.asarray(perm), x.shape), axis=-1)
    q = fake_quant(kp, block_fp(4, 16))
    inv = jnp.asarray(np.argsort(perm, axis=-1))
    want = jnp.take_along_axis(q, jnp.broadcast_to(inv, x.shape), axis=-1)
    np.testing.assert_array_equal(np.asarray(roundtrip(c, x)), np.asarray(want))


def test_scores_equal_the_folded_form():
    """q · decode(encode(k)) = q[π] · Q(k[π]): the codec's form is the paper's fold into W_q."""
    x = keys_with_outliers(4, shape=(1, 40, 1, 32))
    q = jnp.asarray(np.random.default_rng(5).normal(size=(1, 40, 1, 32)), jnp.float32)
    perm = ksort(np.abs(np.asarray(x)).max(axis=(0, 1)))
    c = BFPCodec(bits=4, block=16, perm=(tuple(map(tuple, perm.tolist())),))
    take = lambda a: jnp.take_along_axis(a, jnp.broadcast_to(jnp.asarray(perm), a.shape), -1)
    ours = jnp.einsum("bthd,bshd->bts", q, roundtrip(c, x))
    folded = jnp.einsum("bthd,bshd->bts", take(q), fake_quant(take(x), block_fp(4, 16)))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(folded), rtol=1e-5, atol=1e-4)


def test_ksort_lowers_the_key_error_and_is_a_no_op_at_one_block_per_head():
    """With the 4 outlier channels (30×) sorted into the first block, the second block's 16
    channels no longer share an exponent with an outlier: their error falls by well over 10 dB
    (the outliers' 30× is ≈ 30 dB), and the error of all normal channels falls too."""
    x = keys_with_outliers(6)
    big = np.abs(np.asarray(x)).max(axis=(0, 1, 2)) > 20.0
    perm = ksort(np.abs(np.asarray(x)).max(axis=(0, 1)))  # [3, 32]
    p = (tuple(map(tuple, perm.tolist())),)
    clean = np.zeros((3, 32), bool)
    np.put_along_axis(clean, perm[:, 16:], True, axis=-1)
    e2 = lambda y: (np.asarray(y, np.float64) - np.asarray(x, np.float64)) ** 2
    plain = e2(roundtrip(BFPCodec(bits=4, block=16), x))
    sorted_ = e2(roundtrip(BFPCodec(bits=4, block=16, perm=p), x))
    assert 10 * np.log10(plain[..., clean].sum() / sorted_[..., clean].sum()) > 10.0
    assert sorted_[..., ~big].sum() < plain[..., ~big].sum()
    whole = lambda perm: roundtrip(BFPCodec(bits=4, block=32, perm=perm), x)
    np.testing.assert_array_equal(np.asarray(whole(p)), np.asarray(whole(None)))


def test_ksort_orders_channels_by_descending_magnitude():
    m = np.array([[1.0, 5.0, 3.0, 5.0], [0.5, 0.1, 0.2, 0.9]])
    np.testing.assert_array_equal(ksort(m), [[1, 3, 2, 0], [3, 0, 2, 1]])


def test_wk_norms_are_row_norms_per_head():
    W = np.random.default_rng(7).normal(size=(2 * 32, 64))
    n = wk_norms(W, 2)
    assert n.shape == (2, 32)
    np.testing.assert_allclose(n[1, 5], np.linalg.norm(W[32 + 5]))


def test_k_absmax_is_the_captured_post_rope_key_absmax(setup):
    params, calib = setup
    mags = channel_magnitudes(params, CFG, calib, "k_absmax")
    model = Model(CFG)
    h = model.embed(params, calib)
    _, ins = model.apply_block(params["blocks"][0], 0, h, capture=True)
    want = np.abs(np.asarray(ins["attn.k"])).max(axis=(0, 1)).reshape(2, 32)
    np.testing.assert_allclose(mags[0], want, rtol=1e-6)


# ------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("sort", ["wk_norm", "k_absmax", "none"])
def test_decoding_equals_scoring(setup, sort):
    """Prefill + steps through the stored cache give the logits of scoring the whole sequence
    (each query sees keys exactly as the codec stored them, permutation included)."""
    params, calib = setup
    qm = quantize_model(params, CFG, calib, BFPKVConfig(bits=4, block=16, sort=sort))
    toks = np.random.default_rng(8).integers(0, CFG.vocab_size, (2, 20)).astype(np.int32)
    model = Model(CFG, qm.hooks)
    want = np.asarray(jax.jit(model.forward)(params, toks))
    dec = Decoder(model, capacity=32)
    logits, state = dec.prefill(params, toks[:, :8])
    got = [np.asarray(logits)]
    for t in range(8, 20):
        step, state = dec.step(params, state, toks[:, t])
        got.append(np.asarray(step).reshape(2, 1, -1))
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(want, np.asarray(Model(CFG).forward(params, toks)), atol=1e-4)


def test_result_bits_and_report(setup):
    params, calib = setup
    qm = quantize_model(params, CFG, calib, BFPKVConfig())  # block 32 = head_dim here
    keys, values = qm.report
    assert keys["format"] == "BFP12" and keys["bits"] == pytest.approx(4 + 8 / 32)
    assert values["format"] == "BFP16" and values["bits"] == pytest.approx(8 + 8 / 32)
    assert qm.kv_bits == pytest.approx((4.25 + 8.25) / 2)
    assert qm.seconds > 0


def test_settings_map_bits_to_key_mantissas():
    cfg = config_for(get_method("bfp_kv"), 3, None)
    assert cfg == BFPKVConfig(bits=3) and cfg.sort == "wk_norm"
    plain = config_for(get_method("bfp_kv_nosort"), 8, None)
    assert plain == PlainBFPKVConfig(bits=8) and plain.sort == "none"


def test_sort_is_the_only_difference(setup):
    params, calib = setup
    a = quantize_model(params, CFG, calib, BFPKVConfig(bits=4, block=16))
    b = quantize_model(params, CFG, calib, PlainBFPKVConfig(bits=4, block=16))
    assert a.hooks.kv_quant.value == b.hooks.kv_quant.value
    assert b.hooks.kv_quant.key.perm is None and a.hooks.kv_quant.key.perm is not None
    assert dataclasses.replace(a.hooks.kv_quant.key, perm=None) == b.hooks.kv_quant.key


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw,match",
    [({"bits": 7}, "bits"), ({"bits": 99}, "bits"), ({"value_bits": 1}, "value_bits"),
     ({"block": 12}, "block"), ({"value_block": 0}, "value_block"), ({"sort": "rms"}, "sort")],
)  # fmt: skip
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        BFPKVConfig(**kw)


def test_block_must_divide_head_dim(setup):
    params, calib = setup
    cfg = dataclasses.replace(CFG, head_dim=24, n_heads=6, n_kv_heads=2)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        quantize_model(init_params(cfg, 0), cfg, calib, BFPKVConfig(block=16))


def test_nan_and_dead_statistics(setup):
    params, calib = setup
    bad = jax.tree.map(lambda a: a, params)
    wk = np.asarray(bad["blocks"][1]["attn"]["k_proj"]).copy()
    wk[3, 0] = np.nan
    bad["blocks"][1]["attn"]["k_proj"] = jnp.asarray(wk)
    with pytest.raises(ValueError, match="layer 1.*not finite"):
        quantize_model(bad, CFG, calib, BFPKVConfig())
    wk = np.asarray(params["blocks"][0]["attn"]["k_proj"]).copy()
    wk[32:] = 0.0  # key head 1 is dead
    bad["blocks"][1]["attn"]["k_proj"] = params["blocks"][1]["attn"]["k_proj"]
    bad["blocks"][0]["attn"]["k_proj"] = jnp.asarray(wk)
    with pytest.raises(ValueError, match=r"layer 0.*\[1\].*dead"):
        quantize_model(bad, CFG, calib, BFPKVConfig())


def test_empty_calibration_for_k_absmax(setup):
    params, _ = setup
    with pytest.raises(ValueError, match="calibration tokens"):
        quantize_model(params, CFG, np.zeros((0, 8), np.int32), BFPKVConfig(sort="k_absmax"))


def test_bad_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        BFPCodec(perm=(((0, 0, 1),),))
    p = permutations([np.array([[2.0, 1.0, 3.0]])])
    assert p == (((2, 0, 1),),)
