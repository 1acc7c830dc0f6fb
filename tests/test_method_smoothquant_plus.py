"""SmoothQuant+ (methods/smoothquant_plus): the smoothing scale formula, exact folding, the
per-model search keeps the best α of its grid, the per-layer core takes its objective's
minimum, and bad input is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.model import Model, ModelConfig, init_params
from methods import dgq, smoothquant_plus
from methods.base import LayerStats
from methods.smoothquant_plus import core

TINY = ModelConfig(
    vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96
)


def test_smoothing_scale_formula():
    a = jnp.asarray([4.0, 1.0, 9.0])
    w = jnp.asarray([1.0, 4.0, 0.25])
    np.testing.assert_allclose(core.smoothing_scales(a, w, 0.5), [2.0, 0.5, 6.0], rtol=1e-6)
    np.testing.assert_allclose(core.smoothing_scales(a, w, 1.0), a, rtol=1e-6)
    np.testing.assert_allclose(core.smoothing_scales(a, w, 0.0), 1.0 / w, rtol=1e-6)
    # smoothed activations and weights have equal per-channel maxima at α = 0.5
    s = core.smoothing_scales(a, w, 0.5)
    np.testing.assert_allclose(a / s, w * s, rtol=1e-6)


def test_smoothing_folds_exactly():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
    absmax = dgq.input_absmax(params, TINY, tokens, batch_size=4)
    fwd = jax.jit(Model(TINY).forward)
    for alpha in (0.2, 0.8):
        sp = smoothquant_plus.smooth_model(params, TINY, absmax, alpha)
        np.testing.assert_allclose(fwd(sp, tokens), fwd(params, tokens), rtol=3e-4, atol=3e-4)


def test_model_search_keeps_the_best_alpha():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(1).integers(0, 64, (4, 16)).astype(np.int32)
    cfg = smoothquant_plus.SmoothQuantPlusConfig(group_size=32, n_grid=5, search_seqs=2)
    qm = smoothquant_plus.quantize_model(params, TINY, tokens, cfg)
    losses = dict(
        (float(a), float(v))
        for a, v in (p.split(":") for p in qm.report[0]["alpha_losses"].split(","))
    )
    chosen = qm.report[0]["alpha"]
    assert losses[round(chosen, 2)] == min(losses.values())
    # the result's own logit error is the chosen α's loss
    ref = Model(TINY).forward(params, jnp.asarray(tokens[:2]))
    got = Model(TINY).forward(qm.params, jnp.asarray(tokens[:2]))
    assert float(jnp.mean(jnp.square(got - ref))) == pytest.approx(min(losses.values()), rel=1e-3)
    assert qm.bits_per_activation == 16.0
    assert qm.bits_per_weight == pytest.approx(4 + (16 + 4) / 32)  # INT4 g32, fp16 scale, zero


def test_layer_core_takes_its_minimum():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 64)).astype(np.float32)
    X[:, 5] *= 30.0
    W = jnp.asarray(rng.normal(size=(16, 64)) / 8, jnp.float32)
    st = LayerStats(H=jnp.asarray(2 / 256 * X.T @ X), act_absmax=jnp.asarray(np.abs(X).max(0)))
    cfg = smoothquant_plus.SmoothQuantPlusConfig(group_size=32, n_grid=6)
    r = core.quantize_layer(W, st, cfg)
    _, _, best, errs = core._layer_search(W, st.H, st.act_absmax, cfg)
    assert float(r.info["loss"]) == float(jnp.min(errs))
    D = np.asarray(W) - np.asarray(r.weight.dequantize())
    assert np.sum((D @ np.asarray(st.H)) * D) == pytest.approx(float(jnp.min(errs)), rel=1e-2)


def test_bad_input_is_refused():
    W = jnp.ones((4, 64), jnp.float32)
    cfg = smoothquant_plus.SmoothQuantPlusConfig(group_size=32)
    with pytest.raises(ValueError, match="H and act_absmax"):
        core.quantize_layer(W, LayerStats(H=jnp.eye(64)), cfg)
    with pytest.raises(ValueError, match="n_grid"):
        smoothquant_plus.SmoothQuantPlusConfig(n_grid=1)
    with pytest.raises(ValueError, match="NaN"):
        core.quantize_layer(W.at[0, 0].set(jnp.nan), LayerStats(H=jnp.eye(64)), cfg)
