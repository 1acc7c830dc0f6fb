"""AWQ (methods/awq): folding is exact in full precision, α = 0 is RTN, the search picks the
minimum of its objective, and the searched scales beat RTN on inputs with outlier channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import capture, structure
from harness.model import ADAPTERS, Model, ModelConfig, get_param, init_params
from methods import awq, rtn
from methods.awq import core
from methods.base import LayerStats, get_method
from numerics.config import rtn as rtn_config
from numerics.packing import bits_per_weight
from numerics.qarray import QArray
from numerics.quantize import fake_quant, quantize
from numerics.sparse import weight_bits

MHA = ModelConfig(
    vocab_size=101,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    head_dim=16,
    d_ff=128,
    attn_bias=True,
)
GQA = ModelConfig(
    vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
)
CFG = awq.AWQConfig(bits=3, group_size=32)


def _tokens(n=4, t=24, seed=1):
    return jax.random.randint(jax.random.key(seed), (n, t), 0, 101, dtype=jnp.int32)


def _outlier_layer(seed: int, d_in=64, d_out=96, n=256):
    """A weight and inputs whose first 3 channels are ~30× larger (AWQ's salient channels)."""
    kw, kx = jax.random.split(jax.random.key(seed))
    W = jax.random.normal(kw, (d_out, d_in), jnp.float32)
    big = jnp.where(jnp.arange(d_in) < 3, 30.0, 1.0)
    X = jax.random.normal(kx, (n, d_in), jnp.float32) * big[None, :]
    return W, X


def _err(X, W, W_hat):
    return float(jnp.mean(jnp.square(X @ (W_hat - W).T)))


@pytest.fixture(scope="module")
def mha_params():
    return init_params(MHA, 0)


@pytest.fixture(scope="module")
def logits_fn():
    return jax.jit(Model(MHA).forward)


@pytest.fixture(scope="module")
def gqa_result():
    params = init_params(GQA, 0)
    return params, awq.quantize_model(params, GQA, _tokens(), CFG, batch_size=2)


# ------------------------------------------------------------------------------------ folding


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_fold_random_scales_preserves_fp_outputs(mha_params, logits_fn, seed):
    rng = np.random.default_rng(seed)
    blocks = []
    for bp in mha_params["blocks"]:
        for g in ADAPTERS[MHA.family]:
            d = get_param(bp, g.names[0]).shape[1]
            s = jnp.asarray(np.exp(rng.normal(0.0, 1.0, d)), jnp.float32)
            bp = structure.fold_scale(bp, g, s)
        blocks.append(bp)
    toks = _tokens(2, 16)
    ref = logits_fn(mha_params, toks)
    got = logits_fn({**mha_params, "blocks": blocks}, toks)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(blocks[0]["attn_norm"], mha_params["blocks"][0]["attn_norm"])


def test_searched_scales_fold_preserves_fp_outputs(gqa_result):
    """The scales AWQ actually finds, folded into a float model, leave its logits unchanged."""
    params, _ = gqa_result
    model, found = Model(GQA), []

    def on_block(i, bp, calib):
        bp_s, _, rows = awq.awq_block(model, i, bp, calib, CFG, batch_size=2)
        found.extend(rows)
        return bp_s

    scaled = capture.sequential(
        params,
        GQA,
        _tokens(),
        on_block,
        accumulators={"act_absmean": capture.absmean()},
        batch_size=2,
    )
    assert any(r.get("alpha", 0.0) > 0 for r in found)  # something was actually scaled
    toks = _tokens(2, 16, seed=7)
    f = jax.jit(model.forward)
    np.testing.assert_allclose(f(scaled, toks), f(params, toks), rtol=1e-4, atol=1e-4)


def test_gqa_o_proj_is_not_scaled(gqa_result):
    params, qm = gqa_result
    rows = {r["name"]: r for r in qm.report}
    for i in range(GQA.n_layers):
        assert rows[f"blocks.{i}.attn.o_proj"]["scaled"] is False  # repo: v/o shapes differ
        assert rows[f"blocks.{i}.mlp.down_proj"]["scaled"] is True
    o_group = ADAPTERS[GQA.family][1]
    with pytest.raises(ValueError, match="rows of attn.v_proj"):
        structure.fold_scale(params["blocks"][0], o_group, jnp.ones((64,), jnp.float32))


# ------------------------------------------------------------------------------- the search


def test_alpha_zero_is_rtn_layer():
    W, X = _outlier_layer(0)
    cfg = awq.AWQConfig(bits=3, group_size=32, n_grid=1, clip=False)
    res = awq.quantize_layer(W, LayerStats(X=X), cfg)
    ref = rtn.quantize_layer(W, LayerStats(), rtn.RTNConfig(bits=3, group_size=32))
    np.testing.assert_array_equal(res.weight.s, np.ones(64, np.float16))
    np.testing.assert_array_equal(res.weight.dequantize(), ref.weight.dequantize())
    np.testing.assert_array_equal(res.weight.q.codes, ref.weight.codes)


def test_alpha_zero_is_rtn_model(gqa_result):
    params, _ = gqa_result
    cfg = awq.AWQConfig(bits=3, group_size=32, n_grid=1, clip=False)
    got = awq.quantize_model(params, GQA, _tokens(), cfg, batch_size=2).params
    ref = rtn.quantize_model(params, GQA, _tokens(), rtn.RTNConfig(bits=3, group_size=32)).params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_chosen_alpha_minimises_the_objective():
    W, X = _outlier_layer(1)
    cfg = awq.AWQConfig(bits=3, group_size=32, clip=False)
    res = awq.quantize_layer(W, LayerStats(X=X), cfg)
    s_X = np.mean(np.abs(np.asarray(X)), axis=0)
    qcfg = rtn_config(3, group_size=32, sym=False, scale_dtype="float16")
    losses = []
    for a in np.arange(20) / 20:  # independent re-computation of eq. 5 on the repo's grid
        s = np.maximum(s_X ** np.float32(a), 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float16).astype(np.float32)
        W_hat = fake_quant(W * s[None, :], qcfg) / s[None, :]
        losses.append(_err(X, W, W_hat))
    np.testing.assert_allclose(res.info["losses"], losses, rtol=1e-5)
    best = int(np.argmin(losses))
    assert float(res.info["alpha"]) == pytest.approx(best / 20)
    assert best > 0  # outlier channels: scaling helps
    assert _err(X, W, res.weight.dequantize()) == pytest.approx(min(losses), rel=1e-5)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]))
