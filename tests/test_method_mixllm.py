"""MixLLM (methods/mixllm): the row-mixed leaf (dequantization, exact bit count, checkpoint
round trip), the salience ranking is global across linears and respects the budget, the salient
rows are the ones at 8 bits, and bad input is refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from harness.model import ModelConfig, get_param, init_params, linear_names
from methods import checkpoint, mixllm
from methods.base import LayerStats
from methods.mixllm import core
from numerics.mixed import RowMixed
from numerics.packing import storage_bits
from numerics.quantize import quantize
from numerics.sparse import weight_bits

CFG = mixllm.MixLLMConfig(group_size=32, high_frac=0.25)


def _layer(seed=0, d_out=16, d_in=64):
    rng = np.random.default_rng(seed)
    W = jnp.asarray(rng.normal(size=(d_out, d_in)), jnp.float32)
    F = jnp.asarray(rng.uniform(0.1, 1.0, size=(d_out, d_in)), jnp.float32)
    F = F.at[jnp.array([2, 9])].mul(1000.0)  # two rows the loss is very sensitive to
    return W, LayerStats(fisher=F)


def test_salient_rows_are_the_8bit_ones_and_dequantize_in_place():
    W, st = _layer()
    leaf = core.quantize_layer(W, st, CFG).weight
    assert isinstance(leaf, RowMixed) and leaf.n_high == 4  # 25 % of 16 rows
    assert {2, 9} <= set(np.asarray(leaf.rows_high).tolist())
    high = np.asarray(leaf.rows_high)
    np.testing.assert_array_equal(
        np.asarray(leaf.dequantize())[high],
        np.asarray(quantize(W[high], CFG.high_config()).dequantize()),
    )
    low = np.asarray(leaf.rows_low)
    np.testing.assert_array_equal(
        np.asarray(leaf.dequantize())[low],
        np.asarray(quantize(W[low], CFG.low_config()).dequantize()),
    )


def test_bits_count_each_row_at_its_width():
    W, st = _layer()
    leaf = core.quantize_layer(W, st, CFG).weight
    total = sum(storage_bits(leaf.low).values()) + sum(storage_bits(leaf.high).values())
    expect = (total + 16 * 4) / W.size
    assert weight_bits(leaf) == pytest.approx(expect)
    # 4 rows at 8 bits (+ one fp16 scale each), 12 at 4 bits g32 (+ fp16 scale, 4-bit zero)
    by_hand = (4 * (64 * 8 + 16) + 12 * (64 * 4 + 2 * (16 + 4)) + 4 * 16) / W.size
    assert weight_bits(leaf) == pytest.approx(by_hand)


def test_leaf_survives_checkpoint_bit_for_bit(tmp_path):
    W, st = _layer()
    for frac in (0.25, 0.0, 1.0):  # both parts, no high part, no low part
        cfg = mixllm.MixLLMConfig(group_size=32, high_frac=frac)
        leaf = core.quantize_layer(W, st, cfg).weight
        checkpoint.save_tree(tmp_path / f"c{frac}", {"w": leaf})
        back, _ = checkpoint.load_tree(tmp_path / f"c{frac}")
        assert type(back["w"]) is RowMixed
        np.testing.assert_array_equal(
            np.asarray(back["w"].dequantize()), np.asarray(leaf.dequantize())
        )
        assert weight_bits(back["w"]) == weight_bits(leaf)


def test_global_threshold_respects_the_budget_and_ranks_across_layers():
    a = np.array([5.0, 4.0, 0.1, 0.2])  # layer a: rows of 10 weights
    b = np.array([3.0, 0.3, 0.05])  # layer b: rows of 30 weights
    tau = core.global_threshold([a, b], [10, 30], 0.5)  # budget 0.5·130 = 65 weights
    # by salience: a0 (10 weights so far), a1 (20), b0 (50); b1 next would make 80 > 65
    assert tau == 3.0
    promoted = 10 * (a >= tau).sum() + 30 * (b >= tau).sum()
    assert promoted <= 65
    assert core.global_threshold([a, b], [10, 30], 0.0) == float("inf")


TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                   d_ff=64)  # fmt: skip


def test_model_budget_is_global():
    params = init_params(TINY, 0)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)
    names = linear_names(TINY)
    fisher = {n: jnp.ones(get_param(params, n).shape, jnp.float32) for n in names}
    hot = names[3]
    fisher[hot] = fisher[hot] * 1e6  # one linear matters far more than the others
    cfg = mixllm.MixLLMConfig(group_size=32, high_frac=0.05)
    qm = mixllm.quantize_model(params, TINY, tokens, cfg, fisher=fisher)
    highs = {n: get_param(qm.params, n).n_high for n in names}
    assert highs[hot] > 0 and sum(v for n, v in highs.items() if n != hot) == 0
    total = sum(int(np.prod(get_param(params, n).shape)) for n in names)
    assert highs[hot] * get_param(params, hot).shape[1] <= 0.05 * total
    assert qm.bits_per_activation == 8.0


def test_bad_input_is_refused():
    W, st = _layer()
    with pytest.raises(ValueError, match="Fisher"):
        core.quantize_layer(W, LayerStats(), CFG)
    with pytest.raises(ValueError, match="fisher of shape"):
        core.quantize_layer(W[:8], st, CFG)
    with pytest.raises(ValueError, match="high_frac"):
        mixllm.MixLLMConfig(high_frac=1.5)
    with pytest.raises(ValueError, match="NaN"):
        core.quantize_layer(W.at[1, 1].set(jnp.nan), st, CFG)
