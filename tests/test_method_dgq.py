"""DGQ (methods/dgq): the INT8 form of the two-level weights, the two-phase search takes the
best of its grids, percentile smoothing touches only the outlier channels and folds exactly,
and bad input is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.model import Model, ModelConfig, init_params
from methods import dgq
from methods.base import LayerStats
from methods.dgq import core
from numerics.scales import dgq_quantize

CFG = dgq.DGQConfig(bits=4, group_size=32, group_grid=8, channel_grid=12, search_tokens=128)


def _layer(seed=0, d_out=24, d_in=96, n=256):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_in)).astype(np.float32)
    X[:, [3, 40]] *= 15.0
    W = (rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    st = LayerStats(H=jnp.asarray(2.0 / n * X.T @ X), X=jnp.asarray(X))
    return jnp.asarray(W), st, X


def _row_err(W, Wq, X):
    return np.sum(np.square(X @ (np.asarray(W) - np.asarray(Wq, np.float64)).T), axis=0)


def test_weights_are_int8_on_a_per_channel_grid():
    W, st, _ = _layer()
    qa = core.quantize_layer(W, st, CFG).weight
    s2 = np.asarray(qa.scale.codes, np.float64)  # [out, ng] integer group scales
    assert s2.min() >= 1 and np.all(s2 == np.round(s2))
    q = np.asarray(qa.codes, np.float64).reshape(24, 3, 32)
    z = np.asarray(qa.zero, np.float64)
    w8 = s2[:, :, None] * (q - z[:, :, None])  # the int8 weight of the integer GEMM
    assert np.all(w8 == np.round(w8)) and np.abs(w8).max() <= 127
    s1 = np.asarray(qa.scale.scale, np.float64)  # [out, 1] float16 channel scales
    np.testing.assert_allclose(
        np.asarray(qa.dequantize(), np.float64), (s1[:, :, None] * w8).reshape(24, 96), rtol=1e-6
    )


def test_phase2_takes_the_best_channel_ratio_per_row():
    W, st, X = _layer(1)
    qa = core.quantize_layer(W, st, CFG).weight
    r_g = core.phase1(W, st.H, CFG)
    Xs = X[: CFG.search_tokens]
    for r in np.asarray(core.channel_ratios(CFG.channel_grid))[[0, 5, 11]]:
        other = dgq_quantize(W, group_size=32, group_ratio=r_g, channel_ratio=float(r))
        assert np.all(
            _row_err(W, qa.dequantize(), Xs) <= _row_err(W, other.dequantize(), Xs) * (1 + 1e-5)
        )


def test_phase1_takes_the_best_clip_ratio_per_group():
    W, st, X = _layer(2)
    r_g = np.asarray(core.phase1(W, st.H, CFG))
    assert r_g.shape == (24, 3) and len(np.unique(r_g)) > 1  # chosen per (row, group)
    grid = set(np.asarray(core.group_ratios(CFG.group_grid)).tolist())
    assert set(r_g.ravel().tolist()) <= grid


def test_percentile_smoothing_scales_only_the_top_channels():
    m = jnp.asarray(np.r_[np.ones(398), 50.0, 100.0], jnp.float32)  # 400 channels, 2 outliers
    s = np.asarray(core.percentile_smoothing(m, 0.005))  # k = int(400·0.005 + 1.5) = 3
    np.testing.assert_array_equal(s[:398], 1.0)
    np.testing.assert_allclose(np.asarray(m)[398:] / s[398:], 1.0, rtol=1e-6)
    dead = np.asarray(core.percentile_smoothing(jnp.zeros(64), 0.005))
    np.testing.assert_array_equal(dead, 1.0)


TINY = ModelConfig(
    vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96
)


def test_smoothing_folds_exactly_and_model_runs_a8():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
    absmax = dgq.input_absmax(params, TINY, tokens, batch_size=4)
    # make smoothing bite: pretend a few channels are outliers
    absmax = {k: v.at[:2].mul(100.0) for k, v in absmax.items()}
    sp = dgq.smooth_params(params, TINY, absmax, 0.005)
    fwd = jax.jit(Model(TINY).forward)
    np.testing.assert_allclose(fwd(sp, tokens), fwd(params, tokens), rtol=2e-4, atol=2e-4)
    qm = dgq.quantize_model(params, TINY, tokens, dataclasses.replace(CFG, search_tokens=32))
    assert qm.bits_per_activation == 8.0 and qm.hooks.act_quant is not None
    # per linear: 4-bit codes, per group of 32 an 8-bit integer scale and a 4-bit zero, per row
    # one float16 channel scale
    shapes = [(64, 64)] * 2 + [(32, 64)] * 2 + [(96, 64)] * 2 + [(64, 96)]  # q o k v gate up down
    bits = sum(o * i * 4 + o * (i // 32) * 12 + o * 16 for o, i in shapes)
    assert qm.bits_per_weight == pytest.approx(bits / sum(o * i for o, i in shapes))


def test_bad_input_is_refused():
    W, st, _ = _layer()
    with pytest.raises(ValueError, match="H and X"):
        core.quantize_layer(W, LayerStats(H=st.H), CFG)
    with pytest.raises(ValueError, match="group_size"):
        dgq.DGQConfig(group_size=0)
    with pytest.raises(ValueError, match="does not divide"):
        core.quantize_layer(W[:, :80], st, CFG)
    with pytest.raises(ValueError, match="NaN"):
        core.quantize_layer(W.at[0, 0].set(jnp.nan), st, CFG)
    with pytest.raises(ValueError, match="bits"):
        dgq.DGQConfig(act_bits=5)