def test_scale_search_never_worse_than_rtn(seed, bits):
    """α = 0 (RTN) is on the grid, so the output error of the searched scales is ≤ RTN's."""
    W, X = _outlier_layer(seed, n=128)
    res = awq.quantize_layer(
        W, LayerStats(X=X), awq.AWQConfig(bits=bits, group_size=32, clip=False)
    )
    ref = rtn.quantize_layer(W, LayerStats(), rtn.RTNConfig(bits=bits, group_size=32)).weight
    assert _err(X, W, res.weight.dequantize()) <= _err(X, W, ref.dequantize()) * (1 + 1e-6)


def test_outlier_channels_awq_beats_rtn():
    W, X = _outlier_layer(2)
    res = awq.quantize_layer(W, LayerStats(X=X), CFG)  # scale search + clipping
    ref = rtn.quantize_layer(W, LayerStats(), rtn.RTNConfig(bits=3, group_size=32)).weight
    assert _err(X, W, res.weight.dequantize()) < 0.5 * _err(X, W, ref.dequantize())


def test_clip_search_takes_the_best_ratio_per_group():
    W, X = _outlier_layer(3, n=64)
    qcfg = CFG.quant_config()
    m = core.clip_search(W, X, qcfg, group_size=32)
    amax = jnp.max(jnp.abs(W.reshape(96, 2, 32)), axis=-1)
    ratios = np.asarray(m / amax)
    grid = 1.0 - np.arange(10) / 20
    assert np.all(np.min(np.abs(ratios[..., None] - grid), axis=-1) < 1e-6)

    def group_err(Wc):
        D = (fake_quant(Wc, qcfg) - W).reshape(96, 2, 32)
        return np.mean(np.einsum("ngk,ogk->ogn", X.reshape(64, 2, 32), D) ** 2, axis=-1)

    best = group_err(core.apply_clip(W, m, 32))
    for r in grid:
        assert np.all(best <= group_err(core.apply_clip(W, amax * r, 32)) * (1 + 1e-5))


