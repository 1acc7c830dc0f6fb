"""ZeroQuant(4+2) (arXiv 2312.08583): the 4+2 split round-trips bit for bit, bits per weight
= 6 + scales, E3M2 codes and per-channel scales, FP6 close to full precision, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods.base import LayerStats
from methods.zeroquant_4p2 import ZeroQuant42Config, quantize_layer
from methods.zeroquant_4p2.core import join_4p2, split_4p2
from numerics.packing import pack_planes, unpack_planes
from numerics.sparse import weight_bits


@pytest.mark.parametrize("n", [16, 577, 33])
def test_planes_round_trip_bit_for_bit(n):
    codes = jax.random.randint(jax.random.key(n), (5, n), 0, 64).astype(jnp.uint8)
    hi, lo = pack_planes(codes, (4, 2))
    assert hi.dtype == lo.dtype == jnp.uint32
    assert hi.shape == (5, -(-n // 8)) and lo.shape == (5, -(-n // 16))  # 8 / 16 codes a word
    back = unpack_planes((hi, lo), (4, 2), length=n)
    assert back.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))
    # the planes are the code's high 4 and low 2 bits
    np.testing.assert_array_equal(
        np.asarray(unpack_planes((hi,), (4,), length=n)), np.asarray(codes) >> 2
    )


def test_fp6_weight_split_and_joined():
    W = jax.random.t(jax.random.key(0), 4.0, (24, 577)) * 0.05
    qa = quantize_layer(W, LayerStats(), ZeroQuant42Config()).weight
    qa.check()
    assert qa.format.name == "fp6_e3m2" and qa.scale.shape == (24, 1)  # per output channel
    back = join_4p2(split_4p2(qa), qa)
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qa.codes))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qa.dequantize()))
    assert weight_bits(qa) == pytest.approx(6 + 16 / 577)  # 6-bit codes + one fp16 scale a row


def test_fp6_is_close_to_full_precision_and_finer_than_fp4():
    """E3M2's relative step is 2^-2 of a binade: the error is a few percent of the weights'."""
    W = jax.random.normal(jax.random.key(1), (64, 256)) * 0.02
    err = lambda w: float(jnp.linalg.norm(W - w.dequantize()) / jnp.linalg.norm(W))
    e6 = err(quantize_layer(W, LayerStats(), ZeroQuant42Config()).weight)
    assert e6 < 0.06
    from numerics.config import QuantConfig
    from numerics.quantize import quantize

    e4 = err(quantize(W, QuantConfig(format="fp4_e2m1", granularity="channel")))
    assert e6 < e4 / 2


def test_bad_input():
    with pytest.raises(ValueError, match="parts"):
        pack_planes(jnp.zeros((2, 4), jnp.uint8), (4, 5))
    with pytest.raises(TypeError, match="uint8"):
        pack_planes(jnp.zeros((2, 4), jnp.int32), (4, 2))
    with pytest.raises(ValueError, match="planes"):
        unpack_planes((jnp.zeros((2, 1), jnp.uint32),), (4, 2), length=4)
    with pytest.raises(ValueError, match="format"):
        ZeroQuant42Config(format="fp6_e4m1")
    from numerics.config import rtn
    from numerics.quantize import quantize

    with pytest.raises(ValueError, match="6-bit"):
        split_4p2(quantize(jnp.ones((2, 8)), rtn(4)))
