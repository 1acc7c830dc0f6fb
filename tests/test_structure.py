"""The adapter table and its folds (harness/structure.py): every fold keeps the float block's
outputs on tiny random models of both families, and every fold that cannot hold is refused.

Tolerance: the folds only re-associate float32 products (``(W·s)(x/s)``, ``(W·Q)(Qᵀ·y)``), so
outputs differ from the unfolded block by rounding alone — a few ulps per product, summed over
widths ≤ 64 and two residual branches. ``rtol = atol = 2e-5`` (≈ 170 ulps at |y| ~ 1) leaves
room for that (measured: at most 1.5e-6 on |y| ≤ 6) and still fails for any fold that is
wrong: a mis-folded scale or rotation changes outputs by O(1) (checked below by folding into
the columns only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import block_diag
from scipy.stats import ortho_group

from harness import structure
from harness.layers import NO_HOOKS, Hooks
from harness.model import Model, ModelConfig, get_param, init_params, set_param
from harness.structure import (
    absorb_norm,
    can_fold,
    fold_rotation,
    fold_scale,
)
from numerics.config import rtn as rtn_config
from numerics.quantize import quantize

LLAMA = ModelConfig(
    family="llama",
    vocab_size=97,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=4,
    head_dim=8,
    d_ff=48,
    attn_bias=True,
)
LLAMA_GQA = ModelConfig(
    family="llama", vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
    d_ff=48,
)  # fmt: skip
GEMMA = ModelConfig(
    family="gemma3",
    vocab_size=97,
    d_model=32,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    head_dim=16,
    d_ff=64,
    norm_eps=1e-6,
    rope_theta=1e6,
    rope_local_theta=1e4,
    sliding_window=4,
    layer_types=("local",),
    mlp_activation="gelu_tanh",
    qk_norm=True,
    post_norms=True,
    embed_scale=True,
    query_scale=16**-0.5,
)
CONFIGS = {"llama": LLAMA, "gemma3": GEMMA}
TOL = {"rtol": 2e-5, "atol": 2e-5}


def _block(cfg, seed=0):
    """Block 0 with norm weights and biases perturbed (so that no fold is trivially exact)."""
    rng = np.random.default_rng(seed + 1)

    def perturb(path, x):
        key = jax.tree_util.keystr(path)
        if "norm" in key:
            return jnp.asarray(1.0 + 0.3 * rng.normal(size=x.shape).astype(np.float32))
        if key.endswith("_bias']"):
            return jnp.asarray(0.1 * rng.normal(size=x.shape).astype(np.float32))
        return x

    return jax.tree_util.tree_map_with_path(perturb, init_params(cfg, seed))["blocks"][0]


def _h(cfg, seed=0):
    return jax.random.normal(jax.random.key(seed), (2, 10, cfg.d_model), jnp.float32)


def _run(cfg, bp, h, hooks=NO_HOOKS):
    with jax.default_matmul_precision("highest"):
        return np.asarray(Model(cfg, hooks).apply_block(bp, 0, h))


def _group(cfg, lead):
    return next(g for g in structure.groups(cfg.family) if g.names[0] == lead)


def _orthogonal(d, seed):
    return jnp.asarray(ortho_group.rvs(d, random_state=seed), jnp.float32)


def _per_head(cfg, seed, shared=1):
    """A per-head block-diagonal orthogonal Q of o_proj's input width; ``shared`` consecutive
    heads get the same block (grouped-query attention needs it)."""
    n = cfg.n_heads // shared
    blocks = [ortho_group.rvs(cfg.head_dim, random_state=seed + k) for k in range(n)]
    return jnp.asarray(block_diag(*[b for b in blocks for _ in range(shared)]), jnp.float32)


# ------------------------------------------------------------------------------------- table


@pytest.mark.parametrize("family", list(CONFIGS))
def test_table_order_widths_and_caches(family):
    cfg = CONFIGS[family]
    table = structure.groups(family)
    assert [g.names for g in table] == [
        ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        ("attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ]  # GPTQ's true-sequential order
    bp = _block(cfg)
    for name, d in structure.input_dims(cfg).items():
        assert get_param(bp, name).shape[1] == d
    assert structure.cache_input(family, "attention") == "attn.o_proj"
    assert structure.cache_input(family, "down_input") == "mlp.down_proj"
    assert structure.not_recomputed(family, "attention") == table[0].names
    assert structure.not_recomputed(family, "down_input") == table[0].names + table[2].names
    assert [n for g in table for n in g.names if not g.clips(n)] == ["attn.q_proj", "attn.k_proj"]
    with pytest.raises(ValueError, match="no adapter table"):
        structure.groups("opt")


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="exactly one of norm / prev"):
        structure.LinearGroup(names=("mlp.down_proj",), d_in="d_ff")
    with pytest.raises(ValueError, match="via"):
        structure.LinearGroup(names=("mlp.down_proj",), d_in="d_ff", prev="mlp.up_proj")
    with pytest.raises(ValueError, match="d_in"):
        structure.LinearGroup(names=("attn.o_proj",), d_in="heads2", norm="x")
    with pytest.raises(ValueError, match="no_clip"):
        structure.LinearGroup(names=("a.b",), d_in="d_model", norm="n", no_clip=("a.c",))
    with pytest.raises(ValueError, match="inspect"):
        structure.LinearGroup(names=("mlp.up_proj",), d_in="d_model", norm="n", inspect="attn")


# ------------------------------------------------------------------------------------ scales


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fold_scale_keeps_block_outputs(family):
    cfg, rng = CONFIGS[family], np.random.default_rng(0)
    bp, h = _block(cfg), _h(cfg)
    ref = _run(cfg, bp, h)
    folded = bp
    for g in structure.groups(family):
        assert can_fold(bp, g)
        s = jnp.asarray(np.exp(rng.normal(0.0, 0.5, g.width(cfg))), jnp.float32)
        folded = fold_scale(folded, g, s)
    np.testing.assert_allclose(_run(cfg, folded, h), ref, **TOL)
    for name in ("attn_norm", "attn.v_proj", "mlp.up_proj"):  # every producer changed
        assert not np.allclose(get_param(folded, name), get_param(bp, name))
    if cfg.attn_bias:
        assert not np.allclose(folded["attn"]["v_proj_bias"], bp["attn"]["v_proj_bias"])
    # the columns alone, without the producer: the outputs change by O(1) (a uniform s would
    # not show it under Gemma's post-norm, which is scale invariant)
    g = _group(cfg, "mlp.down_proj")
    s = jnp.asarray(np.exp(rng.normal(0.0, 0.5, g.width(cfg))), jnp.float32)
    W = get_param(bp, "mlp.down_proj")
    wrong = set_param(bp, "mlp.down_proj", W * s[None, :])
    assert np.max(np.abs(_run(cfg, wrong, h) - ref)) > 0.1


def test_fold_scale_refusals():
    bp = _block(LLAMA_GQA)
    o = _group(LLAMA_GQA, "attn.o_proj")
    assert not can_fold(bp, o)  # v_proj: 16 rows, o_proj: 32 inputs
    with pytest.raises(ValueError, match="rows of attn.v_proj.*grouped-query"):
        fold_scale(bp, o, jnp.ones((32,), jnp.float32))
    qkv = _group(LLAMA_GQA, "attn.q_proj")
    with pytest.raises(ValueError, match="need 32 scales"):
        fold_scale(bp, qkv, jnp.ones((31,), jnp.float32))
    quantized = set_param(bp, "attn.k_proj", quantize(get_param(bp, "attn.k_proj"), rtn_config(4)))
    with pytest.raises(TypeError, match="already quantized"):
        fold_scale(quantized, qkv, jnp.ones((32,), jnp.float32))


# ----------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("family", list(CONFIGS))
def test_absorb_norm_keeps_outputs_and_sets_ones(family):
    cfg = CONFIGS[family]
    bp, h = _block(cfg), _h(cfg)
    out = bp
    for lead in ("attn.q_proj", "mlp.gate_proj"):
        out = absorb_norm(out, _group(cfg, lead))
    np.testing.assert_allclose(_run(cfg, out, h), _run(cfg, bp, h), **TOL)
    np.testing.assert_array_equal(out["attn_norm"], np.ones(cfg.d_model, np.float32))
    np.testing.assert_array_equal(out["mlp_norm"], np.ones(cfg.d_model, np.float32))
    with pytest.raises(ValueError, match="not a norm"):
        absorb_norm(bp, _group(cfg, "attn.o_proj"))


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA, LLAMA_GQA], ids=["llama", "gemma3", "llama-gqa"])
def test_fold_rotation_v_to_o_keeps_block_outputs(cfg):
    """A per-head Q folded into v_proj's rows and o_proj's columns; with grouped-query
    attention the two query heads of each key/value head share their block."""
    bp, h = _block(cfg), _h(cfg)
    shared = cfg.n_heads // cfg.n_kv_heads
    Q = _per_head(cfg, 3, shared)
    out = fold_rotation(bp, _group(cfg, "attn.o_proj"), Q, head_dim=cfg.head_dim)
    np.testing.assert_allclose(_run(cfg, out, h), _run(cfg, bp, h), **TOL)
    assert not np.allclose(out["attn"]["v_proj"], bp["attn"]["v_proj"])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fold_rotation_norm_groups_need_the_input_rotated(family):
    """q/k/v and gate/up: only the columns turn, ``W·Q``; with the input rotated online
    (``x ↦ x·Q`` at the seam, an act_quant hook here) the outputs are the float block's."""
    cfg = CONFIGS[family]
    bp, h = _block(cfg), _h(cfg)
    Qa, Qm = _orthogonal(cfg.d_model, 1), _orthogonal(cfg.d_model, 2)
    out = fold_rotation(bp, _group(cfg, "attn.q_proj"), Qa)
    out = fold_rotation(out, _group(cfg, "mlp.gate_proj"), Qm)
    rotate = {"blocks.0.attn.": Qa, "blocks.0.mlp.": Qm}
    skip = ("blocks.0.attn.o_proj", "blocks.0.mlp.down_proj")

    def online(name, x):
        if name in skip:
            return x
        Q = next(q for prefix, q in rotate.items() if name.startswith(prefix))
        return jnp.matmul(x, Q, precision="highest")

    ref = _run(cfg, bp, h)
    np.testing.assert_allclose(_run(cfg, out, h, Hooks(act_quant=online)), ref, **TOL)
    assert np.max(np.abs(_run(cfg, out, h) - ref)) > 0.1  # without it: not the same block


