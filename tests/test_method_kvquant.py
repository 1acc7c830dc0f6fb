"""KVQuant (arXiv 2401.18079): decoding reads the cache scoring reads, the codecs' invariants
(exact outliers, nearest levels, the reference's uniform quantizer, per-token outlier counts,
bits), Fisher from activation gradients, Q-Norm's moments, the ablation switches, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.decode import Decoder
from harness.model import Model, ModelConfig, get_param, init_params
from methods import get_method
from methods.compare import config_for
from methods.kvquant import ChannelKeys, KVQuantConfig, TokenValues, calibrate, quantize_model
from methods.kvquant.calib import kv_calibration, kv_gradients
from methods.kvquant.core import (
    calibrate_keys,
    calibrate_values,
    fit_levels,
    token_outliers,
    token_ranges,
)
from methods.squeezellm import sequence_loss

TINY = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=32
)
C = TINY.n_kv_heads * TINY.head_dim


@pytest.fixture(scope="module")
def tiny():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (4, 24)).astype(np.int32)
    return params, tokens


@pytest.fixture(scope="module")
def qm(tiny):
    params, tokens = tiny
    return quantize_model(params, TINY, tokens, KVQuantConfig())


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("ablate", [{}, {"pre_rope": False, "sink": 0, "outliers": 0.0}])
def test_decoder_matches_scoring(tiny, qm, ablate):
    """Prefill + steps over the stored cache give the logits of scoring the whole sequence."""
    params, tokens = tiny
    q = qm if not ablate else quantize_model(params, TINY, tokens, KVQuantConfig(**ablate))
    model = Model(TINY, q.hooks)
    seq = jnp.asarray(tokens[:2, :14])
    full = np.asarray(model.forward(params, seq))
    dec = Decoder(model, capacity=16)
    logits, state = dec.prefill(params, seq[:, :5])
    np.testing.assert_allclose(np.asarray(logits), full[:, :5], atol=1e-4, rtol=1e-4)
    for t in range(5, 14):
        step, state = dec.step(params, state, seq[:, t])
        np.testing.assert_allclose(
            np.asarray(step).reshape(2, -1), full[:, t], atol=1e-4, rtol=1e-4
        )
    plain = np.asarray(Model(TINY).forward(params, seq))
    assert not np.allclose(full, plain, atol=1e-3)


def test_hook_is_the_paper_configuration(qm):
    kvq = qm.hooks.kv_quant
    assert kvq.pre_rope and kvq.sink == 1
    assert isinstance(kvq.key, ChannelKeys) and isinstance(kvq.value, TokenValues)
    assert (kvq.key.chunk, kvq.key.window, kvq.value.window) == (1, 0, 0)
    assert len(kvq.key.levels) == TINY.n_layers == len(kvq.value.recon)
    assert all(len(lv) == 8 for lv in kvq.key.levels + kvq.value.levels)


# ----------------------------------------------------------------------------- the codecs


def _keys_codec(bits=3, nuq=True, seed=0, outliers=0.01):
    K = jax.random.t(jax.random.key(seed), 3.0, (400, C)) * jnp.linspace(0.5, 4.0, C)[None, :]
    cfg = KVQuantConfig(bits=bits, nuq=nuq, outliers=outliers, fisher=False)
    u, lo, lv, frac = calibrate_keys(K, None, cfg, 0)
    codec = ChannelKeys(bits=bits, kv_heads=2, upper=(u,), lower=(lo,), levels=(lv.levels,),
                        recon=(lv.recon,), sparse=outliers > 0, outlier_frac=frac)  # fmt: skip
    return K, codec, frac


def test_keys_outliers_exact_and_inliers_on_their_level():
    K, codec, frac = _keys_codec()
    assert 0.006 <= frac <= 0.014  # percentiles at 0.5 % / 99.5 % per channel: ≈ 1 % outliers
    x = jax.random.t(jax.random.key(7), 3.0, (3, 1, 2, 16)) * 6.0
    code = codec.encode(0, x)
    back = np.asarray(codec.decode(0, code))
    assert back.shape == x.shape and code["codes"].dtype == jnp.uint8
    flat = np.asarray(x).reshape(3, 1, C).astype(np.float16).astype(np.float32)  # fp16 input
    rec = back.reshape(3, 1, C)
    u, lo = np.array(codec.upper[0]), np.array(codec.lower[0])
    out = (flat > u) | (flat < lo)
    assert out.any() and (~out).any()
    np.testing.assert_array_equal(rec[out], flat[out])
    z, s = (u + lo) / 2, (u - lo) / 2
    levels = np.array(codec.levels[0])
    xn = (flat - z) / s
    nearest = np.abs(xn[..., None] - levels).argmin(-1)
    expect = np.array(codec.recon[0])[nearest] * s + z
    np.testing.assert_allclose(rec[~out], expect[~out], rtol=1e-5, atol=1e-5)


def test_uniform_keys_are_the_reference_integer_quantizer():
    """nuq=False: the reference's ``quant_fn_zp`` (unrounded fp zero point, clipped codes)."""
    K, codec, _ = _keys_codec(bits=3, nuq=False, outliers=0.0)
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, 1, 2, 16))) * 3
    u, lo = np.array(codec.upper[0]), np.array(codec.lower[0])
    q = (2**3 - 1) / (u - lo)
    off = lo * q
    flat = x.reshape(5, 1, C).astype(np.float16).astype(np.float32)  # the codec reads fp16
    ref = (np.clip(np.round(q * flat - off), 0, 7) + off) / q
    got = np.asarray(codec.decode(0, codec.encode(0, jnp.asarray(x)))).reshape(5, 1, C)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert codec.element_bits(16) == 3.0


