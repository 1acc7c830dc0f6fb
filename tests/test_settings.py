"""The strict settings of conftest are really in force."""

import jax
import jax.numpy as jnp
import pytest


def test_eight_virtual_devices():
    assert jax.device_count() == 8


def test_strict_dtype_promotion():
    with pytest.raises(jax.dtypes.TypePromotionError):
        _ = jnp.ones(2, jnp.float32) + jnp.ones(2, jnp.bfloat16)


def test_rank_promotion_raises():
    with pytest.raises(ValueError, match="rank"):
        _ = jnp.ones((2, 3)) + jnp.ones(3)