def test_fold_rotation_down_proj_takes_signs_only():
    cfg = LLAMA
    bp, h = _block(cfg), _h(cfg)
    down = _group(cfg, "mlp.down_proj")
    signs = jnp.asarray(np.where(np.arange(cfg.d_ff) % 3 == 0, -1.0, 1.0), jnp.float32)
    out = fold_rotation(bp, down, jnp.diag(signs))
    np.testing.assert_allclose(_run(cfg, out, h), _run(cfg, bp, h), **TOL)
    with pytest.raises(ValueError, match="elementwise product"):
        fold_rotation(bp, down, _orthogonal(cfg.d_ff, 4))


def test_fold_rotation_refusals():
    bp = _block(LLAMA)
    o = _group(LLAMA, "attn.o_proj")
    d = LLAMA.n_heads * LLAMA.head_dim
    with pytest.raises(ValueError, match="not block diagonal per head"):
        fold_rotation(bp, o, _orthogonal(d, 5), head_dim=LLAMA.head_dim)
    with pytest.raises(ValueError, match="pass head_dim"):
        fold_rotation(bp, o, _per_head(LLAMA, 6))
    with pytest.raises(ValueError, match="not orthogonal"):
        fold_rotation(bp, o, 1.01 * _per_head(LLAMA, 6), head_dim=LLAMA.head_dim)
    with pytest.raises(ValueError, match="shape"):
        fold_rotation(bp, o, jnp.eye(d - 1, dtype=jnp.float32), head_dim=LLAMA.head_dim)
    gqa = _block(LLAMA_GQA)
    with pytest.raises(ValueError, match="must be equal"):  # each head its own block
        fold_rotation(gqa, _group(LLAMA_GQA, "attn.o_proj"), _per_head(LLAMA_GQA, 7), head_dim=8)