def test_value_outliers_per_token_exact():
    vals = TokenValues(bits=3, kv_heads=2, levels=(tuple(np.linspace(-1, 1, 8)),),
                       recon=(tuple(np.linspace(-1, 1, 8)),), outliers=0.01)  # fmt: skip
    x = jax.random.t(jax.random.key(5), 2.0, (4, 1, 2, 16))
    code = vals.encode(0, x)
    mask = np.asarray(code["mask"])
    assert (mask.sum(-1) == token_outliers(C, 0.01)).all() and token_outliers(C, 0.01) == 2
    flat = np.asarray(x).reshape(4, 1, C)
    np.testing.assert_array_equal(mask, (flat == flat.max(-1, keepdims=True))
                                  | (flat == flat.min(-1, keepdims=True)))  # fmt: skip
    back = np.asarray(vals.decode(0, code)).reshape(4, 1, C)
    np.testing.assert_array_equal(back[mask], flat[mask].astype(np.float16).astype(np.float32))
    # the inliers lie in [z − s, z + s]; uniform levels: error ≤ half a step (fp16 scales)
    s = np.asarray(code["s"], np.float32)
    assert (np.abs(back - flat)[~mask] <= (s / 7 * 1.01 + 1e-3).repeat(C, -1)[~mask]).all()


@pytest.mark.parametrize("width", [32, 192, 4096])
def test_token_outliers_counts_the_quantile_rule(width):
    """The reference's per-token rule (``≥`` / ``≤`` the linear-interpolated quantiles): 2 of
    192 (SmolLM2), 42 of LLaMA-7B's 4096 — its ``topk(21)`` per side."""
    v = jax.random.normal(jax.random.key(width), (6, width))
    mask, _, _ = token_ranges(v, 0.01)
    n = token_outliers(width, 0.01)
    assert (np.asarray(mask).sum(-1) == n).all()
    assert n == {32: 2, 192: 2, 4096: 42}[width]


def test_element_bits_hand_count():
    keys = ChannelKeys(bits=3, kv_heads=3, outlier_frac=0.01)
    assert keys.element_bits(64) == pytest.approx(3 + 0.01 * 32 + 32 / 192)
    vals = TokenValues(bits=3, kv_heads=3, outliers=0.01)
    assert vals.element_bits(64) == pytest.approx(3 + 32 / 192 + (2 * 32 + 32) / 192)
    assert TokenValues(bits=2, kv_heads=3, outliers=0.0).element_bits(64) == 2 + 32 / 192


# ----------------------------------------------------------------------------- calibration


def test_fisher_is_the_activation_gradient(tiny):
    """∂L/∂W_k = Σ_t (∂L/∂k_t) x_tᵀ: the tapped activation gradients rebuild jax.grad of the
    loss w.r.t. the k_proj / v_proj weights."""
    params, tokens = tiny
    seq = jnp.asarray(tokens[:1])
    per_layer = kv_gradients(params, TINY, seq)
    gw = jax.grad(lambda p: sequence_loss(p, TINY, seq[0]))(params)
    model = Model(TINY)
    h = model.embed(params, seq)
    for i, (_, _, gk, gv) in enumerate(per_layer):
        _, ins = model.apply_block(params["blocks"][i], i, h, capture=True)
        x = np.asarray(ins["attn.k_proj"][0])
        for g, name in ((gk, "k_proj"), (gv, "v_proj")):
            want = np.asarray(get_param(gw, f"blocks.{i}.attn.{name}"))
            np.testing.assert_allclose(np.asarray(g).T @ x, want, rtol=1e-4, atol=1e-6)
        h = model.apply_block(params["blocks"][i], i, h)


