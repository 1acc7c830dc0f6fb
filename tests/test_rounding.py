"""STE and LSQ gradients, checked with jax.grad against their defining formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics.config import QuantConfig
from numerics.rounding import lsq_fake_quant, ste_fake_quant


def test_ste_forward_is_fake_quant_and_gradient_is_clipped_identity():
    cfg = QuantConfig(format="int4", granularity="tensor", range="percentile", percentile=80.0)
    x = jnp.linspace(-3.0, 3.0, 61, dtype=jnp.float32)[None, :]
    g = jax.grad(lambda a: jnp.sum(ste_fake_quant(a, cfg) * 1.0))(x)
    s = float(np.percentile(np.abs(np.asarray(x)), 80.0)) / 7
    inside = np.abs(np.asarray(x)) / s <= 7.5
    assert 0 < inside.sum() < inside.size  # the test really has both regions
    np.testing.assert_array_equal(np.asarray(g), inside.astype(np.float32))


def _lsq_reference_grads(v, s, qn, qp):
    r = v / s
    dv = ((r > -qn) & (r < qp)).astype(np.float32)
    ds = np.where(r <= -qn, -qn, np.where(r >= qp, qp, np.round(r) - r))
    g = 1.0 / np.sqrt(v.size * qp)
    return dv, float(np.sum(ds) * g)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False), (8, True)])
def test_lsq_gradients_match_paper_formula(bits, signed):
    v = jax.random.normal(jax.random.key(bits), (256,)) * 2.0
    s = jnp.asarray(0.3, jnp.float32)
    f = lambda v_, s_: jnp.sum(lsq_fake_quant(v_, s_, bits=bits, signed=signed))
    dv, ds = jax.grad(f, argnums=(0, 1))(v, s)
    qn = 2 ** (bits - 1) if signed else 0
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    ref_dv, ref_ds = _lsq_reference_grads(np.asarray(v), 0.3, qn, qp)
    np.testing.assert_array_equal(np.asarray(dv), ref_dv)
    np.testing.assert_allclose(float(ds), ref_ds, rtol=1e-5)


def test_lsq_per_channel_step_gradient_shape():
    v = jax.random.normal(jax.random.key(0), (8, 32))
    s = jnp.full((8, 1), 0.2, jnp.float32)
    ds = jax.grad(lambda s_: jnp.sum(lsq_fake_quant(v, s_, bits=4)))(s)
    assert ds.shape == (8, 1)
    ref = [_lsq_reference_grads(np.asarray(v[i]), 0.2, 8, 7)[1] for i in range(8)]
    # per-channel: N in g = 1/sqrt(N·Q_P) is the number of elements per step (32)
    np.testing.assert_allclose(np.asarray(ds[:, 0]), ref, rtol=1e-5)


def test_lsq_forward_values_and_bad_bits():
    v = jnp.asarray([-10.0, -0.26, 0.0, 0.31, 10.0], jnp.float32)
    out = lsq_fake_quant(v, jnp.asarray(0.1, jnp.float32), bits=4)
    np.testing.assert_allclose(out, [-0.8, -0.3, 0.0, 0.3, 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="2..8"):
        lsq_fake_quant(v, jnp.asarray(0.1, jnp.float32), bits=1)
