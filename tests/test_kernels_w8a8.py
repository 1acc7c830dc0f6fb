"""W8A8 kernel: the int32 accumulator is exact (equal to an int64 numpy matmul), and the
scaled output equals the reference bit for bit (same float32 epilogue, same order).

Each test runs in Pallas interpret mode on CPU and, marked ``gpu``, compiled on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import int8_matmul, int8_matmul_reference, qarray_w8a8, w8a8, w8a8_reference
from kernels.w8a8 import MAX_K
from numerics.config import QuantConfig
from numerics.quantize import quantize

ON_GPU = jax.devices()[0].platform == "gpu"
MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(
        False,
        id="compiled",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")],
    ),
]
FEW = max(5, settings.default.max_examples // 5)  # each example compiles two kernels
PER_ROW_INT8 = QuantConfig(format="int8", granularity="channel")  # per token / per channel


@pytest.mark.parametrize("interpret", MODES)
@settings(max_examples=FEW)
@given(
    M=st.sampled_from([1, 7, 33]),
    N=st.sampled_from([16, 48, 64]),
    K=st.sampled_from([32, 96, 256]),
    out_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    extreme=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_w8a8_exact(interpret, M, N, K, out_dtype, extreme, seed):
    r = np.random.default_rng(seed)
    if extreme:  # all −128: the largest |accumulator|, K·2^14
        xq, wq = np.full((M, K), -128, np.int8), np.full((N, K), -128, np.int8)
    else:
        xq = r.integers(-128, 128, (M, K)).astype(np.int8)
        wq = r.integers(-128, 128, (N, K)).astype(np.int8)
    s_x = r.uniform(1e-3, 1, M).astype(np.float32)
    s_w = r.uniform(1e-3, 1, N).astype(np.float32)
    acc = int8_matmul(jnp.asarray(xq), jnp.asarray(wq), interpret=interpret)
    want = xq.astype(np.int64) @ wq.astype(np.int64).T
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), want)
    np.testing.assert_array_equal(
        np.asarray(int8_matmul_reference(jnp.asarray(xq), jnp.asarray(wq))), want
    )
    args = (jnp.asarray(xq), jnp.asarray(wq), jnp.asarray(s_x), jnp.asarray(s_w))
    y = w8a8(*args, out_dtype=out_dtype, interpret=interpret)
    y_ref = w8a8_reference(*args, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (M, N)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))


@pytest.mark.parametrize("interpret", MODES)
def test_qarray_w8a8_is_the_product_of_the_dequantized_operands(interpret):
    """SmoothQuant's inner product: with per-token / per-channel int8 QArrays the kernel gives
    ``x̂ @ Ŵᵀ``; the only difference is float32 rounding of the scale products, so the
    relative gap to float64 is a few float32 ulps of ``|x̂|·|Ŵ|ᵀ`` (bound: 4·u per entry)."""
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (9, 128), jnp.float32)
    W = jax.random.normal(kw, (32, 128), jnp.float32)
    qx, qw = quantize(x, PER_ROW_INT8), quantize(W, PER_ROW_INT8)
    y = qarray_w8a8(qx, qw, interpret=interpret)
    xd = np.asarray(qx.dequantize(), np.float64)
    wd = np.asarray(qw.dequantize(), np.float64)
    exact = xd @ wd.T
    # the float32 epilogue rounds float32(acc)·s_x·s_w (2 roundings, acc exact below 2^24);
    # the dequantized operands themselves were rounded once each: 4 roundings in all.
    bound = 4 * 2.0**-24 * (np.abs(xd) @ np.abs(wd).T) + 4 * 2.0**-24 * np.abs(exact)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)


def test_w8a8_rejects_bad_input():
    xq = jnp.zeros((4, 64), jnp.int8)
    wq = jnp.zeros((32, 64), jnp.int8)
    s_x, s_w = jnp.ones((4,), jnp.float32), jnp.ones((32,), jnp.float32)
    with pytest.raises(ValueError, match="xq must be int8"):
        w8a8(xq.astype(jnp.float32), wq, s_x, s_w)
    with pytest.raises(ValueError, match="wq must be int8"):
        int8_matmul(xq, wq.astype(jnp.uint8))
    with pytest.raises(ValueError, match="K=64 but wq has K=32"):
        int8_matmul(xq, jnp.zeros((32, 32), jnp.int8))
    with pytest.raises(ValueError, match="non-empty 2-D"):
        int8_matmul(jnp.zeros((0, 64), jnp.int8), wq)
    with pytest.raises(ValueError, match="s_x must have shape"):
        w8a8(xq, wq, jnp.ones((5,), jnp.float32), s_w)
    with pytest.raises(ValueError, match="s_w must be a float"):
        w8a8(xq, wq, s_x, jnp.ones((32,), jnp.int32))
    with pytest.raises(ValueError, match="not a multiple of any tile"):
        int8_matmul(xq, jnp.zeros((24, 64), jnp.int8))
    with pytest.raises(ValueError, match="not a multiple of any tile"):
        int8_matmul(jnp.zeros((4, 48), jnp.int8), jnp.zeros((32, 48), jnp.int8))
    with pytest.raises(ValueError, match="overflow"):
        int8_matmul(jnp.zeros((1, MAX_K + 32), jnp.int8), jnp.zeros((16, MAX_K + 32), jnp.int8))
    with pytest.raises(ValueError, match="block_n"):
        int8_matmul(xq, wq, block_n=64)


def test_qarray_w8a8_rejects_other_granularities():
    x = jax.random.normal(jax.random.key(0), (4, 64), jnp.float32)
    q = quantize(x, PER_ROW_INT8)
    with pytest.raises(ValueError, match="one scale per row"):
        qarray_w8a8(quantize(x, QuantConfig(format="int8", granularity="tensor")), q)
    with pytest.raises(ValueError, match="symmetric int8"):
        qarray_w8a8(quantize(x, QuantConfig(format="int4", granularity="channel")), q)


@pytest.mark.parametrize("scaled", [False, True])
def test_w8a8_lowers_to_triton_without_a_gpu(scaled):
    xq, wq = jnp.zeros((1, 512), jnp.int8), jnp.zeros((256, 512), jnp.int8)
    if scaled:
        f = lambda a, b: w8a8(a, b, jnp.ones((1,)), jnp.ones((256,)))  # noqa: E731
    else:
        f = int8_matmul
    text = jax.jit(f).trace(xq, wq).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