def test_ragged_last_group_is_searched_and_quantized_on_its_own_columns():
    """d_in = 80 in groups of 32: two whole groups and one of 16. The groups are independent,
    so the ragged search equals the whole part searched alone and the tail searched alone."""
    W, X = _outlier_layer(5, d_in=80, n=64)
    cfg = awq.AWQConfig(bits=3, group_size=32, ragged=True)
    m = core.clip_search(W, X, cfg.quant_config(), group_size=32, ragged=True)
    assert m.shape == (96, 3)
    whole = core.clip_search(W[:, :64], X[:, :64], CFG.quant_config(), group_size=32)
    tail_q = awq.AWQConfig(bits=3, group_size=16).quant_config()
    tail = core.clip_search(W[:, 64:], X[:, 64:], tail_q, group_size=16)
    np.testing.assert_array_equal(np.asarray(m), np.concatenate([whole, tail], axis=1))
    clipped = core.apply_clip(W, m, 32)
    apart = [core.apply_clip(W[:, :64], whole, 32), core.apply_clip(W[:, 64:], tail, 16)]
    np.testing.assert_array_equal(np.asarray(clipped), np.concatenate(apart, axis=1))
    with pytest.raises(ValueError, match="clip groups"):
        core.apply_clip(W, m, 16)
    res = awq.quantize_layer(W, LayerStats(X=X), cfg)
    assert res.weight.q.nb == (96, 3)
    assert _err(X, W, res.weight.dequantize()) <= _err(X, W, fake_quant(W, cfg.quant_config()))
    with pytest.raises(ValueError, match="ragged=True"):
        awq.quantize_layer(W, LayerStats(X=X), CFG)


# ------------------------------------------------------------------------- model, jit, inputs


def test_model_structure_and_bits(gqa_result):
    params, qm = gqa_result
    assert len(qm.report) == 7 * GQA.n_layers
    for r in qm.report:
        leaf = get_param(qm.params, r["name"])
        assert isinstance(leaf, QArray) and leaf.format.bits == 3
    assert qm.bits_per_weight == pytest.approx(3 + 16 / 32 + 3 / 32)
    logits = jax.jit(Model(GQA).forward)(qm.params, _tokens(2, 16))
    assert np.all(np.isfinite(logits))
    assert get_method("awq").quantize_model is awq.quantize_model


def test_deterministic_model(gqa_result):
    params, qm = gqa_result
    again = awq.quantize_model(params, GQA, _tokens(), CFG, batch_size=2)
    for a, b in zip(jax.tree.leaves(qm.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_layer_jit_matches_eager_and_keeps_dtype():
    W, X = _outlier_layer(4, n=64)
    f = jax.jit(lambda W, X: awq.quantize_layer(W, LayerStats(X=X), CFG).weight.dequantize())
    eager = awq.quantize_layer(W, LayerStats(X=X), CFG).weight.dequantize()
    np.testing.assert_array_equal(f(W, X), eager)
    np.testing.assert_array_equal(f(W, X), eager)
    Wb = W.astype(jnp.bfloat16)
    assert awq.quantize_layer(Wb, LayerStats(X=X), CFG).weight.dequantize().dtype == jnp.bfloat16


def test_bad_inputs():
    W, X = _outlier_layer(5, n=32)
    for bad in (
        {"bits": 5},
        {"n_grid": 0},
        {"group_size": 0},
        {"clip_max_shrink": 1.0},
        {"propagate": "both"},
    ):
        with pytest.raises(ValueError):
            awq.AWQConfig(**bad)
    with pytest.raises(ValueError, match="LayerStats.X"):
        awq.quantize_layer(W, LayerStats(), CFG)
    with pytest.raises(ValueError, match="group_size"):
        awq.quantize_layer(W, LayerStats(X=X), awq.AWQConfig(group_size=48))
    with pytest.raises(ValueError, match="NaN"):
        awq.quantize_layer(W.at[0, 0].set(jnp.nan), LayerStats(X=X), CFG)
    with pytest.raises(ValueError, match="X must be"):
        awq.quantize_layer(W, LayerStats(X=X[:, :32]), CFG)
    with pytest.raises(TypeError):
        awq.quantize_layer(W.astype(jnp.int32), LayerStats(X=X), CFG)


def test_scaled_qarray_bits():
    W, X = _outlier_layer(6, n=32)
    w = awq.quantize_layer(W, LayerStats(X=X), CFG).weight
    qa = quantize(W, CFG.quant_config())
    assert w.bits_per_weight() == pytest.approx(bits_per_weight(qa) + 16 * 64 / W.size)
    assert weight_bits(w) == w.bits_per_weight()  # s counted: d_in fp16 values


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_from_the_last_saved_block(gqa_result, tmp_path):
    params, qm = gqa_result

    def stop(i):
        raise _Stop(i)

    with pytest.raises(_Stop):
        awq.quantize_model(
            params, GQA, _tokens(), CFG, batch_size=2, checkpoint_dir=tmp_path, on_block_done=stop
        )
    ran = []
    resumed = awq.quantize_model(
        params, GQA, _tokens(), CFG, batch_size=2, checkpoint_dir=tmp_path, on_block_done=ran.append
    )
    assert ran == [1]  # block 0 came from the checkpoint
    assert [r["name"] for r in resumed.report] == [r["name"] for r in qm.report]
    for a, b in zip(jax.tree.leaves(qm.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
