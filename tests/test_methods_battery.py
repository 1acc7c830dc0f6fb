"""The shared battery: every method in ``methods.base.REGISTRY`` must pass it.

Tests are parametrized over the registry after ``import methods`` (which registers every
method), so a newly registered method is picked up with no edit here. What a method provides:

* ``Method.config`` — a frozen config class that rejects ``bits=99`` with a ValueError naming
  ``bits``; optionally a classmethod ``for_format(bits, group_size)`` giving its paper defaults
  at "W{bits} g{group_size}" (or the closest format it supports). Without it the battery calls
  ``config(bits=…, group_size=…)`` (``group_size`` only if the config has that field).
* ``Method.quantize_layer(W, stats, cfg, *, key)`` — traceable under ``jax.jit`` (with ``cfg``
  static) and deterministic. A core that cannot be traced (data-dependent shapes, e.g. a
  variable number of outliers) declares so in its module: ``EAGER_ONLY = "why"`` and
  ``jit_inner(W, stats, cfg, *, key)``, the part that is traced (any pytree of arrays out);
  the battery then jit-compiles ``jit_inner`` instead.
* ``Method.quantize_model(params, model_cfg, calib_tokens, cfg)`` → ``QuantizedModel``.

The per-layer check uses a synthetic layer whose inputs are correlated and have a few outlier
channels (like LLM activations), so second-order / activation-aware methods have something to
exploit; wherever ``Method.beats_rtn`` its ‖WX − ŴX‖ must not exceed RTN's at the same bits
and group size.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods
from harness.model import Model, ModelConfig, get_param, init_params, linear_names
from methods.base import REGISTRY, LayerStats, QuantizedModel
from methods.rtn.core import RTNConfig

ALL = sorted(REGISTRY)
BEATS_RTN = sorted(n for n, m in REGISTRY.items() if m.beats_rtn)
BITS, GROUP = 3, 32


def config_for(method, bits=BITS, group_size=GROUP):
    """The method's defaults at W{bits} g{group_size}: its ``for_format`` classmethod, else its
    config with ``bits`` (and ``group_size`` when it has that field)."""
    cls = method.config
    if hasattr(cls, "for_format"):
        return cls.for_format(bits, group_size)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(bits=bits, **({"group_size": group_size} if "group_size" in fields else {}))


def synthetic_layer(seed=0, d_out=64, d_in=128, n=1024, n_outliers=4):
    """``W [d_out, d_in]`` and the statistics of correlated inputs ``X [n, d_in]`` with
    ``n_outliers`` channels 20× larger than the rest."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    X = rng.normal(size=(n, d_in)) @ mix + 0.3 * rng.normal(size=(n, d_in))
    X[:, rng.choice(d_in, n_outliers, replace=False)] *= 20.0
    W = rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)
    G = rng.normal(size=(n, d_out))  # output gradients of a regression loss: ∂L/∂W = g xᵀ
    stats = LayerStats(
        H=jnp.asarray(2.0 / n * X.T @ X, jnp.float32),
        X=jnp.asarray(X, jnp.float32),
        act_absmean=jnp.asarray(np.abs(X).mean(0), jnp.float32),
        act_absmax=jnp.asarray(np.abs(X).max(0), jnp.float32),
        fisher=jnp.asarray((G**2).T @ (X**2) / n, jnp.float32),
    )
    return jnp.asarray(W, jnp.float32), stats, X


@pytest.fixture(scope="module")
def layer():
    return synthetic_layer()


def dense(w):
    return w.dequantize() if hasattr(w, "dequantize") else w


