"""methods.actquant / methods.hooks: the shared activation quantizers of the W+A family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.layers import NO_HOOKS
from methods.actquant import ActQuantConfig, act_quantizer
from methods.hooks import ActTable, act_hooks

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)) * 3.0, jnp.float32)


@pytest.mark.parametrize("fmt", ["int", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("gran,static", [("token", False), ("tensor", False), ("tensor", True)])
def test_quantizer_error_bounded_and_nan_propagates(fmt, gran, static):
    cfg = ActQuantConfig(format=fmt, granularity=gran, static=static)
    absmax = jnp.max(jnp.abs(X).reshape(-1, 16), axis=0)
    q = jax.jit(act_quantizer(cfg, absmax))
    y = np.asarray(q(X))
    assert y.shape == X.shape and np.all(np.isfinite(y))
    # relative to the scale's range: INT8 steps are max/127, FP8 E5M2 keeps 2 mantissa bits
    rel = {"int": 1 / 127, "fp8_e4m3": 2**-4, "fp8_e5m2": 2**-3}[fmt]
    assert np.max(np.abs(y - np.asarray(X))) <= rel * float(jnp.max(jnp.abs(X))) + 1e-6
    assert not np.array_equal(y, np.asarray(X))  # it does quantize
    bad = np.asarray(q(X.at[1, 2, 3].set(jnp.nan)))
    assert np.isnan(bad[1, 2, 3])
    if gran == "tensor" and not static:  # the one run-time scale is NaN: the whole tensor is
        assert np.all(np.isnan(bad))
    else:  # other tokens untouched by the NaN
        assert np.array_equal(bad[0], y[0])


def test_per_token_scales_are_per_row():
    cfg = ActQuantConfig(bits=8)
    big = X.at[0, 0].multiply(1000.0)
    a, b = act_quantizer(cfg)(X), act_quantizer(cfg)(big)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.array_equal(np.asarray(a[0, 0]), np.asarray(b[0, 0]) / 1000.0)


def test_static_scale_saturates():
    cfg = ActQuantConfig(granularity="tensor", static=True)
    q = act_quantizer(cfg, jnp.ones((16,), jnp.float32))
    y = np.asarray(q(X))
    assert np.max(np.abs(y)) <= 1.0 + 1e-6


def test_bad_configs_and_calibrations():
    with pytest.raises(ValueError, match="bits"):
        ActQuantConfig(bits=5)
    with pytest.raises(ValueError, match="8 bits"):
        ActQuantConfig(bits=4, format="fp8_e4m3")
    with pytest.raises(ValueError, match="per tensor"):
        ActQuantConfig(granularity="token", static=True)
    with pytest.raises(ValueError, match="format"):
        ActQuantConfig(format="int9")
    cfg = ActQuantConfig(granularity="tensor", static=True)
    with pytest.raises(ValueError, match="calibrated to 0.0"):
        act_quantizer(cfg, jnp.zeros((16,), jnp.float32))
    with pytest.raises(ValueError, match="calibrated to nan"):
        act_quantizer(cfg, jnp.full((16,), jnp.nan, jnp.float32))
    with pytest.raises(ValueError, match="needs the act_absmax"):
        act_quantizer(cfg, None)
    assert act_quantizer(ActQuantConfig(bits=16)) is None


def test_act_hooks_table():
    q = act_quantizer(ActQuantConfig(bits=4))
    hooks = act_hooks({"blocks.0.attn.q_proj": q})
    assert isinstance(hooks.act_quant, ActTable)
    np.testing.assert_array_equal(hooks.act_quant("blocks.0.attn.q_proj", X), q(X))
    assert hooks.act_quant("lm_head", X) is X
    assert act_hooks({}) == NO_HOOKS
    with pytest.raises(ValueError, match="already"):
        act_hooks({"x": q}, hooks)
