"""OmniQuant weight-only (methods/omniquant): LWC's quantizer is the stored QArray, σ = 1 is
min-max RTN, training lowers the loss below the min-max start, and runs are deterministic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.model import BLOCK_LINEARS, Model, ModelConfig, get_param, init_params, set_param
from methods import omniquant as omni
from methods import rtn
from methods.base import LayerStats, get_method
from methods.omniquant import core
from numerics.qarray import QArray
from numerics.quantize import quantize

TINY = ModelConfig(
    vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
)
CFG = omni.OmniQuantConfig(bits=3, group_size=32, epochs=4, lr=5e-2)


def _tokens(n=4, t=24, seed=1):
    return jax.random.randint(jax.random.key(seed), (n, t), 0, 101, dtype=jnp.int32)


def _layer(seed: int, d_in=64, d_out=96, n=256):
    kw, kx = jax.random.split(jax.random.key(seed))
    W = jax.random.normal(kw, (d_out, d_in), jnp.float32)
    X = jax.random.normal(kx, (n, d_in), jnp.float32)
    return W, X


def _err(X, W, W_hat):
    return float(jnp.mean(jnp.square(X @ (W_hat - W).T)))


@pytest.fixture(scope="module")
def tiny_result():
    params = init_params(TINY, 0)
    return params, omni.quantize_model(params, TINY, _tokens(), CFG, batch_size=2)


# -------------------------------------------------------------------------- the LWC quantizer


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4]),
    sym=st.booleans(),
    group=st.sampled_from([32, None]),
)
def test_stored_qarray_is_the_trained_fake_quantizer(seed, bits, sym, group):
    cfg = omni.OmniQuantConfig(bits=bits, group_size=group, sym=sym)
    kw, kg, kb = jax.random.split(jax.random.key(seed), 3)
    W = jax.random.normal(kw, (8, 64), jnp.float32)
    theta = core.lwc_init(W, cfg)
    theta = {
        k: v + jax.random.normal(k2, v.shape, jnp.float32)
        for (k, v), k2 in zip(theta.items(), (kg, kb), strict=True)
    }
    qa = jax.jit(core.lwc_quantize, static_argnums=2)(W, theta, cfg)
    qa.check()
    fq = jax.jit(core.lwc_fake_quant, static_argnums=2)(W, theta, cfg)
    np.testing.assert_array_equal(qa.dequantize(), fq)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]))
def test_full_strength_clipping_is_minmax_rtn(seed, bits):
    """γ = β = σ(100) = 1: eq. (2) is plain asymmetric min-max RTN, code for code."""
    cfg = omni.OmniQuantConfig(bits=bits, group_size=32, init_logit=100.0)
    W = jax.random.normal(jax.random.key(seed), (16, 64), jnp.float32)
    qa = core.lwc_quantize(W, core.lwc_init(W, cfg), cfg)
    ref = rtn.quantize_layer(W, LayerStats(), rtn.RTNConfig(bits=bits, group_size=32)).weight
    np.testing.assert_array_equal(qa.codes, ref.codes)
    np.testing.assert_array_equal(qa.scale, ref.scale)
    np.testing.assert_array_equal(qa.zero, ref.zero)


def test_straight_through_gradient_reaches_the_logits():
    W, X = _layer(0, n=64)
    cfg = omni.OmniQuantConfig(bits=3, group_size=32)
    theta = core.lwc_init(W, cfg)
    g = jax.jit(jax.grad(lambda th: core.output_error(X, W, core.lwc_fake_quant(W, th, cfg))))(
        theta
    )
    for v in g.values():
        assert np.all(np.isfinite(v)) and np.count_nonzero(v) > 0.9 * v.size


# ------------------------------------------------------------------------------- training


@given(seed=st.integers(0, 2**16), sym=st.booleans())
def test_ragged_last_group_uses_its_own_min_and_max(seed, sym):
    """d_in = 40 in groups of 16: two whole groups and one of 8 (edge-padded inside). Groups
    are independent: the ragged fake quantizer equals the whole part and the tail quantized
    apart, and the stored QArray dequantizes to it."""
    W = jax.random.normal(jax.random.key(seed), (6, 40), jnp.float32)
    cfg = omni.OmniQuantConfig(bits=3, group_size=16, sym=sym, ragged=True)
    theta = jax.tree.map(
        lambda a: a + jax.random.normal(jax.random.key(seed + 1), a.shape), core.lwc_init(W, cfg)
    )
    assert theta["gamma"].shape == (6, 3)
    fq = core.lwc_fake_quant(W, theta, cfg)
    part = lambda a, sl: {k: v[:, sl] for k, v in a.items()}
    whole = core.lwc_fake_quant(
        W[:, :32], part(theta, slice(0, 2)), omni.OmniQuantConfig(bits=3, group_size=16, sym=sym)
    )
    tail = core.lwc_fake_quant(
        W[:, 32:], part(theta, slice(2, 3)), omni.OmniQuantConfig(bits=3, group_size=8, sym=sym)
    )
    np.testing.assert_array_equal(np.asarray(fq), np.concatenate([whole, tail], axis=1))
    qa = core.lwc_quantize(W, theta, cfg)
    assert qa.nb == (6, 3)
    np.testing.assert_allclose(np.asarray(qa.dequantize()), np.asarray(fq), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ragged=True"):
        core.lwc_init(W, omni.OmniQuantConfig(bits=3, group_size=16))


def test_layer_loss_decreases_and_ends_below_minmax():
    W, X = _layer(1)
    cfg = omni.OmniQuantConfig(bits=3, group_size=32, epochs=10, layer_steps=16)
    res = omni.quantize_layer(W, LayerStats(X=X), cfg)
    hist = np.asarray(res.info["history"])
    assert np.all(np.diff(hist[:4]) < 0) and hist[-1] < hist[0]
    minmax = rtn.quantize_layer(W, LayerStats(), rtn.RTNConfig(bits=3, group_size=32)).weight
    final = _err(X, W, res.weight.dequantize())
    assert final == pytest.approx(float(res.info["loss"]), rel=1e-5)
    assert final < float(res.info["loss_start"])  # below the σ(4) start …
    assert final < 0.95 * _err(X, W, minmax.dequantize())  # … and clearly below min-max RTN


def test_block_loss_decreases_and_beats_minmax():
    params = init_params(TINY, 0)
    model = Model(TINY)
    h = model.embed(params, _tokens())  # block 0's inputs, as in the model walk (shared compile)
    bp = params["blocks"][0]
    bq, y, info = omni.train_block(model, 0, bp, h, h, CFG, eval_batch=2)
    hist = np.asarray(info["history"])
    assert hist[-1] < hist[0]
    qcfg = rtn.RTNConfig(bits=3, group_size=32).quant_config()
    bq_rtn = bp
    for n in BLOCK_LINEARS:
        bq_rtn = set_param(bq_rtn, n, quantize(get_param(bp, n), qcfg))
    block = jax.jit(lambda b: model.apply_block(b, 0, h))

    def mse(b):
        return float(jnp.mean(jnp.square(block(b) - y)))

    assert mse(bq) < mse(bq_rtn)
    for n in BLOCK_LINEARS:  # the stored block is the trained one
        np.testing.assert_array_equal(
            get_param(bq, n).dequantize(),
            core.lwc_fake_quant(get_param(bp, n), info["theta"][n], CFG),
        )


# ----------------------------------------------------------------------- model, jit, inputs


def test_model_structure_and_bits(tiny_result):
    params, qm = tiny_result
    assert len(qm.report) == 7 * TINY.n_layers
    for r in qm.report:
        leaf = get_param(qm.params, r["name"])
        assert isinstance(leaf, QArray) and leaf.format.bits == 3
        assert r["loss_last_epoch"] < r["loss_first_epoch"]
    assert qm.bits_per_weight == pytest.approx(3 + 16 / 32 + 3 / 32)
    assert np.all(np.isfinite(jax.jit(Model(TINY).forward)(qm.params, _tokens(2, 16))))
    assert get_method("omniquant").quantize_model is omni.quantize_model


def test_deterministic_model(tiny_result):
    params, qm = tiny_result
    again = omni.quantize_model(params, TINY, _tokens(), CFG, batch_size=2)
    for a, b in zip(jax.tree.leaves(qm.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_layer_jit_matches_eager_and_keeps_dtype():
    W, X = _layer(2, n=64)
    cfg = omni.OmniQuantConfig(bits=3, group_size=32, epochs=2, layer_steps=4)
    f = jax.jit(lambda W, X: omni.quantize_layer(W, LayerStats(X=X), cfg).weight.dequantize())
    eager = omni.quantize_layer(W, LayerStats(X=X), cfg).weight.dequantize()
    np.testing.assert_array_equal(f(W, X), eager)
    np.testing.assert_array_equal(f(W, X), eager)
    Wb = W.astype(jnp.bfloat16)
    assert omni.quantize_layer(Wb, LayerStats(X=X), cfg).weight.dequantize().dtype == jnp.bfloat16


def test_bad_inputs():
    W, X = _layer(3, n=32)
    for bad in ({"bits": 5}, {"epochs": 0}, {"lr": 0.0}, {"group_size": -1}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            omni.OmniQuantConfig(**bad)
    with pytest.raises(ValueError, match="LayerStats.X"):
        omni.quantize_layer(W, LayerStats(), CFG)
    with pytest.raises(ValueError, match="group_size"):
        omni.quantize_layer(W, LayerStats(X=X), omni.OmniQuantConfig(group_size=48))
    with pytest.raises(ValueError, match="NaN"):
        omni.quantize_layer(W.at[0, 0].set(jnp.inf), LayerStats(X=X), CFG)
    with pytest.raises(ValueError, match="X must be"):
        omni.quantize_layer(W, LayerStats(X=X[:, :32]), CFG)
    with pytest.raises(TypeError):
        omni.quantize_layer(W.astype(jnp.int32), LayerStats(X=X), CFG)


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_from_the_last_saved_block(tiny_result, tmp_path):
    params, qm = tiny_result

    def stop(i):
        raise _Stop(i)

    with pytest.raises(_Stop):
        omni.quantize_model(
            params, TINY, _tokens(), CFG, batch_size=2, checkpoint_dir=tmp_path, on_block_done=stop
        )
    ran = []
    resumed = omni.quantize_model(
        params,
        TINY,
        _tokens(),
        CFG,
        batch_size=2,
        checkpoint_dir=tmp_path,
        on_block_done=ran.append,
    )
    assert ran == [1]  # block 0 came from the checkpoint
    assert [r["name"] for r in resumed.report] == [r["name"] for r in qm.report]
    for a, b in zip(jax.tree.leaves(qm.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