def leaves_equal(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def test_registry_has_the_baselines():
    assert {"rtn", "gptq"} <= set(ALL)
    assert methods.get_method("gptq") is REGISTRY["gptq"]


@pytest.mark.parametrize("name", ALL)
def test_core_jit_compiles(name, layer):
    method = REGISTRY[name]
    W, stats, _ = layer
    cfg = config_for(method)
    key = jax.random.key(0)
    mod = sys.modules[method.quantize_layer.__module__]
    if getattr(mod, "EAGER_ONLY", None):
        assert isinstance(mod.EAGER_ONLY, str) and mod.EAGER_ONLY.strip(), (
            "say why it is eager-only"
        )
        fn = mod.jit_inner
    else:
        fn = lambda W, stats, cfg, *, key: method.quantize_layer(W, stats, cfg, key=key).weight

    def run(W, H, X, absmean, absmax, fisher, key):
        st = LayerStats(H=H, X=X, act_absmean=absmean, act_absmax=absmax, fisher=fisher)
        return fn(W, st, cfg, key=key)

    args = (W, stats.H, stats.X, stats.act_absmean, stats.act_absmax, stats.fisher, key)
    jitted = jax.jit(run)(*args)
    eager = run(*args)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
    a, b = dense(jitted), dense(eager)
    if isinstance(a, jax.Array):
        # jit may fuse float ops differently: a value sitting on a rounding boundary can
        # round the other way, nothing more.
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.mean(np.asarray(a) != np.asarray(b)) <= 1e-3


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_result(name, layer):
    method = REGISTRY[name]
    W, stats, _ = layer
    cfg = config_for(method)
    r1 = method.quantize_layer(W, stats, cfg, key=jax.random.key(7))
    r2 = method.quantize_layer(W, stats, cfg, key=jax.random.key(7))
    assert leaves_equal(r1.weight, r2.weight)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_dtype_kept(name, dtype, layer):
    method = REGISTRY[name]
    W, stats, _ = layer
    w = method.quantize_layer(
        W.astype(dtype), stats, config_for(method), key=jax.random.key(0)
    ).weight
    out = dense(w)
    assert out.dtype == dtype and out.shape == W.shape
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


@pytest.mark.parametrize("name", ALL)
def test_bad_config_rejected(name):
    with pytest.raises(ValueError, match="bits"):
        REGISTRY[name].config(bits=99)


@pytest.mark.parametrize("name", ALL)
def test_bad_input_rejected(name, layer):
    method = REGISTRY[name]
    W, stats, _ = layer
    cfg = config_for(method)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="NaN"):
        method.quantize_layer(W.at[3, 5].set(jnp.nan), stats, cfg, key=key)
    with pytest.raises(TypeError):
        method.quantize_layer(W.astype(jnp.int32), stats, cfg, key=key)
    if method.needs:
        with pytest.raises(ValueError):
            method.quantize_layer(W, LayerStats(), cfg, key=key)


@pytest.mark.parametrize("name", BEATS_RTN)
def test_output_error_no_worse_than_rtn(name, layer):
    method = REGISTRY[name]
    W, stats, X = layer
    cfg = config_for(method)
    bits = getattr(cfg, "bits", BITS)
    group = getattr(cfg, "group_size", GROUP)
    rtn = REGISTRY["rtn"].quantize_layer(
        W, stats, RTNConfig(bits=bits, group_size=group, sym=False)
    )
    ours = method.quantize_layer(W, stats, cfg, key=jax.random.key(0))
    err = lambda w: float(np.linalg.norm((np.asarray(W) - np.asarray(dense(w), np.float64)) @ X.T))
    assert err(ours.weight) <= err(rtn.weight), (err(ours.weight), err(rtn.weight))


# One shape for every linear (no GQA, d_ff = d_model): each core compiles once per method.
TINY = ModelConfig(
    vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=64
)


@pytest.fixture(scope="module")
def tiny():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(4, 16)).astype(np.int32)
    return params, tokens


@pytest.mark.parametrize("name", ALL)
def test_quantize_model_runs(name, tiny):
    method = REGISTRY[name]
    params, tokens = tiny
    qm = method.quantize_model(params, TINY, tokens, config_for(method))
    assert isinstance(qm, QuantizedModel) and qm.seconds > 0
    names = linear_names(TINY)
    assert sorted(r["name"] for r in qm.report) == sorted(names)
    for n in names:
        leaf = get_param(qm.params, n)
        assert hasattr(leaf, "dequantize"), f"{n} was not quantized"
        assert dense(leaf).shape == get_param(params, n).shape
    assert all(r["bits"] > 0 for r in qm.report)
    assert 1.0 < qm.bits_per_weight < 16.0
    logits = jax.jit(Model(TINY).forward)(qm.params, tokens)
    assert logits.shape == (*tokens.shape, TINY.vocab_size)
    assert np.all(np.isfinite(np.asarray(logits)))
