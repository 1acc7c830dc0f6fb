"""Property tests of ``quantize`` over every format and granularity (hypothesis)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics_strategies import SYMMETRIC_FORMATS, arrays, shapes_and_configs

from numerics import granularity as G
from numerics.config import QuantConfig, block_fp, block_minifloat, mx, rtn
from numerics.quantize import fake_quant, quantize


def _grid(qa):
    """Per-element scale and (zero) of a QArray, broadcast to its shape."""
    s = G.from_blocks(
        jnp.broadcast_to(
            G.expand_stat(qa.scale_array()), G.to_blocks(jnp.zeros(qa.shape), qa.block_shape).shape
        ),
        qa.shape,
    )
    return np.asarray(s)


@given(data=st.data())
def test_reencode_with_own_params_is_identity(data):
    """Idempotence: encoding the dequantized array with the same scales gives the same codes."""
    shape, cfg = data.draw(shapes_and_configs())
    x = jnp.asarray(data.draw(arrays(shape)))
    qa = quantize(x, cfg)
    xq = qa.dequantize()
    y = G.to_blocks(xq, qa.block_shape) / G.expand_stat(qa.scale_array())
    if qa.zero is not None:
        y = jnp.round(y) + G.expand_stat(qa.zero)
    codes2 = G.from_blocks(cfg.fmt.encode(y), qa.shape)
    np.testing.assert_array_equal(cfg.fmt.decode(codes2), cfg.fmt.decode(qa.codes))


@given(data=st.data())
def test_fake_quant_idempotent_symmetric(data):
    """Symmetric absmax scaling: quantizing a dequantized array changes nothing."""
    fmts = [f for f in SYMMETRIC_FORMATS if f not in ("binary", "ternary")]
    shape, cfg = data.draw(shapes_and_configs(formats=fmts))
    x = jnp.asarray(data.draw(arrays(shape)))
    q1 = fake_quant(x, cfg)
    q2 = fake_quant(q1, cfg)
    np.testing.assert_allclose(q2, q1, rtol=2e-6, atol=0)


@given(data=st.data())
def test_error_at_most_half_a_step_inside_range(data):
    shape, cfg = data.draw(shapes_and_configs())
    x = jnp.asarray(data.draw(arrays(shape)))
    qa = quantize(x, cfg)
    s = _grid(qa)
    y = np.divide(np.asarray(x), s, out=np.zeros_like(s), where=s != 0)  # s = 0: zero block
    if qa.zero is not None:
        y = y + _grid(dataclasses.replace(qa, scale=qa.zero))
    lo, hi = cfg.fmt.bracket(jnp.asarray(y, jnp.float32))
    vals = cfg.fmt.finite_values()
    if qa.zero is not None:
        vals = np.arange(cfg.fmt.qmin, cfg.fmt.qmax + 1)
    inside = (y >= vals[0]) & (y <= vals[-1])
    err = np.abs(np.asarray(qa.dequantize()) - np.asarray(x))
    bound = (np.asarray(hi) - np.asarray(lo)) / 2 * s
    # half the local step, plus float32 rounding of x/s and of code·s (a few ulps of |x|)
    tol = bound * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(np.asarray(x))
    assert np.all(err[inside] <= tol[inside] + 1e-30)


@given(data=st.data())
def test_monotone_within_a_block(data):
    shape, cfg = data.draw(shapes_and_configs())
    cfg = cfg.replace(granularity="tensor")
    x = np.sort(data.draw(arrays(shape)).reshape(-1)).reshape(shape)
    q = np.asarray(fake_quant(jnp.asarray(x), cfg)).reshape(-1)
    assert np.all(np.diff(q) >= 0)


@given(data=st.data())
def test_sign_symmetry(data):
    shape, cfg = data.draw(shapes_and_configs(formats=SYMMETRIC_FORMATS))
    x = data.draw(arrays(shape))
    if cfg.fmt.name in ("binary",) or cfg.fmt.name.startswith("bipolar"):
        x = np.where(x == 0, np.float32(1.0), x)  # no zero level: sign(0) is a convention
    if cfg.fmt.name.startswith("nf"):
        return  # NF-k is deliberately asymmetric (one more positive level)
    x = jnp.asarray(x)
    np.testing.assert_array_equal(fake_quant(-x, cfg), -fake_quant(x, cfg))


@given(data=st.data(), k=st.integers(-6, 6))
def test_scale_equivariance_powers_of_two(data, k):
    shape, cfg = data.draw(shapes_and_configs())
    x = jnp.asarray(data.draw(arrays(shape, scale_range=(-2, 2))))
    c = jnp.float32(2.0**k)
    np.testing.assert_allclose(fake_quant(c * x, cfg), c * fake_quant(x, cfg), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        rtn(4, group_size=8),
        rtn(3, group_size=8, sym=False),
        mx("mxfp4"),
        QuantConfig(format="nf4", granularity="group", group_size=8),
    ],
)
def test_zero_and_constant_groups(cfg):
    x = jnp.zeros((4, 32), jnp.float32).at[1].set(0.37).at[2, :8].set(-5.0)
    qa = quantize(x, cfg)
    out = np.asarray(qa.dequantize())
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(np.asarray(qa.scale_array())))
    np.testing.assert_array_equal(out[0], 0.0)  # all-zero rows: exact zeros, no 0/0
    if not cfg.zero_point and cfg.scale_kind == "float":  # pow2 scales cannot hit 0.37
        np.testing.assert_allclose(out[1], 0.37, rtol=1e-6)  # constant group maps onto max
        np.testing.assert_allclose(out[2, :8], -5.0, rtol=1e-6)


@pytest.mark.parametrize(
    "fmt", ["binary", "bipolar2", "bipolar3", "ternary", "nf4", "int4", "fp4_e2m1"]
)
def test_zero_blocks_dequantize_to_exact_zeros_in_every_format(fmt):
    """Formats without a zero level (binary, bipolar) included: s = 0 for a zero block."""
    rng = "absmean" if fmt in ("binary", "ternary") else "minmax"
    cfg = QuantConfig(format=fmt, granularity="group", group_size=8, range=rng)
    x = jnp.zeros((2, 16), jnp.float32).at[1, 8:].set(0.7)
    out = np.asarray(fake_quant(x, cfg))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, :8], 0.0)
    np.testing.assert_array_equal(fake_quant(2 * x, cfg), 2 * fake_quant(x, cfg))


def test_granularities_give_expected_scale_shapes():
    x = jax.random.normal(jax.random.key(0), (8, 64))
    shapes = {
        QuantConfig(granularity="tensor"): (1, 1),
        QuantConfig(granularity="channel"): (8, 1),  # per output channel (rows of W[out, in])
        QuantConfig(granularity="channel", axis=0): (1, 64),  # per input channel
        QuantConfig(granularity="group", group_size=16): (8, 4),
        QuantConfig(granularity="group", group_size=4, axis=0): (2, 64),
        QuantConfig(granularity="block", block_shape=(4, 16)): (2, 4),
    }
    for cfg, nb in shapes.items():
        assert quantize(x, cfg).scale.shape == nb, cfg


def test_per_token_dynamic_activations():
    x = (
        jax.random.normal(jax.random.key(1), (2, 5, 16))
        * jnp.arange(1, 6, dtype=jnp.float32)[None, :, None]
    )
    qa = quantize(x, QuantConfig(format="int8", granularity="channel", axis=-1))
    assert qa.scale.shape == (2, 5, 1)
    np.testing.assert_allclose(qa.scale[..., 0], jnp.max(jnp.abs(x), -1) / 127, rtol=1e-6)


def test_stochastic_rounding_is_unbiased_and_on_grid():
    cfg = QuantConfig(format="int4", granularity="tensor", rounding="stochastic")
    x = jnp.asarray([[7.0, 0.3, -2.6, 1.5, -0.05]], jnp.float32)  # amax 7 → scale 1
    keys = jax.random.split(jax.random.key(0), 4000)
    qs = jax.vmap(lambda k: fake_quant(x, cfg, key=k))(keys)
    assert np.all(np.asarray(qs) == np.round(np.asarray(qs)))  # on the integer grid
    assert set(np.unique(qs[:, 0, 1]).tolist()) <= {0.0, 1.0}
    mean, p = np.asarray(jnp.mean(qs, 0))[0], np.abs(np.asarray(x)[0] % 1.0)
    sigma = np.sqrt(p * (1 - p) / 4000)
    assert np.all(np.abs(mean - np.asarray(x)[0]) <= 5 * sigma + 1e-5)  # 1e-5: float32 mean
    with pytest.raises(ValueError, match="PRNG key"):
        quantize(x, cfg)


def test_mse_clip_search_never_worse_than_minmax():
    x = jax.random.t(jax.random.key(3), 3.0, (16, 256))  # heavy tails: clipping pays off
    for base in (rtn(3, group_size=128), rtn(3, group_size=128, sym=False), rtn(2, group_size=64)):
        e_mm = jnp.sum(jnp.abs(fake_quant(x, base) - x) ** 2.4, axis=-1)
        e_mse = jnp.sum(jnp.abs(fake_quant(x, base.replace(range="mse")) - x) ** 2.4, axis=-1)
        assert np.all(np.asarray(e_mse) <= np.asarray(e_mm) * (1 + 1e-6))
        assert float(jnp.sum(e_mse)) < float(jnp.sum(e_mm))


def test_percentile_clips_outliers():
    x = jax.random.normal(jax.random.key(4), (1, 4096)).at[0, 0].set(100.0)
    s_mm = quantize(x, rtn(8, group_size=None)).scale
    s_pc = quantize(x, rtn(8, group_size=None, range="percentile", percentile=99.0)).scale
    assert float(s_pc[0, 0]) < float(s_mm[0, 0]) / 10


def test_mx_block_formats_use_power_of_two_e8m0_scales():
    x = jax.random.normal(jax.random.key(5), (4, 128)) * 3
    for cfg in (
        mx("mxfp4"),
        mx("mxint8"),
        mx("mxfp8_e4m3"),
        block_fp(4, 16),
        block_minifloat("fp6_e3m2", 64),
    ):
        qa = quantize(x, cfg)
        assert qa.scale.dtype == jnp.float8_e8m0fnu
        s = np.asarray(qa.scale_array())
        np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
    # OCP MX §6.3: X = 2^(floor(log2 amax) − emax_elem); FP4 E2M1 has emax 2
    qa = quantize(jnp.asarray([[5.0] + [0.1] * 31], jnp.float32), mx("mxfp4"))
    assert float(qa.scale_array()[0, 0]) == 2.0 ** (2 - 2)


def test_jit_matches_eager():
    x = jax.random.normal(jax.random.key(6), (16, 128))
    cfg = rtn(4, group_size=32, sym=False)
    a = quantize(x, cfg)
    b = jax.jit(quantize, static_argnums=1)(x, cfg)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def test_dtype_kept():
    x = jax.random.normal(jax.random.key(7), (4, 64)).astype(jnp.bfloat16)
    assert fake_quant(x, rtn(4, group_size=32)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "x, cfg, exc, match",
    [
        (jnp.ones((4, 8), jnp.int32), rtn(4), TypeError, "floating-point"),
        (jnp.ones((0, 8), jnp.float32), rtn(4), ValueError, "empty"),
        (
            jnp.ones((4, 8), jnp.float32).at[1, 2].set(jnp.nan),
            rtn(4),
            ValueError,
            r"NaN/Inf.*\(1, 2\)",
        ),
        (jnp.ones((4, 8), jnp.float32).at[0, 0].set(jnp.inf), rtn(4), ValueError, "NaN/Inf"),
        (jnp.ones((4, 10), jnp.float32), rtn(4, group_size=4), ValueError, "does not divide"),
        (
            jnp.ones((4, 10), jnp.float32),
            QuantConfig(granularity="block", block_shape=(3, 5)),
            ValueError,
            "does not divide",
        ),
        (jnp.float32(1.0), rtn(4), ValueError, "0-d"),
    ],
)
def test_bad_input_rejected(x, cfg, exc, match):
    with pytest.raises(exc, match=match):
        quantize(x, cfg)


def test_nan_under_jit_poisons_only_its_block():
    x = jnp.ones((2, 16), jnp.float32).at[0, 3].set(jnp.nan)
    out = jax.jit(lambda a: fake_quant(a, rtn(4, group_size=8)))(x)
    assert (
        np.all(np.isnan(out[0, :8]))
        and np.all(np.isfinite(out[0, 8:]))
        and np.all(np.isfinite(out[1]))
    )


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(9, 64), (64, 256), (128, 256), (16, 576)]),
    group=st.sampled_from([32, 128, "channel", "tensor"]),
    fmt=st.sampled_from(["int4", "uint3", "nf4", "fp4_e2m1", "ternary"]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(0, 1 << 30),
    ragged=st.booleans(),
)
def test_non_finite_under_jit_poisons_exactly_its_block(shape, group, fmt, bad, where, ragged):
    """The documented contract on real shapes: under jit a block holding NaN/Inf decodes to NaN
    (all of it), every other block stays finite. XLA's CPU max-reduction drops NaN once a
    reduction is vectorized (> 8 rows), so the scale alone does not carry it."""
    rows, cols = shape
    if isinstance(group, int) and cols % group and not ragged:
        group = 32
    gran = group if isinstance(group, str) else "group"
    cfg = QuantConfig(
        format=fmt,
        granularity=gran,
        group_size=group if isinstance(group, int) else 128,
        zero_point=fmt.startswith("uint"),
        range="absmean" if fmt == "ternary" else "minmax",
        ragged=ragged and gran == "group",
    )
    r, c = (where % rows), (where // rows) % cols
    x = np.random.default_rng(where).normal(size=shape).astype(np.float32)
    x[r, c] = bad
    out = np.asarray(jax.jit(lambda a: fake_quant(a, cfg))(jnp.asarray(x)))
    block = np.zeros(shape, bool)
    if gran == "tensor":
        block[:] = True
    elif gran == "channel":
        block[r] = True
    else:
        g0 = c // group * group
        block[r, g0 : g0 + group] = True
    assert np.all(np.isnan(out[block])), f"{np.isnan(out[block]).sum()} of {block.sum()} NaN"
    assert np.all(np.isfinite(out[~block]))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(format="nf4", zero_point=True), "integer format"),
        (dict(granularity="rows"), "granularity"),
        (dict(range="kl"), "range"),
        (dict(scale_dtype="float64"), "scale_dtype"),
        (dict(granularity="group", group_size=0), "group_size"),
        (dict(format="int4", zero_point=True, scale_kind="pow2"), "power-of-two"),
        (dict(percentile=0.0), "percentile"),
        (dict(granularity="channel", ragged=True), "ragged"),
        (dict(format="bipolar2", scale_kind="pow2"), "2\\^emax"),
    ],
)
def test_bad_config_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


@settings(max_examples=10)
@given(data=st.data())
def test_qarray_invariants_hold(data):
    shape, cfg = data.draw(shapes_and_configs())
    qa = quantize(jnp.asarray(data.draw(arrays(shape))), cfg)
    qa.check()
    leaves = jax.tree_util.tree_leaves(qa)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)


@given(
    data=st.data(),
    g=st.sampled_from([3, 4, 8]),
    n_whole=st.integers(0, 3),
    rng=st.sampled_from(["minmax", "mse", "percentile"]),
    fmt=st.sampled_from(["int3", "int4", "nf4", "fp4_e2m1"]),
    axis=st.sampled_from([-1, 0]),
)
def test_ragged_groups_equal_whole_groups_and_tail_quantized_apart(
    data, g, n_whole, rng, fmt, axis
):
    """A ragged last group has statistics of its own elements only: the result equals the whole
    groups and the tail quantized as two separate arrays (exactly, for every range method —
    "mse" and "percentile" would change if the zero padding reached the statistics)."""
    tail = data.draw(st.integers(1, g - 1))
    n = n_whole * g + tail
    shape = (3, n) if axis == -1 else (n, 3)
    x = jnp.asarray(data.draw(arrays(shape)))
    zp = fmt.startswith("int") and data.draw(st.booleans())
    cfg = QuantConfig(
        format=fmt,
        granularity="group",
        group_size=g,
        axis=axis,
        ragged=True,
        zero_point=zp,
        range=rng,
    )
    qa = quantize(x, cfg)
    qa.check()
    ax = axis % 2
    assert qa.nb[ax] == n_whole + 1 and qa.scale_array().shape == qa.nb
    split = lambda a, lo, hi: jax.lax.slice_in_dim(a, lo, hi, axis=ax)
    parts = [quantize(split(x, n - tail, n), dataclasses.replace(cfg, group_size=tail))]
    if n_whole:
        parts.insert(0, quantize(split(x, 0, n - tail), dataclasses.replace(cfg, ragged=False)))
    want = jnp.concatenate([p.dequantize() for p in parts], axis=ax)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(want))
    jitted = jax.jit(lambda a: quantize(a, cfg).dequantize())(x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(want))


def test_ragged_g128_on_576_features_counts_five_scales_per_row():
    from numerics import bits_per_weight

    x = jax.random.normal(jax.random.key(0), (4, 576), jnp.float32)
    with pytest.raises(ValueError, match="ragged=True"):
        quantize(x, rtn(3, group_size=128, sym=False))
    qa = quantize(x, rtn(3, group_size=128, sym=False, ragged=True, scale_dtype="float16"))
    assert qa.nb == (4, 5) and qa.block_shape == (1, 128)
    # 3-bit codes + a float16 scale and a 3-bit zero point per group: 5 groups per 576 columns
    assert bits_per_weight(qa) == pytest.approx(3 + 5 * (16 + 3) / 576)
    packed = qa.pack()
    np.testing.assert_array_equal(np.asarray(packed.dequantize()), np.asarray(qa.dequantize()))
