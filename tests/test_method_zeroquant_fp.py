"""ZeroQuant-FP (arXiv 2307.09782): FP4 codes on the E2M1 grid, the power-of-two scale
constraints (no clipping, powers of two, an exact FP4 → FP8 E4M3 cast), FP8 activations, bad
input."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from methods.base import LayerStats
from methods.zeroquant_fp import ZeroQuantFPConfig, quantize_layer
from methods.zeroquant_fp.core import MAX_SHIFT, pow2_scales, quantize_weight
from numerics.formats import get_format
from numerics.sparse import weight_bits

OUT, IN = 32, 200  # g64: three groups of 64 and a ragged one of 8
E2M1 = np.asarray(get_format("fp4_e2m1").finite_values())


def _W(seed=0):
    W = jax.random.t(jax.random.key(seed), 4.0, (OUT, IN)) * 0.05
    return W.at[0, :64].multiply(1e-4)  # a row with a group ~2^13 smaller than the others


def _cfg(**kw):
    return ZeroQuantFPConfig(group_size=64, ragged=True, **kw)


@pytest.mark.parametrize("pow2", ["none", "m1", "m2"])
def test_fp4_codes_on_the_e2m1_grid_and_nothing_clips(pow2):
    W = _W()
    qa = quantize_weight(W, _cfg(pow2_scale=pow2))
    qa.check()
    vals = np.asarray(qa.values())
    assert np.isin(vals, E2M1).all()
    # scales never shrink below max|w| / 6, so the largest weight of a group is not clipped
    ref = np.asarray(quantize_weight(W, _cfg()).scale_array())
    assert (np.asarray(qa.scale_array()) >= ref).all()
    assert weight_bits(qa) == pytest.approx(4 + 16 * 4 / IN)


def test_m1_scales_are_powers_of_two_and_m2_ratios_are():
    W = _W(1)
    s1 = np.asarray(quantize_weight(W, _cfg(pow2_scale="m1")).scale_array(), np.float64)
    assert np.array_equal(np.exp2(np.round(np.log2(s1))), s1)
    s2 = np.asarray(quantize_weight(W, _cfg(pow2_scale="m2")).scale_array(), np.float64)
    k = np.log2(s2.max(-1, keepdims=True) / s2)
    assert np.array_equal(np.round(k), k) and k.max() <= MAX_SHIFT


@pytest.mark.parametrize("pow2", ["m1", "m2"])
def test_fp4_to_fp8_cast_is_exact_under_the_constraint(pow2):
    """Every weight over its row's largest scale is an FP8 E4M3 number: the cast is exact."""
    W = _W(2)
    qa = quantize_weight(W, _cfg(pow2_scale=pow2))
    rel = np.asarray(qa.dequantize(jnp.float32), np.float64) / np.asarray(
        qa.scale_array(), np.float64
    ).max(-1, keepdims=True)
    cast = rel.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    np.testing.assert_array_equal(cast, rel)
    # without the constraint the cast rounds (so the test can fail)
    qa0 = quantize_weight(W, _cfg())
    rel0 = np.asarray(qa0.dequantize(jnp.float32), np.float64) / np.asarray(
        qa0.scale_array(), np.float64
    ).max(-1, keepdims=True)
    assert not np.array_equal(rel0.astype(ml_dtypes.float8_e4m3fn).astype(np.float64), rel0)


def test_zero_groups_keep_zero_scales():
    s = jnp.asarray([[0.0, 0.3, 0.05], [0.0, 0.0, 0.0]])
    for m in ("m1", "m2"):
        out = np.asarray(pow2_scales(s, m))
        assert (out[:, 0] == 0).all() and (out[1] == 0).all() and (out[0, 1:] >= [0.3, 0.05]).all()


def test_fp8_activations_and_int_comparison():
    W = _W()
    x = jax.random.normal(jax.random.key(4), (3, IN)) * 3.0
    fp8 = quantize_layer(W, LayerStats(), _cfg()).act(x)
    int8 = quantize_layer(W, LayerStats(), _cfg(act_format="int")).act(x)
    s = np.abs(np.asarray(x)).max(-1, keepdims=True) / 448.0  # per-token E4M3 scale
    rel = np.asarray(fp8, np.float64) / s
    np.testing.assert_allclose(rel.astype(ml_dtypes.float8_e4m3fn).astype(np.float64), rel,
                               rtol=1e-6)  # fmt: skip
    assert not np.array_equal(np.asarray(fp8), np.asarray(int8))


def test_bad_config():
    with pytest.raises(ValueError, match="pow2_scale"):
        ZeroQuantFPConfig(weight_format="int", pow2_scale="m1")
    with pytest.raises(ValueError, match="pow2_scale"):
        ZeroQuantFPConfig(pow2_scale="m3")
    with pytest.raises(ValueError, match="weight_format"):
        ZeroQuantFPConfig(weight_format="nf")
    with pytest.raises(ValueError, match="bits"):
        ZeroQuantFPConfig(bits=3)
    with pytest.raises(ValueError, match="method"):
        pow2_scales(jnp.ones((2, 2)), "none")
