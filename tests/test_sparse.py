"""Dense-and-sparse weights: outliers exact, accounting by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics.config import rtn
from numerics.quantize import quantize
from numerics.sparse import DenseSparse, split_outliers, weight_bits


def test_outliers_are_exact_and_counted():
    W = jax.random.normal(jax.random.key(0), (16, 64)).at[3, 5].set(40.0).at[7, 60].set(-33.0)
    mask = jnp.abs(W) > 10
    rows, cols, vals = split_outliers(W, mask)
    dense = quantize(jnp.where(mask, 0.0, W), rtn(3, group_size=32, scale_dtype="float16"))
    ds = DenseSparse(dense, rows, cols, vals)
    out = ds.dequantize()
    assert float(out[3, 5]) == 40.0 and float(out[7, 60]) == -33.0
    np.testing.assert_array_equal(
        np.asarray(out)[~np.asarray(mask)], np.asarray(dense.dequantize())[~np.asarray(mask)]
    )
    # hand count (symmetric: no zero points): 3-bit codes + fp16 scale / 32 + 32 per outlier
    assert weight_bits(ds) == pytest.approx(3 + 16 / 32 + 2 * 32 / W.size)
    assert weight_bits(dense) == pytest.approx(3 + 16 / 32)
    assert weight_bits(W) == 32.0
    leaves = jax.tree_util.tree_leaves(ds)
    assert all(isinstance(x, jax.Array) for x in leaves)


def test_mask_shape_checked():
    with pytest.raises(ValueError, match="mask shape"):
        split_outliers(jnp.ones((4, 4)), jnp.ones((4, 5), bool))
