"""Sequential calibration capture: streamed statistics equal the direct ones (H = 2XᵀX/n,
absmax, absmean), the next block sees the modified block's outputs, and recapture works."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.capture import BlockCalibration, absmax, absmean, hessian, sequential
from harness.layers import Hooks
from harness.model import BLOCK_LINEARS, Model, ModelConfig, get_param, init_params, set_param

CFG = ModelConfig(
    family="gemma3",
    vocab_size=61,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=8,
    d_ff=24,
    rope_local_theta=1e4,
    sliding_window=3,
    layer_types=("local", "global"),
    mlp_activation="gelu_tanh",
    qk_norm=True,
    post_norms=True,
    embed_scale=True,
)
LLAMA = ModelConfig(
    family="llama",
    vocab_size=61,
    d_model=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    d_ff=24,
)
N, T = 5, 6
ACCS = {"H": hessian(), "absmax": absmax(), "absmean": absmean()}


def calib_tokens(cfg, seed=0):
    return jax.random.randint(jax.random.key(seed), (N, T), 0, cfg.vocab_size, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def direct_inputs(model, params, tokens):
    """Every block's linear inputs, computed in one full-batch pass (the reference)."""
    h = model.embed(params, tokens)
    out = []
    for i in range(model.cfg.n_layers):
        h_next, ins = model.apply_block(params["blocks"][i], i, h, capture=True)
        out.append(dict(ins, block_input=h))
        h = h_next
    return out


@settings(max_examples=12)  # every new split is a new shape, i.e. new compilations
@given(split=st.integers(0, 24), seed=st.integers(0, 99))
def test_accumulators_streamed_equal_direct(split, seed):
    rows, d = 24, 5
    X = np.random.default_rng(seed).normal(size=(rows, d)).astype(np.float32) * 3
    for name, acc in ACCS.items():
        s = acc.update(acc.update(acc.init(d), jnp.asarray(X[:split])), jnp.asarray(X[split:]))
        if name == "H":
            np.testing.assert_allclose(
                np.asarray(s.H), 2 * X.T.astype(np.float64) @ X / rows, rtol=1e-5, atol=1e-5
            )
            assert int(s.n) == rows
        elif name == "absmax":
            np.testing.assert_allclose(np.asarray(s), np.abs(X).max(0), rtol=1e-6)
        else:
            np.testing.assert_allclose(np.asarray(s.mean), np.abs(X).mean(0), rtol=1e-5, atol=1e-6)
            assert int(s.n) == rows


@pytest.mark.parametrize(
    "cfg, batch_size", [(CFG, 2), (LLAMA, N)], ids=["gemma3-3-uneven-batches", "llama-1-batch"]
)
def test_sequential_stats_equal_direct_computation(cfg, batch_size):
    params, tokens = init_params(cfg, 0), calib_tokens(cfg)
    ref = direct_inputs(Model(cfg), params, tokens)
    seen = []

    def on_block(i, bp, calib):
        assert isinstance(calib, BlockCalibration) and calib.layer == i
        assert set(calib) == set(BLOCK_LINEARS)
        np.testing.assert_allclose(
            np.asarray(calib.inputs), np.asarray(ref[i]["block_input"]), rtol=1e-5, atol=1e-6
        )
        for name in BLOCK_LINEARS:
            X = np.asarray(ref[i][name], np.float64).reshape(-1, ref[i][name].shape[-1])
            np.testing.assert_allclose(
                np.asarray(calib[name]["H"].H), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                np.asarray(calib[name]["absmax"]), np.abs(X).max(0), rtol=1e-5
            )
        seen.append(i)
        return bp

    out = sequential(params, cfg, tokens, on_block, accumulators=ACCS, batch_size=batch_size)
    assert seen == [0, 1]
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out, params
    )


def test_next_block_sees_the_modified_block():
    params, tokens = init_params(CFG, 1), calib_tokens(CFG, 1)
    new0 = set_param(
        params["blocks"][0], "mlp.down_proj", 0.5 * get_param(params, "blocks.0.mlp.down_proj")
    )
    modified = dict(params, blocks=[new0, params["blocks"][1]])
    ref = direct_inputs(Model(CFG), modified, tokens)  # block 1's inputs after the change
    grabbed = {}

    def on_block(i, bp, calib):
        grabbed[i] = calib
        return new0 if i == 0 else bp

    out = sequential(params, CFG, tokens, on_block, batch_size=N)
    assert out["blocks"][0] is new0
    X = np.asarray(ref[1]["mlp.gate_proj"], np.float64).reshape(-1, CFG.d_model)
    np.testing.assert_allclose(
        np.asarray(grabbed[1]["mlp.gate_proj"]["H"].H),
        2 * X.T @ X / X.shape[0],
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(grabbed[1].inputs), np.asarray(ref[1]["block_input"]), rtol=1e-5, atol=1e-6
    )


