"""The shared battery: every method in ``methods.base.REGISTRY`` must pass it.

Tests are parametrized over the registry after ``import methods`` (which registers every
method), so a newly registered method is picked up with no edit here. The battery has a common
part (config, whole-model result, checkpoint round trip, sharded run, no recompilation) and a
section per method kind (``methods.base.KINDS``; a kind without a section fails
``test_every_kind_has_a_section``, so a new family adds its section with its first method).
What a method provides:

* ``Method.config`` — a frozen config class that rejects ``bits=99`` with a ValueError naming
  ``bits``; optionally a classmethod ``for_format(bits, group_size)`` giving its paper defaults
  at "W{bits} g{group_size}" (or the closest format it supports). Without it the battery calls
  ``config(bits=…, group_size=…)`` (``group_size`` only if the config has that field).
* ``Method.quantize_layer(W, stats, cfg, *, key)`` (weight-only and weight+activation kinds) —
  traceable under ``jax.jit`` (with ``cfg`` static) and deterministic. A core that cannot be
  traced (data-dependent shapes, e.g. a variable number of outliers) declares so in its module:
  ``EAGER_ONLY = "why"`` and ``jit_inner(W, stats, cfg, *, key)``, the part that is traced (any
  pytree of arrays out); the battery then jit-compiles ``jit_inner`` instead.
* ``Method.quantize_model(params, model_cfg, calib_tokens, cfg)`` → ``QuantizedModel`` (the
  method result: params, hooks, report).

The per-layer check uses a synthetic layer whose inputs are correlated and have a few outlier
channels (like LLM activations), so second-order / activation-aware methods have something to
exploit; wherever ``Method.beats_rtn`` its ‖WX − ŴX‖ must not exceed RTN's at the same bits
and group size.
"""

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods
from harness import kvcache
from harness.decode import Decoder
from harness.layers import NO_HOOKS
from harness.model import Model, ModelConfig, get_param, init_params, linear_names
from methods import checkpoint
from methods.base import KINDS, REGISTRY, LayerStats, QuantizedModel
from methods.rtn.core import RTNConfig

ALL = sorted(REGISTRY)
LAYERWISE = sorted(n for n, m in REGISTRY.items() if m.quantize_layer is not None)
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


@pytest.mark.parametrize("name", LAYERWISE)
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


@pytest.mark.parametrize("name", LAYERWISE)
def test_same_seed_same_result(name, layer):
    method = REGISTRY[name]
    W, stats, _ = layer
    cfg = config_for(method)
    r1 = method.quantize_layer(W, stats, cfg, key=jax.random.key(7))
    r2 = method.quantize_layer(W, stats, cfg, key=jax.random.key(7))
    assert leaves_equal(r1.weight, r2.weight)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", LAYERWISE)
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


@pytest.mark.parametrize("name", LAYERWISE)
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


@pytest.fixture(scope="module")
def results(tiny):
    """Each method's result on the tiny model, computed once for the whole-model checks."""
    params, tokens = tiny
    cache = {}

    def get(name):
        if name not in cache:
            method = REGISTRY[name]
            cache[name] = method.quantize_model(params, TINY, tokens, config_for(method))
        return cache[name]

    return get


def test_every_kind_has_a_section():
    assert set(SECTIONS) <= set(KINDS)
    missing = {m.kind for m in REGISTRY.values()} - set(SECTIONS)
    assert not missing, f"no battery section for the kind(s) {sorted(missing)}: add one"


@pytest.mark.parametrize("name", ALL)
def test_result_runs(name, tiny, results):
    """The result runs as it stands (its params under its own hooks) and reports itself."""
    params, tokens = tiny
    qm = results(name)
    assert isinstance(qm, QuantizedModel) and qm.seconds > 0
    assert 0.0 < qm.bits_per_activation <= 16.0 and 0.0 < qm.kv_bits <= 16.0
    logits = jax.jit(Model(TINY, qm.hooks).forward)(qm.params, tokens)
    assert logits.shape == (*tokens.shape, TINY.vocab_size)
    assert np.all(np.isfinite(np.asarray(logits)))
    SECTIONS[REGISTRY[name].kind](qm, params, tokens)


@pytest.mark.parametrize("name", ALL)
def test_result_survives_checkpoint(name, results, tmp_path):
    """The result's params (quantized leaves included) round-trip orbax bit for bit."""
    qm = results(name)
    checkpoint.save_tree(tmp_path / "ckpt", qm.params)
    back, _ = checkpoint.load_tree(tmp_path / "ckpt")
    assert leaves_equal(back, qm.params)
    for n in linear_names(TINY):
        a, b = get_param(back, n), get_param(qm.params, n)
        assert type(a) is type(b), n


