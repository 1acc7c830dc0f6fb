"""Element formats: value tables, published constants, names and bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numerics import formats as F

# QLoRA / bitsandbytes NF4 constants (QLoRA arXiv 2305.14314, Appendix E), float32.
NF4_PUBLISHED = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


def test_nf4_equals_published_values_exactly():
    np.testing.assert_array_equal(F.normal_float(4).values().astype(np.float32), NF4_PUBLISHED)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_nf_structure(k):
    v = F.normal_float(k).values()
    assert v.size == 2**k and np.all(np.diff(v) > 0)
    assert v[0] == -1.0 and v[-1] == 1.0 and 0.0 in v
    assert np.sum(v > 0) == 2 ** (k - 1) and np.sum(v < 0) == 2 ** (k - 1) - 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_value_tables(bits):
    u = F.IntFormat(bits=bits, signed=False)
    np.testing.assert_array_equal(u.values(), np.arange(2**bits))
    if bits > 1:
        s = F.IntFormat(bits=bits, signed=True)
        assert sorted(s.values()) == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
        assert s.max_abs == 2 ** (bits - 1) - 1
        # decode(encode(v)) == v on the narrow range; -2^(k-1) saturates to -(2^(k-1)-1)
        v = jnp.asarray(s.finite_values(), jnp.float32)
        np.testing.assert_array_equal(s.decode(s.encode(v)), v)
        assert float(s.round(jnp.float32(-(2 ** (bits - 1))))) == -(2 ** (bits - 1) - 1)


@pytest.mark.parametrize("k", range(1, 9))
def test_bipolar_is_sum_of_signed_bit_planes(k):
    fmt = F.bipolar_int(k)
    codes = np.arange(2**k)
    planes = ((codes[:, None] >> np.arange(k)) & 1) * 2 - 1  # b_i ∈ {−1, +1}
    np.testing.assert_array_equal(fmt.values(), planes @ (2.0 ** np.arange(k)))
    assert 0.0 not in fmt.values() and fmt.symmetric


def test_ternary_and_binary():
    t = F.ternary_format()
    assert list(t.finite_values()) == [-1.0, 0.0, 1.0]
    y = jnp.asarray([-2.0, -0.6, -0.5, 0.0, 0.5, 0.51, 3.0], jnp.float32)
    np.testing.assert_array_equal(t.round(y), [-1, -1, 0, 0, 0, 1, 1])  # ties toward 0
    b = F.binary_format()
    np.testing.assert_array_equal(b.round(jnp.asarray([-0.1, 0.0, 0.2], jnp.float32)), [-1, 1, 1])


@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=40, unique=True))
def test_codebook_nearest_level(levels):
    levels = sorted(levels)
    fmt = F.codebook_format(levels)
    y = np.linspace(levels[0] - 1, levels[-1] + 1, 101).astype(np.float32)
    got = np.asarray(fmt.round(jnp.asarray(y)))
    lv = np.asarray(fmt.finite_values(), np.float32)
    best = np.min(np.abs(y[:, None] - lv[None, :]), axis=1)
    np.testing.assert_allclose(np.abs(got - y), best, atol=1e-6)


def test_get_format_names():
    assert F.get_format("int4") == F.IntFormat(bits=4)
    assert F.get_format("uint3") == F.IntFormat(bits=3, signed=False)
    assert F.get_format("nf4").name == "nf4"
    assert F.get_format("bipolar3").bits == 3
    assert F.get_format("fp4_e2m1").max_abs == 6.0
    assert F.get_format("fp8_e4m3").max_abs == 448.0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: F.IntFormat(bits=9), "1..8"),
        (lambda: F.IntFormat(bits=0), "1..8"),
        (lambda: F.IntFormat(bits=1, signed=True), "binary_format"),
        (lambda: F.get_format("int12"), "1..8"),
        (lambda: F.get_format("float5"), "unknown format"),
        (lambda: F.normal_float(1), "2..8"),
        (lambda: F.codebook_format([1.0, 0.0]), "increasing"),
        (lambda: F.codebook_format([0.0, np.nan]), "finite"),
        (lambda: F.codebook_format(np.arange(300.0)), "1..8"),
    ],
)
def test_bad_formats_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bits_must_be_int():
    with pytest.raises(TypeError):
        F.IntFormat(bits=4.0)
