"""LLM.int8() (arXiv 2208.07339): vector-wise int8 and the run-time outlier decomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.model import ModelConfig, init_params
from methods.actquant import ActQuantConfig, act_quantizer, outlier_mask
from methods.base import LayerStats, get_method
from methods.llm_int8 import LLMInt8Config, outlier_fraction, quantize_layer

STATS = LayerStats(act_absmax=jnp.full(32, 3.0))


def _x(seed=0, t=16, d=32, outliers=(2, 9)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, t, d)).astype(np.float32)
    x[0, 5, outliers[0]] = 40.0  # one token of one sequence: the whole column is an outlier
    x[1, :, outliers[1]] *= 20.0
    return jnp.asarray(x)


def test_outlier_columns_stay_float_and_the_rest_is_per_token_int8():
    x = _x()
    act = quantize_layer(jnp.ones((8, 32)), STATS, LLMInt8Config()).act
    y = np.asarray(act(x))
    mask = np.asarray(outlier_mask(x, 6.0))[:, 0]  # [2, d] per sequence
    assert mask[0, 2] and mask[1, 9] and not mask[0, 9]
    xn = np.asarray(x)
    for b in range(2):
        np.testing.assert_array_equal(y[b][:, mask[b]], xn[b][:, mask[b]])  # eq. 7: float part
        rest = np.where(mask[b], 0.0, xn[b])
        step = np.abs(rest).max(-1, keepdims=True) / 127.0  # row scales without the outliers
        err = np.abs(y[b][:, ~mask[b]] - rest[:, ~mask[b]])
        assert np.all(err <= step / 2 + 1e-6)
        q = y[b][:, ~mask[b]] / step
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)  # on the int8 grid


def test_decomposition_beats_absmax_on_outlier_features():
    """Table 1's shape on one layer: the outlier columns blow up the per-token scales."""
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(16, 32)) / 6.0, jnp.float32)
    x = _x()
    y = x @ W.T
    errs = {}
    for t in (6.0, None):
        res = quantize_layer(W, STATS, LLMInt8Config(threshold=t))
        errs[t] = float(jnp.linalg.norm(res.act(x) @ res.weight.dequantize().T - y))
    assert errs[6.0] < 0.5 * errs[None], errs


def test_absmax_only_is_the_plain_per_token_quantizer():
    x = _x()
    act = quantize_layer(jnp.ones((8, 32)), STATS, LLMInt8Config(threshold=None)).act
    plain = act_quantizer(ActQuantConfig(bits=8, granularity="token"))
    np.testing.assert_array_equal(np.asarray(act(x)), np.asarray(plain(x)))


def test_mask_is_per_sequence_so_batching_does_not_matter():
    x = _x()
    act = quantize_layer(jnp.ones((8, 32)), STATS, LLMInt8Config()).act
    both = np.asarray(act(x))
    for b in range(2):
        np.testing.assert_array_equal(both[b], np.asarray(act(x[b : b + 1]))[0])


def test_weights_are_vector_wise_int8():
    W = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32)), jnp.float32)
    w = quantize_layer(W, STATS, LLMInt8Config()).weight
    assert w.block_shape == (1, 32) and w.format.name.lower().startswith("int8")
    np.testing.assert_allclose(
        np.abs(np.asarray(w.dequantize())).max(1), np.abs(W).max(1), rtol=1e-6
    )


def test_outlier_fraction_report():
    m = jnp.array([1.0, 6.0, 7.0, 5.99])
    assert float(outlier_fraction(m, 6.0)) == 0.5
    res = quantize_layer(jnp.ones((2, 4)), LayerStats(act_absmax=m), LLMInt8Config())
    assert float(res.info["outlier_frac"]) == 0.5
    plain = quantize_layer(
        jnp.ones((2, 4)), LayerStats(act_absmax=m), LLMInt8Config(threshold=None)
    )
    assert "outlier_frac" not in plain.info


def test_runtime_nan_propagates():
    act = quantize_layer(jnp.ones((8, 32)), STATS, LLMInt8Config()).act
    y = np.asarray(jax.jit(act)(_x().at[0, 3, 4].set(jnp.nan)))  # as in the model: traced
    assert np.isnan(y[0, 3, 4])


@pytest.mark.parametrize("t", [0.0, -6.0, float("nan"), float("inf"), True])
def test_bad_threshold_rejected(t):
    with pytest.raises(ValueError, match="threshold"):
        LLMInt8Config(threshold=t)


def test_bad_config_and_input_rejected():
    with pytest.raises(ValueError, match="act_bits"):
        LLMInt8Config(act_bits=16)
    assert quantize_layer(jnp.ones((2, 4)), LayerStats(), LLMInt8Config()).info == {}  # data-free
    with pytest.raises(ValueError, match="outlier"):
        ActQuantConfig(granularity="tensor", outlier_threshold=6.0)


def test_whole_model_reports_outlier_fractions():
    cfg = ModelConfig(
        vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=64
    )
    params = init_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)
    q = get_method("llm_int8").quantize_model(
        params, cfg, tokens, LLMInt8Config(threshold=0.5), outliers=True
    )
    fr = [r["outlier_frac"] for r in q.report]
    assert len(fr) == 7 and all(0.0 <= f <= 1.0 for f in fr) and max(fr) > 0.0
    assert q.bits_per_activation == 8.0
