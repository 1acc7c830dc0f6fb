"""WKVQuant (methods/wkvquant): decoding reads the cache scoring reads, past-only keeps the
current token exact, the 2D codec is the smoothing around a per-token quantizer, the CRR fit
lowers its loss through real gradients, and bad input is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.decode import Decoder
from harness.layers import Hooks
from harness.model import Model, ModelConfig, init_params
from methods import wkvquant
from methods.wkvquant import core

TINY = ModelConfig(
    vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64
)
FAST = dict(crr_blocks=2, steps=6, samples=2, tokens=16, lr=1e-2)


@pytest.fixture(scope="module")
def tiny():
    params = init_params(TINY, 0)
    calib = np.random.default_rng(0).integers(0, 64, size=(4, 24)).astype(np.int32)
    return params, calib


@pytest.fixture(scope="module")
def fitted(tiny):
    params, calib = tiny
    return wkvquant.quantize_model(params, TINY, calib, wkvquant.WKVQuantConfig(bits=2, **FAST))


def test_decoding_matches_scoring(tiny, fitted):
    params, _ = tiny
    toks = np.random.default_rng(1).integers(0, 64, size=(2, 14)).astype(np.int32)
    full = np.asarray(jax.jit(Model(TINY, fitted.hooks).forward)(params, toks))
    dec = Decoder(Model(TINY, fitted.hooks), capacity=16)
    logits, state = dec.prefill(params, toks[:, :5])
    got = [np.asarray(logits)]
    for t in range(5, toks.shape[1]):
        step, state = dec.step(params, state, toks[:, t])
        got.append(np.asarray(step).reshape(2, 1, -1))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-4, rtol=1e-4)


def test_past_only_keeps_the_current_token_exact(tiny, fitted):
    """Token 0 attends only to itself: past-only gives the fp logits there, quantizing the
    current token (window=0) does not; later tokens read the past quantized either way."""
    params, _ = tiny
    toks = np.random.default_rng(2).integers(0, 64, size=(2, 10)).astype(np.int32)
    plain = np.asarray(Model(TINY).forward(params, toks))
    poq = np.asarray(Model(TINY, fitted.hooks).forward(params, toks))
    kvq = fitted.hooks.kv_quant
    assert (kvq.key.window, kvq.key.flush, kvq.value.window) == (1, 1, 1)
    now = dataclasses.replace(
        kvq,
        key=dataclasses.replace(kvq.key, window=0),
        value=dataclasses.replace(kvq.value, window=0),
    )
    cur = np.asarray(Model(TINY, Hooks(kv_quant=now)).forward(params, toks))
    np.testing.assert_allclose(poq[:, 0], plain[:, 0], atol=1e-5)
    assert not np.allclose(cur[:, 0], plain[:, 0], atol=1e-3)
    assert not np.allclose(poq[:, 5:], plain[:, 5:], atol=1e-3)


def test_codec_is_smoothing_around_a_per_token_quantizer():
    rng = np.random.default_rng(3)
    H, D = 2, 16
    x = jnp.asarray(rng.normal(size=(3, 1, H, D)).astype(np.float32) * 4 + 1)
    delta = rng.normal(size=H * D).astype(np.float32)
    s = np.exp(rng.normal(size=H * D)).astype(np.float32)
    c = core.TwoDCodec.from_arrays([delta], [s], bits=4, window=1)
    ident = core.TwoDCodec.from_arrays([np.zeros(H * D)], [np.ones(H * D)], bits=4, window=1)
    y = c.decode(0, c.encode(0, x))
    # X̂ = Q((X − δ)/s)·s + δ: the identity-smoothed codec applied to the smoothed tensor
    d4, s4 = delta.reshape(1, 1, H, D), s.reshape(1, 1, H, D)
    ref = ident.decode(0, ident.encode(0, (x - d4) / s4)) * s4 + d4
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the training path computes the same numbers (float16 scales aside)
    ste = core.fake_2d_ste(x, delta.reshape(H, D), s.reshape(H, D), 4)
    np.testing.assert_allclose(ste, y, atol=2e-2 * float(jnp.max(jnp.abs(x))))
    codes = c.encode(0, x)
    assert codes.codes.shape == x.shape and int(codes.codes.max()) <= 15
    assert c.element_bits(16) == 4 + 32 / 16


def test_smoothing_helps_a_shifted_outlier_channel():
    """A channel far off-centre ruins per-token ranges; its static shift and scale repair it."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 1, 1, 16)).astype(np.float32)
    x[..., 3] = x[..., 3] * 5 + 40
    flat = x.reshape(-1, 16)
    d, s = core.init_smoothing(flat.min(0), flat.max(0), 0.5)
    smooth = core.TwoDCodec.from_arrays([d], [s], bits=3)
    none = core.TwoDCodec.from_arrays([np.zeros(16)], [np.ones(16)], bits=3)
    err = lambda c: float(jnp.linalg.norm(c.decode(0, c.encode(0, jnp.asarray(x))) - x))
    assert err(smooth) < 0.5 * err(none)


