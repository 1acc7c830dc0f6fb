"""Scales of scales: QLoRA double quantization, DGQ and QServe two-level scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics.config import QuantConfig, rtn
from numerics.packing import bits_per_weight
from numerics.quantize import quantize
from numerics.scales import dgq_quantize, double_quantize, progressive_quantize, quantize_scales

W = jax.random.normal(jax.random.key(0), (512, 1024)) * 0.02


def _err(qa):
    return float(jnp.mean((qa.dequantize() - W) ** 2))


def test_qlora_double_quantization_memory_and_error():
    qa = quantize(W, QuantConfig(format="nf4", granularity="group", group_size=64))
    dq = double_quantize(qa)
    # QLoRA §3: DQ reduces the constants from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits
    assert bits_per_weight(qa) == pytest.approx(4.5)
    assert bits_per_weight(dq) - 4 == pytest.approx(8 / 64 + 32 / (64 * 256) + 16 / (64 * 256))
    assert _err(dq) <= _err(qa) * 1.02  # FP8 constants cost under 2% extra MSE
    dq.scale.check()


def test_double_quantization_pads_non_multiple_scale_counts():
    W2 = W[:576, :576]
    qa = quantize(W2, QuantConfig(format="nf4", granularity="group", group_size=64))
    dq = double_quantize(qa)  # 5184 scales: not a multiple of 256
    assert dq.dequantize().shape == W2.shape
    np.testing.assert_allclose(dq.scale_array(), qa.scale_array(), rtol=0.07)


def test_dgq_integer_group_scales_times_channel_scale():
    d = dgq_quantize(W, bits=4, group_size=128)
    inner = d.scale
    assert inner.format.name == "uint8" and inner.scale.shape == (512, 1)
    base = quantize(W, rtn(4, group_size=128, sym=False))
    assert _err(d) <= _err(base) * 1.05
    assert bits_per_weight(d) < bits_per_weight(base)


def test_qserve_progressive_two_level():
    p = progressive_quantize(W, group_size=128)
    s2 = np.asarray(p.scale.codes)
    assert s2.min() >= 1 and p.scale.format.name == "uint8"
    z = np.asarray(p.zero)
    assert np.all((z >= 0) & (z <= 15) & (z == np.round(z)))
    # the intermediate s2·(q − z) stays inside the protective int8 range
    inter = (np.asarray(p.unpack().codes, np.float32).reshape(512, 8, 128) - z[:, :, None]) * s2[
        :, :, None
    ]
    assert np.abs(inter).max() <= 127
    assert _err(p) < 3 * _err(quantize(W, rtn(4, group_size=128, sym=False)))


def test_bad_scale_quantization_input():
    qa = quantize(W, rtn(4, group_size=128))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_scales(double_quantize(qa), QuantConfig(format="int8", granularity="tensor"))
    with pytest.raises(ValueError, match="2-D"):
        progressive_quantize(jnp.ones((4, 4, 4), jnp.float32))
    with pytest.raises(TypeError):
        dgq_quantize(jnp.ones((4, 128), jnp.int8))
