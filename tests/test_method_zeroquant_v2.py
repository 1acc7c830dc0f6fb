"""ZeroQuant-V2 (arXiv 2303.08302): LoRC lowers the weight error and more so with rank, its
factors' bits counted by hand, the leaf survives checkpoints bit for bit, per-token INT8
activations, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods import checkpoint
from methods.base import LayerStats
from methods.zeroquant_v2 import ZeroQuantV2Config, quantize_layer
from numerics.config import QuantConfig, rtn
from numerics.lowrank import LowRankCorrected, lorc
from numerics.quantize import fake_quant, quantize
from numerics.sparse import weight_bits

OUT, IN = 48, 160  # 160 = one group of 128 + a ragged group of 32


def _W(seed=0):
    return jax.random.t(jax.random.key(seed), 4.0, (OUT, IN)) * 0.05


def _err(W, leaf) -> float:
    return float(jnp.linalg.norm(W - leaf.dequantize(jnp.float32)))


def test_lorc_lowers_the_error_and_more_with_rank():
    W = _W()
    base = dict(bits=4, group_size=128, ragged=True)
    plain = quantize_layer(W, LayerStats(), ZeroQuantV2Config(lorc_rank=0, **base)).weight
    errs = [_err(W, plain)]
    for r in (2, 8, 32):
        leaf = quantize_layer(W, LayerStats(), ZeroQuantV2Config(lorc_rank=r, **base)).weight
        assert isinstance(leaf, LowRankCorrected) and leaf.rank == r
        errs.append(_err(W, leaf))
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs


def test_float_factors_are_the_eckart_young_correction():
    """With unquantized factors the corrected error is exactly the SVD tail of W − Ŵ."""
    W = _W(1)
    W_hat = quantize(W, rtn(3, group_size=32))
    r = 5
    leaf = lorc(W, W_hat, r, None)
    s = np.linalg.svd(np.asarray(W - W_hat.dequantize(), np.float64), compute_uv=False)
    np.testing.assert_allclose(_err(W, leaf), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)


def test_bits_count_the_factors():
    W = _W()
    cfg = ZeroQuantV2Config(bits=4, group_size=32, lorc_rank=8, lorc_bits=8)
    leaf = quantize_layer(W, LayerStats(), cfg).weight
    n_groups = IN // 32
    dense = OUT * IN * 4 + OUT * n_groups * (16 + 4)  # codes + fp16 scales + 4-bit zeros
    U = OUT * 8 * 8 + OUT * 16  # 8-bit codes + one fp16 scale per row
    V = 8 * IN * 8 + 8 * 16
    assert weight_bits(leaf) == pytest.approx((dense + U + V) / (OUT * IN))
    fp16 = quantize_layer(W, LayerStats(), ZeroQuantV2Config(group_size=32, lorc_bits=16))
    assert weight_bits(fp16.weight) == pytest.approx((dense + 16 * 8 * (OUT + IN)) / (OUT * IN))


def test_leaf_survives_checkpoint_bit_for_bit(tmp_path):
    W = _W(2)
    leaf = quantize_layer(W, LayerStats(), ZeroQuantV2Config(group_size=32)).weight
    checkpoint.save_tree(tmp_path / "c", {"w": leaf})
    back, _ = checkpoint.load_tree(tmp_path / "c")
    back = back["w"]
    assert type(back) is LowRankCorrected
    la, ta = jax.tree_util.tree_flatten(leaf)
    lb, tb = jax.tree_util.tree_flatten(back)
    assert ta == tb
    for a, b in zip(la, lb, strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(leaf.dequantize()))


SPREAD = jnp.arange(1, IN + 1, dtype=jnp.float32).reshape(1, 1, IN) / IN


def test_activations_are_per_token_int8():
    W = _W()
    act = quantize_layer(W, LayerStats(), ZeroQuantV2Config(group_size=32)).act
    x = jax.random.normal(jax.random.key(3), (2, 7, IN)) * SPREAD
    per_token = QuantConfig(format="int8", granularity="channel", axis=-1)
    np.testing.assert_array_equal(np.asarray(act(x)), np.asarray(fake_quant(x, per_token)))
    weight_only = ZeroQuantV2Config(group_size=32, act_bits=16)
    assert quantize_layer(W, LayerStats(), weight_only).act is None


def test_bad_input():
    with pytest.raises(ValueError, match="lorc_rank"):
        ZeroQuantV2Config(lorc_rank=-1)
    with pytest.raises(ValueError, match="bits"):
        ZeroQuantV2Config(lorc_bits=5)
    with pytest.raises(ValueError, match="activation"):
        ZeroQuantV2Config(act_format="int5")
    W = _W()
    with pytest.raises(TypeError, match="QArray"):
        lorc(W, W, 2, None)
    with pytest.raises(ValueError, match="shape"):
        lorc(W[:, :32], quantize(W, rtn(4, group_size=32)), 2, None)
    with pytest.raises(ValueError, match="rank"):
        lorc(W, quantize(W, rtn(4, group_size=32)), OUT + 1, None)