def test_ste_gradients_reach_shift_and_scale():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 8, 2, 16)).astype(np.float32))
    d, s = jnp.zeros((2, 16)), jnp.ones((2, 16))
    loss = lambda d, s: jnp.sum(jnp.abs(core.fake_2d_ste(x, d, s, 2) - x))
    gd, gs = jax.grad(loss, argnums=(0, 1))(d, s)
    assert float(jnp.abs(gd).sum()) > 0 and float(jnp.abs(gs).sum()) > 0


def test_crr_lowers_its_loss(fitted):
    rows = fitted.report
    assert len(rows) == TINY.n_layers
    assert [r["crr_blocks"] for r in rows] == [2, 2, 1]
    assert all(r["crr_best"] <= r["crr_first"] for r in rows)
    assert sum(r["crr_best"] < r["crr_first"] for r in rows) >= 2  # Adam moved the parameters
    assert fitted.kv_bits == pytest.approx(
        fitted.hooks.kv_quant.bits_per_element(TINY.max_seq_len, TINY.head_dim)
    )


def test_crr_off_is_the_initialisation(tiny):
    params, calib = tiny
    cfg = wkvquant.WKVQuantConfig(bits=4, crr=False, **FAST)
    q = wkvquant.quantize_model(params, TINY, calib, cfg)
    assert all("crr_first" not in r for r in q.report)
    h = Model(TINY).embed(params, jnp.asarray(calib))
    _, got = Model(TINY).apply_block(params["blocks"][0], 0, h, capture=True)
    k = np.asarray(got["attn.k"]).reshape(-1, 32)
    d, s = core.init_smoothing(k.min(0), k.max(0), cfg.alpha)
    np.testing.assert_allclose(q.hooks.kv_quant.key.delta[0], d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.hooks.kv_quant.key.scale[0], s, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bits": 5}, "bits"),
        ({"crr_blocks": 0}, "crr_blocks"),
        ({"steps": 0}, "steps"),
        ({"alpha": 1.5}, "alpha"),
        ({"lr": float("nan")}, "lr"),
        ({"past_only": 1}, "past_only"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        wkvquant.WKVQuantConfig(**kw)


def test_bad_calibration(tiny):
    params, _ = tiny
    with pytest.raises(ValueError, match="NaN"):
        core.init_smoothing(np.array([0.0, np.nan]), np.array([1.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="dead"):
        core.init_smoothing(np.zeros(4), np.zeros(4), 0.5)
    with pytest.raises(ValueError, match="empty"):
        core.init_smoothing(np.zeros(0), np.zeros(0), 0.5)
    with pytest.raises(ValueError, match="calibration"):
        wkvquant.quantize_model(params, TINY, np.zeros((0, 4), np.int32), wkvquant.WKVQuantConfig())
    with pytest.raises(ValueError, match="chunk"):
        core.TwoDCodec(chunk=2, flush=2)
    c = core.TwoDCodec.from_arrays([np.zeros(32)], [np.ones(32)])
    with pytest.raises(ValueError, match="layer 3"):
        c.encode(3, jnp.zeros((1, 1, 2, 16)))
