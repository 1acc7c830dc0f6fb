"""SqueezeLLM (arXiv 2306.07629): lookup-table weights and their bits, exact sparse outliers,
Fisher weighting pulling levels toward sensitive weights, jax.grad Fisher vs finite
differences, nearest-level codes, determinism, bad input, the model walk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.model import Model, ModelConfig, get_param, init_params, set_param
from methods import get_method
from methods.base import LayerStats
from methods.squeezellm import (
    LUTWeight,
    SqueezeLLMConfig,
    fisher_information,
    quantize_layer,
    quantize_model,
    sequence_loss,
)
from numerics.config import rtn
from numerics.quantize import quantize
from numerics.sparse import DenseSparse, weight_bits

M, N = 32, 128
TINY = ModelConfig(
    vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=32
)
DENSE = SqueezeLLMConfig(outlier_fraction=0.0)


def _W(seed: int = 0):
    return jax.random.t(jax.random.key(seed), 4.0, (M, N)) * 0.05


@pytest.fixture(scope="module")
def tiny():
    params = init_params(TINY, 0)
    tokens = jax.random.randint(jax.random.key(3), (3, 12), 0, TINY.vocab_size)
    return params, tokens, fisher_information(params, TINY, tokens, batch_size=3)


# ----------------------------------------------------------------------------- storage


def test_lut_weight_dequantize_bits_and_pytree():
    codes = jnp.array([[0, 3, 1, 2, 3, 0, 0, 1], [2, 2, 1, 0, 3, 3, 1, 0]], jnp.uint8)
    lut = jnp.array([[-1.0, -0.25, 0.5, 2.0], [-3.0, 0.0, 0.125, 1.0]], jnp.float16)
    q = LUTWeight(codes, lut, 2)
    expect = np.take_along_axis(np.asarray(lut, np.float32), np.asarray(codes, np.int64), axis=1)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), expect)
    assert q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    # hand count: 2-bit codes + 4 fp16 levels per row of 8 weights
    assert weight_bits(q) == pytest.approx(2 + 4 * 16 / 8)
    ds = DenseSparse(
        q, jnp.array([1], jnp.int32), jnp.array([5], jnp.int32), jnp.array([7.5], jnp.float16)
    )
    assert weight_bits(ds) == pytest.approx(2 + 4 * 16 / 8 + 32 / 16)
    assert float(ds.dequantize()[1, 5]) == 7.5
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2
    np.testing.assert_array_equal(
        np.asarray(jax.tree_util.tree_unflatten(tree, leaves).dequantize()), expect
    )


def test_outliers_exact_and_kept_out_of_the_levels():
    W = _W(1) * 0.2
    planted = [(0, 3), (9, 64), (31, 127)]
    for r, c in planted:
        W = W.at[r, c].set(2.0)
    res = quantize_layer(
        W, LayerStats(), SqueezeLLMConfig(outlier_fraction=0.01), key=jax.random.key(0)
    )
    ds = res.weight
    assert isinstance(ds, DenseSparse) and isinstance(ds.dense, LUTWeight)
    assert ds.n_outliers == round(0.01 * M * N) == res.info["n_outliers"]
    rows, cols = np.asarray(ds.rows), np.asarray(ds.cols)
    assert set(planted) <= set(zip(rows.tolist(), cols.tolist(), strict=True))
    Wf16 = np.asarray(W.astype(jnp.float16))
    np.testing.assert_array_equal(np.asarray(ds.values), Wf16[rows, cols])
    np.testing.assert_array_equal(np.asarray(ds.dequantize())[rows, cols], Wf16[rows, cols])
    # the dense part's levels were fitted without them (repo: F · (w ≠ 0))
    assert float(jnp.max(jnp.abs(ds.dense.lut.astype(jnp.float32)))) < 1.0
    assert weight_bits(ds) == pytest.approx(3 + 8 * 16 / N + 32 * ds.n_outliers / (M * N))


def test_sensitive_weights_join_the_sparse_part():
    """``sensitive_fraction``: the largest-F weights are kept exactly too (disjoint from the
    magnitude outliers, so the count is static: round(0.001·mn) + round(0.005·mn))."""
    W = _W(6)
    sens = [(1, 2), (4, 50), (17, 99), (30, 7)]
    F = jnp.ones((M, N), jnp.float32)
    for r, c in sens:
        F = F.at[r, c].set(1e6)
    cfg = SqueezeLLMConfig(outlier_fraction=0.005, sensitive_fraction=0.001)
    ds = quantize_layer(W, LayerStats(fisher=F), cfg, key=jax.random.key(0)).weight
    rows, cols = np.asarray(ds.rows), np.asarray(ds.cols)
    pos = list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert len(set(pos)) == len(pos) == round(0.001 * M * N) + round(0.005 * M * N)
    assert set(sens) <= set(pos)
    Wf16 = np.asarray(W.astype(jnp.float16))
    np.testing.assert_array_equal(np.asarray(ds.dequantize())[rows, cols], Wf16[rows, cols])


# ----------------------------------------------------------------------------- Fisher weighting


def test_fisher_pulls_levels_toward_sensitive_weights():
    W = _W(2)
    F = jnp.ones((M, N), jnp.float32)
    sens = np.array([5, 40, 77, 120])  # four very sensitive weights per row
    F = F.at[:, sens].set(1e4)
    key = jax.random.key(0)
    with_f = quantize_layer(W, LayerStats(fisher=F), DENSE, key=key).weight.dequantize()
    without = quantize_layer(W, LayerStats(), DENSE, key=key).weight.dequantize()
    err = lambda Q: jnp.abs(W - Q)[:, sens]  # noqa: E731
    # the sensitive weights become (almost) levels themselves
    assert float(jnp.mean(err(with_f))) < 0.1 * float(jnp.mean(err(without)))
    # and the Fisher-weighted objective (eq. 5) is lower with the Fisher weights
    obj = lambda Q: float(jnp.sum(F * jnp.square(W - Q)))  # noqa: E731
    assert obj(with_f) < obj(without)


def test_nonuniform_levels_beat_rtn_per_channel():
    """Dense-only 3-bit per-channel k-means has a lower (Fisher-weighted) error than 3-bit
    per-channel asymmetric RTN — the paper's dense-only comparison at equal granularity."""
    W = _W(3)
    F = jax.random.exponential(jax.random.key(4), (M, N)) ** 2
    sq = quantize_layer(W, LayerStats(fisher=F), DENSE, key=jax.random.key(0)).weight.dequantize()
    rq = quantize(W, rtn(3, group_size=None, sym=False, scale_dtype="float16")).dequantize()
    assert float(jnp.sum(F * jnp.square(W - sq))) < float(jnp.sum(F * jnp.square(W - rq)))


