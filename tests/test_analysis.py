"""Tests for numerics.analysis: error statistics, BitMoD per-group selection, bit-plane dot
products (bipolar-INT and two's complement), and the closed forms of the scaling laws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numerics import analysis as A
from numerics import scaling_laws as S
from numerics.config import QuantConfig, rtn
from numerics.quantize import fake_quant

# --------------------------------------------------------------------------- error statistics


def test_error_stats_values_and_scale_invariance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    e = rng.standard_normal((8, 32)).astype(np.float32) * 0.1
    s = A.error_stats(x, x + e)
    assert s["mse"] == pytest.approx(float(np.mean(e.astype(np.float64) ** 2)), rel=1e-6)
    assert s["max_err"] == pytest.approx(float(np.max(np.abs(e))), rel=1e-6)
    s10 = A.error_stats(10 * x, 10 * (x + e))
    assert s10["sqnr_db"] == pytest.approx(s["sqnr_db"], abs=1e-6)
    assert s10["rel_err"] == pytest.approx(s["rel_err"], rel=1e-6)
    exact = A.error_stats(x, x)
    assert exact["mse"] == 0 and exact["sqnr_db"] == math.inf


def test_error_stats_rejects_bad_input():
    x = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        A.error_stats(x, x[:2])
    with pytest.raises(TypeError, match="floating"):
        A.error_stats(np.ones((4, 4), np.int32), x)
    with pytest.raises(ValueError, match="NaN"):
        A.error_stats(x, np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="empty"):
        A.error_stats(np.zeros((0,), np.float32), np.zeros((0,), np.float32))


def test_group_mse_matches_numpy_and_averages_to_mse():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    y = x + rng.standard_normal(x.shape).astype(np.float32)
    g = np.asarray(A.group_mse(jnp.asarray(x), jnp.asarray(y), 16))
    ref = ((y - x) ** 2).reshape(3, 4, 4, 16).mean(-1)
    np.testing.assert_allclose(g, ref, rtol=1e-5)
    assert g.mean() == pytest.approx(A.error_stats(x, y)["mse"], rel=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        A.group_mse(jnp.asarray(x), jnp.asarray(y), 24)


# --------------------------------------------------------------------------- BitMoD


def test_bitmod_value_sets():
    for bits in (3, 4):
        fam = "fp3" if bits == 3 else "fp4"
        special = {3: (3.0, 6.0), 4: (10.0, 16.0)}[bits]
        base = set(A.BITMOD_VALUES[fam])
        for kind, sv in zip(("er", "ea"), special, strict=True):
            pos = A.bitmod_format(f"{fam}_{kind}_pos")
            neg = A.bitmod_format(f"{fam}_{kind}_neg")
            assert pos.bits == neg.bits == bits  # the special value fills the spare -0 code
            assert set(pos.finite_values()) == base | {sv}
            np.testing.assert_array_equal(neg.finite_values(), -pos.finite_values()[::-1])
        assert A.bitmod_format(fam).symmetric
    eight = A.bitmod_format("fp3_ea_pos", special=8)
    assert set(eight.finite_values()) == set(A.BITMOD_VALUES["fp3"]) | {8.0}
    assert A.selector_bits_per_weight(4, 128) == 2 / 128
    with pytest.raises(ValueError, match="unknown BitMoD"):
        A.bitmod_format("fp5")
    with pytest.raises(ValueError, match="special"):
        A.bitmod_format("fp4_er_pos", special=8)


def _gcfg(fmt, g=16, **kw):
    return QuantConfig(format=fmt, granularity="group", group_size=g, **kw)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), heavy=st.booleans())
def test_select_per_group_is_groupwise_minimum(seed, heavy):
    key = jax.random.key(seed)
    shape = (4, 64)
    x = jax.random.t(key, 3.0, shape, jnp.float32) if heavy else jax.random.normal(key, shape)
    cands = [_gcfg(A.bitmod_format(n)) for n in A.BITMOD_CANDIDATES["bitmod3"]]
    x_hat, choice = A.select_per_group(x, cands)
    best = np.asarray(A.group_mse(x, x_hat, 16))
    each = np.stack([np.asarray(A.group_mse(x, fake_quant(x, c), 16)) for c in cands])
    assert choice.shape == (4, 4) and choice.dtype == jnp.int32
    np.testing.assert_allclose(best, each.min(axis=0), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(choice), each.argmin(axis=0))


def test_select_per_group_single_candidate_is_fake_quant():
    x = jax.random.normal(jax.random.key(3), (2, 32), jnp.float32)
    cfg = _gcfg("nf4")
    x_hat, choice = A.select_per_group(x, [cfg])
    np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(fake_quant(x, cfg)))
    assert not np.any(np.asarray(choice))


def test_select_per_group_rejects_bad_candidates():
    x = jnp.ones((2, 32), jnp.float32)
    with pytest.raises(ValueError, match="at least one"):
        A.select_per_group(x, [])
    with pytest.raises(ValueError, match="different group sizes"):
        A.select_per_group(x, [_gcfg("int4", 16), _gcfg("int4", 32)])
    with pytest.raises(ValueError, match="last axis"):
        A.select_per_group(x, [QuantConfig(format="int4", granularity="channel")])
    with pytest.raises(TypeError, match="floating"):
        A.select_per_group(jnp.ones((2, 32), jnp.int32), [_gcfg("int4")])
    with pytest.raises(ValueError, match="NaN"):
        A.select_per_group(jnp.full((2, 32), jnp.nan, jnp.float32), [_gcfg("int4")])


# --------------------------------------------------------------------------- bit planes


@given(bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_bit_planes_reconstruct_codes(bits, seed):
    c = np.random.default_rng(seed).integers(0, 2**bits, size=(3, 5)).astype(np.uint8)
    planes = np.asarray(A.bit_planes(c, bits)).astype(np.int64)
    weights = (2 ** np.arange(bits)).reshape(bits, 1, 1)
    np.testing.assert_array_equal((weights * planes).sum(0), c)


def _check_dots(bits_a, bits_w, n, rng, signed_a, signed_w):
    a = rng.integers(0, 2**bits_a, size=(3, n)).astype(np.uint8)
    w = rng.integers(0, 2**bits_w, size=(n, 2)).astype(np.uint8)
    va = np.asarray(A.bipolar_values(a, bits_a)).astype(np.int64)
    vw = np.asarray(A.bipolar_values(w, bits_w)).astype(np.int64)
    np.testing.assert_array_equal(
        np.asarray(A.bipolar_dot_bitplanes(a, w, bits_a, bits_w)), va @ vw
    )
    sa, sw = signed_a and bits_a > 1, signed_w and bits_w > 1
    ia = np.asarray(A.int_values(a, bits_a, signed=sa)).astype(np.int64)
    iw = np.asarray(A.int_values(w, bits_w, signed=sw)).astype(np.int64)
    got = A.int_dot_bitplanes(a, w, bits_a, bits_w, signed_a=sa, signed_w=sw)
    np.testing.assert_array_equal(np.asarray(got), ia @ iw)


@pytest.mark.parametrize("bits_a", [1, 2, 3, 4])
@pytest.mark.parametrize("bits_w", [1, 2, 3, 4])
def test_bitplane_dots_equal_direct_products(bits_a, bits_w):
    """Exact equality on random codes, every pair of widths 1..4 (n = 100: four uint32 words,
    the last one padded)."""
    rng = np.random.default_rng(10 * bits_a + bits_w)
    _check_dots(bits_a, bits_w, 100, rng, signed_a=bits_a % 2 == 0, signed_w=bits_w < 3)


@given(n=st.sampled_from([1, 31, 32, 33]), seed=st.integers(0, 2**31 - 1), sa=st.booleans())
def test_bitplane_dots_exact_at_word_boundaries(n, seed, sa):
    _check_dots(3, 2, n, np.random.default_rng(seed), signed_a=sa, signed_w=True)


def test_bipolar_values_match_the_format_table():
    from numerics.formats import bipolar_int

    for bits in range(1, 9):
        codes = np.arange(2**bits, dtype=np.uint8)
        np.testing.assert_array_equal(
            np.asarray(A.bipolar_values(codes, bits)), bipolar_int(bits).values()
        )


def test_int_is_an_affine_image_of_bipolar():
    for bits in range(2, 9):
        c = np.arange(2**bits, dtype=np.uint8)
        x = np.asarray(A.int_values(c, bits)).astype(np.int64)
        v = np.asarray(A.bipolar_values(A.int_to_bipolar_codes(c, bits), bits)).astype(np.int64)
        np.testing.assert_array_equal(2 * x, v - 1)


def test_bitplane_dot_input_checks():
    a = np.zeros((2, 8), np.uint8)
    with pytest.raises(ValueError, match="codes must lie"):
        A.bipolar_dot_bitplanes(a + 4, np.zeros((8, 2), np.uint8), 2, 2)
    with pytest.raises(ValueError, match="inner dimensions"):
        A.bipolar_dot_bitplanes(a, np.zeros((7, 2), np.uint8), 2, 2)
    with pytest.raises(TypeError, match="integers"):
        A.int_dot_bitplanes(a.astype(np.float32), np.zeros((8, 2), np.uint8), 2, 2)
    with pytest.raises(ValueError, match="bits"):
        A.bit_planes(a, 9)
    with pytest.raises(ValueError, match="overflow"):
        A.bipolar_dot_bitplanes(
            np.zeros((1, 40000), np.uint8), np.zeros((40000, 1), np.uint8), 8, 8
        )


# --------------------------------------------------------------------------- scaling-law forms


@given(
    dl=st.floats(1e-3, 5.0),
    N=st.floats(1e7, 1e12),
    P=st.sampled_from([2.0, 3.0, 4.0, 8.0]),
)
def test_qid_tokens_for_loss_inverts_the_law(dl, N, P):
    p = dict(S.PAPER_QID_PARAMS)
    D = A.qid_tokens_for_loss(dl, N, P, **p)
    assert S.qid_loss(N, D, P, **p) == pytest.approx(dl, rel=1e-9)


def test_fixed_p_law_fit_recovers_parameters():
    true = {"k": 4e-4, "alpha": 0.22, "beta": 0.52}
    N, D = (a.ravel() for a in np.meshgrid([1e8, 1e9, 1e10, 1e11], [1e9, 1e10, 1e11, 1e12]))
    y = A.QID_FIXED_P_LAW.f(true, {"N": N, "D": D})
    fit = S.fit_law(A.QID_FIXED_P_LAW, {"N": N, "D": D}, y)
    for name, v in true.items():
        assert fit.params[name] == pytest.approx(v, rel=1e-6)
    assert fit.rms_log < 1e-9


def test_fp_critical_data_size_minimises_the_loss():
    p = dict(S.PAPER_FP_PARAMS)
    for N, E, M, B in [(4.1e7, 1, 1, 128), (1.5e8, 4, 3, 128), (6.8e8, 2, 1, 32)]:
        Dc = float(A.fp_critical_data_size(N, E, M, B, **{k: p[k] for k in _FP_KEYS}))
        L = [float(S.fp_quant_loss(N, Dc * f, E, M, B, **p)) for f in (0.9, 1.0, 1.1)]
        assert L[1] < L[0] and L[1] < L[2]
    with pytest.raises(ValueError, match="B must"):
        A.fp_critical_data_size(1e8, 1, 1, 1, **{k: p[k] for k in _FP_KEYS})


_FP_KEYS = ("d", "alpha", "beta", "gamma", "delta", "nu")


def test_fp_best_exponent_split_is_the_brute_force_optimum():
    p = S.PAPER_FP_PARAMS
    for bits in range(3, 17):
        E, M = A.fp_best_exponent_split(bits, delta=p["delta"], nu=p["nu"])
        assert E + M == bits - 1 and E >= 1
        term = [
            float(S.fp_quant_loss(1e8, 1e10, e, bits - 1 - e, 128, **p)) for e in range(1, bits)
        ]
        assert E == 1 + int(np.argmin(term))
    assert A.fp_best_exponent_split(4, delta=p["delta"], nu=p["nu"]) == (2, 1)
    with pytest.raises(ValueError):
        A.fp_best_exponent_split(2, delta=1.0, nu=1.0)


def test_rtn_helpers_are_compatible_with_selection():
    """INT baselines built with ``rtn`` can be candidates too (asymmetric zero points)."""
    x = jax.random.normal(jax.random.key(5), (2, 64), jnp.float32)
    cands = [rtn(4, group_size=32), rtn(4, group_size=32, sym=False)]
    x_hat, choice = A.select_per_group(x, cands)
    errs = [A.error_stats(x, fake_quant(x, c))["mse"] for c in cands]
    assert A.error_stats(x, x_hat)["mse"] <= min(errs) * (1 + 1e-6)
    assert set(np.unique(np.asarray(choice))) <= {0, 1}
