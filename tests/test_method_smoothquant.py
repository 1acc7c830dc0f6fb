"""SmoothQuant (arXiv 2211.10438) and the naive W8A8 baseline: algorithm-level properties."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.model import ADAPTERS, Model, ModelConfig, get_param, init_params
from methods.base import LayerStats, get_method
from methods.smoothquant import SmoothQuantConfig, W8A8Config, quantize_layer, smooth_block
from methods.smoothquant.core import smoothing_scales

CFG = ModelConfig(
    vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
)


def _outlier_layer(seed=0, n=512, d_in=128, d_out=64):
    """Inputs with a few channels 50× larger than the rest (LLM activations, paper Fig. 4)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_in)).astype(np.float32)
    X[:, [3, 40, 77]] *= 50.0
    W = (rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    return jnp.asarray(X), jnp.asarray(W)


def _w8a8_error(X, W, cfg, s=None):
    """‖XWᵀ − Q(X/s) Q(W·s)ᵀ‖ / ‖XWᵀ‖ through the method's own core."""
    s = jnp.ones(X.shape[1]) if s is None else s
    Xs, Ws = X / s[None, :], W * s[None, :]
    res = quantize_layer(Ws, LayerStats(act_absmax=jnp.max(jnp.abs(Xs), 0)), cfg)
    y = res.act(Xs) @ res.weight.dequantize().T
    return float(jnp.linalg.norm(y - X @ W.T) / jnp.linalg.norm(X @ W.T))


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_smoothing_beats_naive_w8a8_with_outlier_channels(level):
    """The headline shape on one layer: per-tensor int8 activations with outlier channels lose
    the small channels; α = 0.5 migrates the range into the weights and cuts the error."""
    X, W = _outlier_layer()
    cfg = SmoothQuantConfig(level=level, alpha=0.5)
    naive = _w8a8_error(X, W, W8A8Config(level=level))
    s = smoothing_scales(jnp.max(jnp.abs(X), 0), [W], 0.5)
    smooth = _w8a8_error(X, W, cfg, s)
    assert smooth < 0.7 * naive, (level, smooth, naive)


def test_eq4_balances_activation_and_weight_ranges():
    """α = 0.5: max|X_j / s_j| = max|W_j s_j| = √(max|X_j| max|W_j|) (eq. 4); α = 1 flattens the
    activations (every channel's max becomes 1), α = 0 the weights' columns."""
    X, W = _outlier_layer()
    m, w = jnp.max(jnp.abs(X), 0), jnp.max(jnp.abs(W), 0)
    s = smoothing_scales(m, [W], 0.5)
    np.testing.assert_allclose(m / s, w * s, rtol=1e-5)
    np.testing.assert_allclose(m / s, jnp.sqrt(m * w), rtol=1e-5)
    np.testing.assert_allclose(m / smoothing_scales(m, [W], 1.0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w * smoothing_scales(m, [W], 0.0), 1.0, rtol=1e-6)


def test_group_scale_uses_every_linear_of_the_group():
    X, W = _outlier_layer()
    m = jnp.max(jnp.abs(X), 0)
    W2 = W.at[0, 5].set(40.0)
    s = smoothing_scales(m, [W, W2], 0.5)
    np.testing.assert_allclose(s, smoothing_scales(m, [W2], 0.5), rtol=1e-6)
    assert not np.allclose(s, smoothing_scales(m, [W], 0.5))


def test_smoothing_leaves_the_float_model_unchanged():
    params = init_params(CFG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    bp = params["blocks"][0]
    rng = np.random.default_rng(1)
    absmax = {
        n: jnp.asarray(rng.uniform(0.1, 30.0, get_param(bp, n).shape[1]), jnp.float32)
        for g in ADAPTERS["llama"]
        for n in g.names
    }
    bs, smoothed_absmax, scales = smooth_block(bp, absmax, 0.5, "llama")
    assert sorted(scales) == ["attn.q_proj", "mlp.gate_proj"]  # o / down are not smoothed
    assert not np.allclose(get_param(bs, "attn_norm"), get_param(bp, "attn_norm"))
    k_expected = absmax["attn.k_proj"] / scales["attn.q_proj"]
    np.testing.assert_allclose(smoothed_absmax["attn.k_proj"], k_expected, rtol=1e-6)
    assert smoothed_absmax["attn.o_proj"] is absmax["attn.o_proj"]
    p2 = {**params, "blocks": [bs, params["blocks"][1]]}
    a, b = Model(CFG).forward(params, tokens), Model(CFG).forward(p2, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_whole_model_results():
    params = init_params(CFG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)
    sq = get_method("smoothquant").quantize_model(params, CFG, tokens, SmoothQuantConfig())
    nv = get_method("w8a8").quantize_model(params, CFG, tokens, W8A8Config())
    for q in (sq, nv):
        assert q.bits_per_activation == 8.0 and len(q.hooks.act_quant.quantizers) == 14
        assert all(r["bits"] > 8.0 for r in q.report)  # codes + one float scale per tensor
    smoothed = {r["name"].split(".", 2)[2] for r in sq.report if r["smoothed"]}
    assert smoothed == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert not any(r["smoothed"] for r in nv.report)
    # the naive baseline never rescales: its norms are the model's
    norm = get_param(params, "blocks.1.mlp_norm")
    assert np.array_equal(get_param(nv.params, "blocks.1.mlp_norm"), norm)
    assert not np.array_equal(get_param(sq.params, "blocks.1.mlp_norm"), norm)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_alpha_outside_unit_interval_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=alpha)


def test_bad_configs_rejected():
    with pytest.raises(ValueError, match="level"):
        SmoothQuantConfig(level="O4")
    with pytest.raises(ValueError, match="act_bits"):
        W8A8Config(act_bits=5)
    with pytest.raises(ValueError, match="weight_granularity"):
        W8A8Config(weight_granularity="group")
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(jnp.ones(4), [jnp.ones((2, 4))], 2.0)
    with pytest.raises(ValueError, match="NaN"):
        smoothing_scales(jnp.array([1.0, jnp.nan]), [jnp.ones((2, 2))], 0.5)


def test_levels_are_table_2():
    assert W8A8Config(level="O1").act_config().granularity == "token"
    o2, o3 = W8A8Config(level="O2").act_config(), W8A8Config(level="O3").act_config()
    assert (o2.granularity, o2.static, o3.granularity, o3.static) == (
        "tensor",
        False,
        "tensor",
        True,
    )
    assert W8A8Config().weight_config().granularity == "tensor"


def test_dead_static_calibration_is_refused_through_the_method():
    W = jnp.ones((8, 16), jnp.float32)
    with pytest.raises(ValueError, match="calibrated to 0.0"):
        quantize_layer(W, LayerStats(act_absmax=jnp.zeros(16)), SmoothQuantConfig(level="O3"))
    with pytest.raises(ValueError, match="calibrated to nan"):
        quantize_layer(W, LayerStats(act_absmax=jnp.full(16, jnp.nan)), W8A8Config(level="O3"))
    with pytest.raises(ValueError, match="act_absmax"):
        quantize_layer(W, LayerStats(), W8A8Config(level="O3"))
    quantize_layer(W, LayerStats(), W8A8Config(level="O1"))  # dynamic: no statistics needed


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_runtime_nan_propagates_and_static_range_saturates(level):
    W = jnp.ones((8, 16), jnp.float32)
    act = quantize_layer(W, LayerStats(act_absmax=jnp.full(16, 2.0)), W8A8Config(level=level)).act
    x = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32).reshape(2, 16)
    y = np.asarray(jax.jit(act)(x.at[0, 3].set(jnp.nan)))  # as in the model: traced
    assert np.isnan(y[0, 3])
    assert np.all(np.isfinite(y[1])) or level == "O2"  # per tensor: one NaN poisons the scale
    if level == "O3":  # beyond the calibrated range 2.0: saturates to ±2.0 (±q_max · s)
        big = np.asarray(act(jnp.full((1, 16), 50.0, jnp.float32)))
        np.testing.assert_allclose(big, 2.0, rtol=1e-6)


def test_weight_granularity_channel_is_per_output_channel():
    X, W = _outlier_layer()
    cfg = dataclasses.replace(W8A8Config(level="O1"), weight_granularity="channel")
    w = quantize_layer(W, LayerStats(), cfg).weight
    assert w.block_shape == (1, W.shape[1])