@given(seed=st.integers(0, 2**16), log_scale=st.floats(-3, 1))
def test_codes_are_nearest_sorted_levels(seed, log_scale):
    W = _W(seed) * jnp.float32(10.0**log_scale)
    q = quantize_layer(W, LayerStats(), DENSE, key=jax.random.key(seed)).weight
    lv = np.asarray(q.lut, np.float32)
    assert np.all(np.diff(lv, axis=1) >= 0) and int(jnp.max(q.codes)) < 8
    dist = np.abs(np.asarray(W)[:, :, None] - lv[:, None, :])
    got = np.abs(np.asarray(W) - np.asarray(q.dequantize()))
    np.testing.assert_array_equal(got, dist.min(axis=2))


def test_uniform_fallback_and_determinism():
    W = _W(5)
    key = jax.random.key(7)
    a = quantize_layer(W, LayerStats(), SqueezeLLMConfig(), key=key)
    b = quantize_layer(
        W, LayerStats(fisher=jnp.ones((M, N), jnp.float32)), SqueezeLLMConfig(), key=key
    )
    c = quantize_layer(W, LayerStats(), SqueezeLLMConfig(), key=key)
    assert a.info["uniform_fisher"] and not b.info["uniform_fisher"]
    for x, y, z in zip(*(jax.tree_util.tree_leaves(r.weight) for r in (a, b, c)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))


# ----------------------------------------------------------------------------- Fisher information