@pytest.mark.parametrize("name", ALL)
def test_result_sharded(name, results):
    """Data-parallel over the 8 virtual devices: the same logits as on one device."""
    qm = results(name)
    n_dev = jax.device_count()
    assert n_dev == 8, "tests/conftest.py asks for 8 virtual CPU devices"
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (n_dev, 16)).astype(np.int32)
    fwd = jax.jit(Model(TINY, qm.hooks).forward)
    one = fwd(qm.params, tokens)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(
        tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    many = fwd(qm.params, sharded)
    assert len(many.sharding.device_set) == n_dev
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), rtol=1e-5, atol=1e-5)


@pytest.fixture
def compiles():
    """Count XLA backend compilations while the test runs."""
    events = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("name", LAYERWISE)
def test_second_call_does_not_recompile(name, layer, compiles):
    """A second linear of the same shape, with an equal (freshly built) config, compiles
    nothing: a model's 210 linears must not pay one compilation each."""
    method = REGISTRY[name]
    W, stats, _ = layer
    method.quantize_layer(W, stats, config_for(method), key=jax.random.key(0))
    W2 = W[::-1] * 0.5
    jax.block_until_ready(W2)
    compiles.clear()
    r = method.quantize_layer(W2, stats, config_for(method), key=jax.random.key(1))
    jax.block_until_ready(jax.tree_util.tree_leaves(r.weight))
    assert compiles == [], f"{name}: {len(compiles)} compilation(s) on the second call"


# --------------------------------------------------------------------------- kind sections


def _all_linears_quantized(qm, params):
    names = linear_names(TINY)
    assert sorted(r["name"] for r in qm.report) == sorted(names)
    for n in names:
        leaf = get_param(qm.params, n)
        assert hasattr(leaf, "dequantize"), f"{n} was not quantized"
        assert dense(leaf).shape == get_param(params, n).shape
    assert all(r["bits"] > 0 for r in qm.report)
    assert 1.0 < qm.bits_per_weight < 16.0


def check_weight_only(qm, params, tokens):
    """Every block linear a quantized leaf; nothing else changes numerics."""
    _all_linears_quantized(qm, params)
    assert qm.hooks == NO_HOOKS and qm.bits_per_activation == 16.0 and qm.kv_bits == 16.0


def check_weight_act(qm, params, tokens):
    """Quantized leaves plus activation quantization that changes the output."""
    _all_linears_quantized(qm, params)
    assert qm.hooks.act_quant is not None and qm.bits_per_activation < 16.0
    with_act = Model(TINY, qm.hooks).forward(qm.params, tokens)
    weights_only = Model(TINY, dataclasses.replace(qm.hooks, act_quant=None)).forward(
        qm.params, tokens
    )
    assert not np.allclose(np.asarray(with_act), np.asarray(weights_only)), (
        "the activation quantizers change nothing"
    )


def check_kv_cache(qm, params, tokens):
    """Weights as they were, keys / values quantized through the hooks; decoding token by token
    from the stored cache gives the logits of scoring the whole sequence. The tokens are longer
    than the battery's 16 so that a full-precision window of the paper's size (KIVI: 128) is
    left behind and the cache is read quantized."""
    kvq = qm.hooks.kv_quant
    assert isinstance(kvq, kvcache.KVQuant) and qm.kv_bits < 16.0
    assert leaves_equal(qm.params, params)
    long = np.random.default_rng(2).integers(0, TINY.vocab_size, (1, KV_TOKENS)).astype(np.int32)
    model = Model(TINY, qm.hooks)
    scored = model.forward(qm.params, long)
    plain = Model(TINY).forward(params, long)
    assert not np.allclose(np.asarray(scored), np.asarray(plain)), "the cache is not quantized"
    cap = math.lcm(kvq.key.chunk, kvq.value.chunk)
    dec = Decoder(model, capacity=-(-KV_TOKENS // cap) * cap)
    logits, state = dec.prefill(qm.params, long[:, :KV_PROMPT])
    for t in range(KV_PROMPT, KV_TOKENS):
        step, state = dec.step(qm.params, state, long[:, t])
        np.testing.assert_allclose(np.asarray(step), np.asarray(scored[:, t]), atol=KV_ATOL)


KV_TOKENS, KV_PROMPT = 200, 120  # the steps cross a flush of 128 keys (KIVI: at 129)
# A step projects one token where scoring projects 200: the keys differ in their last float32
# bits, and a per-token 4-bit code sitting on a rounding tie can flip (QServe's KV4 moves a
# logit by 2.5e-4 that way on this model). A token read from the wrong place, or the wrong
# window, moves the logits by ~1e-2 (tests/test_decode.py checks 1e-4 on its own codecs).
KV_ATOL = 1e-3


def check_codebook(qm, params, tokens):
    """Codebook leaves are weight leaves like any other (issue 17 adds its own checks)."""
    _all_linears_quantized(qm, params)


SECTIONS = {
    "weight_only": check_weight_only,
    "weight_act": check_weight_act,
    "kv_cache": check_kv_cache,
    "codebook": check_codebook,
}
