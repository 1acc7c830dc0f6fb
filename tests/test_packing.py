"""Packing round trips and the bits-per-weight accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numerics.config import QuantConfig, rtn
from numerics.packing import bits_per_weight, pack, storage_bits, unpack
from numerics.quantize import quantize


@given(
    bits=st.integers(1, 8),
    word_bits=st.sampled_from([8, 16, 32]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=40),
    data=st.data(),
)
def test_pack_unpack_round_trip(bits, word_bits, shape, data):
    codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    packed = pack(jnp.asarray(codes), bits, axis=axis, word_bits=word_bits)
    assert packed.dtype == {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[word_bits]
    out = unpack(packed, bits, axis=axis, length=shape[axis])
    np.testing.assert_array_equal(out, codes)
    # the packing is dense: no more words than ceil(bits·n / word_bits) rounded to a run
    n = shape[axis]
    assert packed.shape[axis] * word_bits < (n * bits) + np.lcm(bits, word_bits) + word_bits


def test_pack_layout_is_little_endian_bit_stream():
    codes = jnp.asarray([1, 2, 3, 4, 5, 6, 7, 0], jnp.uint8)  # 3-bit codes
    words = pack(codes, 3, word_bits=8)
    stream = "".join(format(int(c), "03b")[::-1] for c in codes)
    expect = [int(stream[i : i + 8][::-1], 2) for i in range(0, 24, 8)]
    np.testing.assert_array_equal(words, expect)
    # 4-bit codes: 8 per uint32, code i in bits 4i..4i+3 (the GPTQ/AWQ int32 layout)
    w = pack(jnp.arange(8, dtype=jnp.uint8), 4, word_bits=32)
    assert int(w[0]) == sum(i << (4 * i) for i in range(8))


def test_packed_qarray_dequantizes_identically():
    x = jax.random.normal(jax.random.key(0), (8, 96))
    qa = quantize(x, rtn(3, group_size=32, sym=False))
    for axis in (0, 1):
        p = qa.pack(axis=axis, word_bits=32)
        np.testing.assert_array_equal(p.dequantize(), qa.dequantize())
        np.testing.assert_array_equal(p.unpack().codes, qa.codes)


def test_bits_per_weight_counts_scales_zeros_outliers():
    x = jax.random.normal(jax.random.key(1), (64, 256))
    qa = quantize(x, rtn(3, group_size=128, sym=False, scale_dtype="float16"))
    assert bits_per_weight(qa) == pytest.approx(3 + 16 / 128 + 3 / 128)
    qs = quantize(x, rtn(4, group_size=128, scale_dtype="float16"))
    assert bits_per_weight(qs) == pytest.approx(4 + 16 / 128)
    assert bits_per_weight(qs, n_outliers=64) == pytest.approx(4 + 16 / 128 + 64 * 32 / x.size)
    pc = quantize(x, QuantConfig(format="int8", granularity="channel"))
    assert storage_bits(pc) == {"codes": 8 * x.size, "scales": 64 * 32, "zeros": 0}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pack(jnp.zeros(8, jnp.uint8), 9), "1..8"),
        (lambda: pack(jnp.zeros(8, jnp.uint8), 4, word_bits=64), "word_bits"),
        (lambda: pack(jnp.zeros(8, jnp.int32), 4), "uint8"),
        (lambda: unpack(jnp.zeros(2, jnp.uint32), 3, length=8), "whole number"),
        (lambda: unpack(jnp.zeros(3, jnp.uint32), 3, length=33), "capacity"),
    ],
)
def test_bad_packing_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