def test_fisher_matches_finite_differences(tiny):
    """F_ij = mean over sequences of (∂ℓ_s/∂W_ij)², against central differences of ℓ_s
    (h = 1e-2: truncation O(h²) and float32 round-off both well under 1%)."""
    params, tokens, F = tiny
    name = "blocks.0.mlp.up_proj"
    W = get_param(params, name)
    loss = jax.jit(lambda p, s: sequence_loss(p, TINY, s))
    Fn = np.asarray(F[name])
    picks = np.argsort(Fn.ravel())[-3:].tolist() + [5, 100]
    h = 1e-2
    for i in picks:
        r, c = divmod(i, W.shape[1])
        g = [
            (
                float(loss(set_param(params, name, W.at[r, c].add(h)), s))
                - float(loss(set_param(params, name, W.at[r, c].add(-h)), s))
            )
            / (2 * h)
            for s in tokens
        ]
        assert Fn[r, c] == pytest.approx(np.mean(np.square(g)), rel=1e-2)


def test_fisher_shapes_and_batch_invariance(tiny):
    params, tokens, F3 = tiny
    F1 = fisher_information(params, TINY, tokens, batch_size=1)
    assert set(F1) == {
        f"blocks.{i}.{n}"
        for i in range(1)
        for n in (
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    for name, F in F1.items():
        assert F.shape == get_param(params, name).shape and F.dtype == jnp.float32
        assert bool(jnp.all(F >= 0)) and float(jnp.sum(F)) > 0
        np.testing.assert_allclose(np.asarray(F), np.asarray(F3[name]), rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- input checks


def test_bad_input_rejected(tiny):
    W = _W()
    cfg = SqueezeLLMConfig()
    with pytest.raises(ValueError, match="fisher has shape"):
        quantize_layer(W, LayerStats(fisher=jnp.ones((M, N - 1), jnp.float32)), cfg)
    with pytest.raises(ValueError, match="non-negative"):
        quantize_layer(W, LayerStats(fisher=-jnp.ones((M, N), jnp.float32)), cfg)
    with pytest.raises(ValueError, match="finite"):
        quantize_layer(W, LayerStats(fisher=jnp.full((M, N), jnp.nan, jnp.float32)), cfg)
    with pytest.raises(ValueError, match="NaN"):
        quantize_layer(W.at[0, 0].set(jnp.inf), LayerStats(), cfg)
    with pytest.raises(TypeError, match="float"):
        quantize_layer(jnp.ones((M, N), jnp.int32), LayerStats(), cfg)
    with pytest.raises(ValueError, match="cannot fit 8 levels"):
        quantize_layer(W[:, :4], LayerStats(), cfg)
    with pytest.raises(ValueError, match="sensitive_fraction > 0 needs"):
        quantize_layer(W, LayerStats(), SqueezeLLMConfig(sensitive_fraction=0.001))
    with pytest.raises(ValueError, match="bits=5"):
        SqueezeLLMConfig(bits=5)
    with pytest.raises(ValueError, match="outlier_fraction"):
        SqueezeLLMConfig(outlier_fraction=0.7)
    with pytest.raises(ValueError, match="kmeans_iters"):
        SqueezeLLMConfig(kmeans_iters=0)
    params, tokens, _ = tiny
    with pytest.raises(ValueError, match="integer array"):
        fisher_information(params, TINY, jnp.ones((2, 8), jnp.float32))
    with pytest.raises(ValueError, match="batch_size"):
        fisher_information(params, TINY, tokens, batch_size=0)
    q = quantize_layer(get_param(params, "blocks.0.attn.q_proj"), LayerStats(), cfg).weight
    with pytest.raises(TypeError, match="already quantized"):
        fisher_information(set_param(params, "blocks.0.attn.q_proj", q), TINY, tokens)


# ----------------------------------------------------------------------------- model walk


def test_quantize_model_on_a_tiny_model(tiny):
    params, tokens, F = tiny
    assert get_method("squeezellm").quantize_model is quantize_model
    qm = quantize_model(params, TINY, tokens, DENSE, fisher=F)
    assert len(qm.report) == 7
    assert all(not r["uniform_fisher"] for r in qm.report)
    assert qm.bits_per_weight == pytest.approx(3 + 8 * 16 / 32)  # tiny rows: the tables dominate
    logits = Model(TINY).forward(qm.params, tokens)
    ref = Model(TINY).forward(params, tokens)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.max(jnp.abs(logits - ref))) < float(jnp.max(jnp.abs(ref)))