def test_calibration_drops_the_sink_rows(tiny):
    params, tokens = tiny
    a = kv_calibration(params, TINY, tokens, fisher=False, sink=0)
    b = kv_calibration(params, TINY, tokens, fisher=True, sink=1)
    n, t = tokens.shape
    assert a[0]["K"].shape == (n * t, C) and b[0]["K"].shape == (n * (t - 1), C)
    keep = np.ones(n * t, bool)
    keep[::t] = False
    np.testing.assert_allclose(b[1]["V"], a[1]["V"][keep], rtol=1e-5, atol=1e-6)
    assert a[0]["FK"] is None and (b[0]["FK"] >= 0).all() and b[0]["FK"].sum() > 0


def test_fisher_weights_pull_the_levels():
    x = jnp.linspace(-1, 1, 2001)
    w = jnp.where(x > 0.5, 100.0, 1.0)
    cfg = KVQuantConfig(bits=2)
    plain, weighted = fit_levels(x, None, cfg, 0), fit_levels(x, w, cfg, 0)
    count = lambda lv: sum(v > 0.5 for v in lv.levels)
    assert count(weighted) > count(plain)


def test_qnorm_matches_the_moments():
    x = jax.random.t(jax.random.key(2), 4.0, (5000,)) * 0.3
    x = jnp.clip(x, -1, 1)
    lv = fit_levels(x, None, KVQuantConfig(bits=2, qnorm=True), 0)
    idx = np.abs(np.asarray(x)[:, None] - np.array(lv.levels)).argmin(-1)
    q = np.array(lv.recon)[idx]
    assert q.mean() == pytest.approx(float(x.mean()), abs=2e-3)
    assert q.std() == pytest.approx(float(x.std()), rel=2e-3)
    assert KVQuantConfig(bits=2).use_qnorm and not KVQuantConfig(bits=3).use_qnorm


def test_ablation_switches(tiny):
    params, tokens = tiny
    base = KVQuantConfig()
    for change, check in (
        ({"pre_rope": False}, lambda k: not k.pre_rope),
        ({"sink": 0}, lambda k: k.sink == 0),
        ({"outliers": 0.0}, lambda k: not k.key.sparse and k.value.outliers == 0),
        ({"nuq": False}, lambda k: np.allclose(k.key.levels[0], np.linspace(-1, 1, 8))),
    ):
        kvq, _ = calibrate(params, TINY, tokens, dataclasses.replace(base, **change))
        assert check(kvq), change


def test_registered_with_the_paper_defaults():
    m = get_method("kvquant")
    assert m.kind == "kv_cache" and m.paper == "2401.18079"
    cfg = config_for(m, 2, None)
    assert cfg == KVQuantConfig(bits=2) and cfg.outliers == 0.01 and cfg.sink == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw",
    [{"bits": 6}, {"bits": 1}, {"outliers": 0.5}, {"outliers": -0.1}, {"sink": -1},
     {"pre_rope": 1}, {"qnorm": "yes"}, {"kmeans_iters": 0}],
)  # fmt: skip
def test_bad_config(kw):
    with pytest.raises(ValueError):
        KVQuantConfig(**kw)


def test_bad_calibration(tiny):
    params, tokens = tiny
    cfg = KVQuantConfig(fisher=False)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_keys(jnp.full((10, 4), jnp.nan), None, cfg, 0)
    with pytest.raises(ValueError, match="dead"):
        calibrate_values(jnp.ones((10, 4)), None, cfg, 0)
    with pytest.raises(ValueError, match="Fisher"):
        calibrate_keys(jnp.arange(40.0).reshape(10, 4), jnp.zeros((10, 4)), KVQuantConfig(), 0)
    with pytest.raises(ValueError, match="non-empty"):
        quantize_model(params, TINY, np.zeros((0, 8), np.int32), cfg)
    with pytest.raises(ValueError, match="sink"):
        quantize_model(params, TINY, tokens[:, :2], cfg)