def test_recapture_after_changing_part_of_the_block():
    """GPTQ's true-sequential order: change v_proj, re-capture o_proj's input."""
    params, tokens = init_params(CFG, 2), calib_tokens(CFG, 2)
    model = Model(CFG)

    def on_block(i, bp, calib):
        before = calib["attn.o_proj"]["H"].H
        changed = set_param(bp, "attn.v_proj", get_param(bp, "attn.v_proj") * 2.0)
        new = calib.recapture(changed, ("attn.o_proj",))
        assert set(new) == {"attn.o_proj"}
        # v doubled -> attention output doubled -> H of o_proj multiplied by 4
        np.testing.assert_allclose(
            np.asarray(calib["attn.o_proj"]["H"].H), 4 * np.asarray(before), rtol=1e-4, atol=1e-5
        )
        _, ins = jax.jit(lambda bp, h: model.apply_block(bp, i, h, capture=True))(
            changed, calib.inputs
        )
        X = np.asarray(ins["attn.o_proj"], np.float64).reshape(-1, ins["attn.o_proj"].shape[-1])
        np.testing.assert_allclose(
            np.asarray(calib["attn.o_proj"]["H"].H), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(calib.outputs(changed)),
            np.asarray(jax.jit(model.apply_block, static_argnums=1)(changed, i, calib.inputs)),
            rtol=1e-5,
            atol=1e-6,
        )
        return changed

    sequential(params, CFG, tokens, on_block, names=("attn.q_proj", "attn.o_proj"), batch_size=N)


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gemma3", "llama"])
def test_cached_attention_equals_rerunning_the_block(cfg):
    """After ``cache_attention`` (q/k/v final), changing o/gate/up/down and re-capturing gives
    the statistics and outputs that re-running the whole block gives; q/k/v can't be
    re-captured any more."""
    params, tokens = init_params(cfg, 4), calib_tokens(cfg, 4)
    model = Model(cfg)
    seen = []

    def on_block(i, bp, calib):
        calib.cache_attention(bp)
        changed = bp
        for n in ("attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            changed = set_param(changed, n, get_param(changed, n) * 1.5)
        names = ("attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        cached = calib.recapture(changed, names)
        plain = BlockCalibration(model, i, calib.inputs, ACCS, batch_size=2)
        fresh = plain.recapture(changed, names)
        for n in names:
            for k in ACCS:
                a, b = jax.tree.leaves(cached[n][k]), jax.tree.leaves(fresh[n][k])
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(calib.outputs(changed)),
            np.asarray(plain.outputs(changed)),
            rtol=1e-5,
            atol=1e-6,
        )
        with pytest.raises(ValueError, match="cached"):
            calib.recapture(changed, ("attn.k_proj",))
        # down_proj's input cached too: its statistics and the outputs are still the same
        calib.cache_down_input(changed)
        again = set_param(changed, "mlp.down_proj", get_param(changed, "mlp.down_proj") * 0.5)
        down = calib.recapture(again, ("mlp.down_proj",))
        fresh = plain.recapture(again, ("mlp.down_proj",))
        for k in ACCS:
            for x, y in zip(
                jax.tree.leaves(down["mlp.down_proj"][k]),
                jax.tree.leaves(fresh["mlp.down_proj"][k]),
                strict=True,
            ):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(calib.outputs(again)), np.asarray(plain.outputs(again)), rtol=1e-5, atol=1e-6
        )
        with pytest.raises(ValueError, match="cached"):
            calib.recapture(again, ("mlp.up_proj",))
        # new q/k/v: caching the attention again recomputes it (and drops down's stale input)
        new_q = set_param(again, "attn.q_proj", get_param(again, "attn.q_proj") * 2.0)
        calib.cache_attention(new_q)
        plain.cache_attention(new_q)
        assert calib.down_in is None
        np.testing.assert_array_equal(np.asarray(calib.mix), np.asarray(plain.mix))
        seen.append(i)
        return changed

    sequential(params, cfg, tokens, on_block, accumulators=ACCS, batch_size=3)
    assert seen == [0, 1]


def test_bad_arguments():
    params = init_params(CFG, 0)
    ident = lambda i, bp, c: bp
    with pytest.raises(ValueError, match="integer"):
        sequential(params, CFG, jnp.zeros((2, 3), jnp.float32), ident)
    with pytest.raises(ValueError, match="non-empty"):
        sequential(params, CFG, jnp.zeros((0, 3), jnp.int32), ident)
    with pytest.raises(ValueError, match="unknown linear"):
        sequential(params, CFG, calib_tokens(CFG), ident, names=("attn.qkv",))
    with pytest.raises(TypeError, match="returned None"):
        sequential(params, CFG, calib_tokens(CFG), lambda i, bp, c: None)
    with pytest.raises(KeyError, match="no statistics"):
        sequential(
            params,
            CFG,
            calib_tokens(CFG),
            lambda i, bp, c: c["mlp.up_proj"],
            names=("attn.q_proj",),
        )


def test_hooks_apply_during_calibration():
    """With an act_quant hook the next block sees the hooked numerics; statistics record the
    linear inputs before act_quant."""
    params, tokens = init_params(CFG, 3), calib_tokens(CFG, 3)
    hooks = Hooks(act_quant=lambda name, x: jnp.round(x * 4.0) / 4.0)
    ref = direct_inputs(Model(CFG, hooks), params, tokens)
    grabbed = {}

    def on_block(i, bp, calib):
        grabbed[i] = (calib.inputs, calib["mlp.down_proj"]["H"].H)
        return bp

    sequential(params, CFG, tokens, on_block, hooks=hooks, batch_size=N)
    for i in range(CFG.n_layers):
        np.testing.assert_allclose(
            np.asarray(grabbed[i][0]), np.asarray(ref[i]["block_input"]), rtol=1e-5, atol=1e-5
        )
        X = np.asarray(ref[i]["mlp.down_proj"], np.float64).reshape(-1, CFG.d_ff)
        np.testing.assert_allclose(
            np.asarray(grabbed[i][1]), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5
        )
    plain = direct_inputs(Model(CFG), params, tokens)
    assert float(jnp.max(jnp.abs(plain[1]["block_input"] - ref[1]["block_input"]))) > 1e-3
