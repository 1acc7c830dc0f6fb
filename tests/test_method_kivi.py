"""KIVI's codecs: keys per channel over a chunk of tokens, values per token over channel groups,
asymmetric min-max, packed codes with fp16 scales / zero points, and its residual policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import kvcache
from methods.kivi import ChannelKeys, KIVIConfig, TokenValues, kv_quant

B, H, D = 2, 3, 64


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_share_a_range_per_channel_over_the_chunk(bits):
    codec = ChannelKeys(bits=bits, chunk=32, flush=32)
    x = _x((B, 32, H, D))
    x = x.at[:, :, :, 5].multiply(40.0)  # an outlier channel: it must not widen the others
    y = codec.decode(0, codec.encode(0, x))
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    step = (jnp.maximum(hi, 0) - jnp.minimum(lo, 0)) / (2**bits - 1)
    err = jnp.abs(y - x)
    assert bool(jnp.all(err <= step * 0.5 + step * 1e-3 + 1e-6))  # half a step (+ fp16 scale)
    others = np.delete(np.asarray(err), 5, axis=3)
    assert others.max() < 0.1 * float(jnp.abs(y - x)[..., 5].max())


def test_values_per_token_groups_and_constant_channels_are_exact():
    codec = TokenValues(bits=2, group=32)
    x = jnp.broadcast_to(_x((B, 1, H, 1)), (B, 1, H, D))  # one value per token and head
    x = x.at[..., 32:].set(0.0)  # a zero group
    np.testing.assert_allclose(np.asarray(codec.decode(0, codec.encode(0, x))), np.asarray(x),
                               atol=2e-3 * float(jnp.abs(x).max()))  # fmt: skip
    code = codec.encode(0, _x((B, 1, H, D)))
    assert code.codes.dtype == jnp.uint32 and code.codes.shape == (B, 1, H, D * 2 // 32)
    assert code.scale.dtype == jnp.float16 and code.zero.dtype == jnp.float16
    assert code.scale.shape == (B, 1, H, D // 32)


def test_bits_per_element_count_codes_scales_zeros_and_the_residual():
    kvq = kv_quant(KIVIConfig(bits=2))
    assert kvq.key.element_bits(D) == kvq.value.element_bits(D) == 3.0
    # 2048 tokens: 1920 keys and 1919 values quantized, the rest in 16 bits
    assert kvq.bits_per_element(2048, D) == pytest.approx((3839 * 3 + 257 * 16) / 4096)
    assert kvcache.quantized_prefix(kvq.key, 128) == 0
    assert kvcache.quantized_prefix(kvq.key, 129) == 128
    assert kvcache.quantized_prefix(kvq.value, 130) == 1


def test_token_keys_ablation_uses_the_value_codec_on_keys():
    kvq = kv_quant(KIVIConfig(bits=2, keys="token"))
    assert isinstance(kvq.key, TokenValues) and kvq.key.window == 1 and kvq.key.flush == 128
    x = _x((B, 1, H, D)).at[..., 5].multiply(40.0)
    per_token = kvq.key.decode(0, kvq.key.encode(0, x))
    # per token, the outlier channel widens its whole group of 32
    assert float(jnp.abs(per_token - x)[..., :32].max()) > 0.5


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="bits=5"):
        KIVIConfig(bits=5)
    with pytest.raises(ValueError, match="keys must be"):
        KIVIConfig(keys="head")
    with pytest.raises(ValueError, match="residual 48 must be a multiple of the group 32"):
        KIVIConfig(residual=48)
    with pytest.raises(ValueError, match="group must be a positive int"):
        KIVIConfig(group=0)


def test_nan_reaches_the_decoded_chunk_not_the_others():
    codec = ChannelKeys(bits=2, chunk=32, flush=32)
    x = _x((1, 32, H, D)).at[0, 3, 1, 7].set(jnp.nan)
    y = jax.jit(lambda a: codec.decode(0, codec.encode(0, a)))(x)
    assert bool(jnp.isnan(y[0, :, 1, 7]).all())  # the channel's group decodes to NaN
    assert bool(jnp.isfinite(y[0, :, 0]).all())  # other heads' channels are untouched
