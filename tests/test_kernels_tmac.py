"""T-MAC lookup-table mpGEMM: exact on integer activations, bounded on float ones, and its
operation counts checked against an instrumented model of the algorithm.

Float tolerance: the kernel sums the ``K·b`` terms ``x_k·2^i·B_ik`` (plane products by powers
of two are exact) plus the zero-point correction in another order than the multiply-based
reference, so each side is within ``γ_n · T`` of the exact float64 value with
``T = |x| @ ((2^b − 1) + |z|)ᵀ·|s|`` and ``n = K·(b + 2)`` additions at most (Higham eq. 3.5).

Each test runs in Pallas interpret mode on CPU and, marked ``gpu``, compiled on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import qarray_tmac, tmac, tmac_op_counts, tmac_prepare, tmac_reference
from numerics.config import rtn
from numerics.formats import get_format
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
FEW = max(5, settings.default.max_examples // 6)  # each example compiles 2–3 kernels
FORMATS = ["uint1", "uint2", "uint3", "uint4", "int2", "int3", "int4"]


def _exact(x, codes, fmt, scale=None, zero=None, g=None):
    v = fmt.values()[codes]  # float64
    if scale is None:
        return x.astype(np.float64) @ v.T
    N, K = codes.shape
    v = v.reshape(N, K // g, g)
    if zero is not None:
        v = v - zero[:, :, None]
    return x.astype(np.float64) @ (v * scale[:, :, None]).reshape(N, K).T


@pytest.mark.parametrize("interpret", MODES)
@settings(max_examples=FEW)
@given(
    name=st.sampled_from(FORMATS),
    M=st.sampled_from([1, 5]),
    N=st.sampled_from([16, 32]),
    K=st.sampled_from([64, 128]),
    g=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**16),
)
def test_tmac_exact_on_int8_activations(interpret, name, M, N, K, g, seed):
    fmt = get_format(name)
    r = np.random.default_rng(seed)
    codes = r.integers(0, 2**fmt.bits, (N, K)).astype(np.uint8)
    x = r.integers(-128, 128, (M, K)).astype(np.int8)
    planes = tmac_prepare(jnp.asarray(codes), fmt)
    assert planes.shape == (fmt.bits, N, K // 32) and planes.dtype == jnp.uint32
    # the integer product: int32, equal to the int64 product and to the reference
    y = tmac(jnp.asarray(x), planes, fmt=fmt, interpret=interpret)
    want = _exact(x, codes, fmt).astype(np.int64)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), want)
    np.testing.assert_array_equal(np.asarray(tmac_reference(jnp.asarray(x), jnp.asarray(codes),
                                                            fmt=fmt)), want)  # fmt: skip
    # with power-of-two group scales and integer zeros every float32 step is exact too
    scale = (2.0 ** r.integers(-3, 3, (N, K // g))).astype(np.float32)
    zero = r.integers(0, 2**fmt.bits, (N, K // g)).astype(np.float32)
    ys = tmac(jnp.asarray(x), planes, jnp.asarray(scale), jnp.asarray(zero), fmt=fmt,
              interpret=interpret)  # fmt: skip
    ys_ref = tmac_reference(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(scale),
                            jnp.asarray(zero), fmt=fmt)  # fmt: skip
    exact = _exact(x, codes, fmt, scale, zero, g).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ys), exact)
    np.testing.assert_array_equal(np.asarray(ys_ref), exact)


@pytest.mark.parametrize("interpret", MODES)
@settings(max_examples=FEW)
@given(
    name=st.sampled_from(FORMATS),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float32]),
    zero_point=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tmac_float_activations_within_bound(interpret, name, dtype, zero_point, seed):
    fmt = get_format(name)
    M, N, K, g = 3, 16, 128, 32
    r = np.random.default_rng(seed)
    codes = r.integers(0, 2**fmt.bits, (N, K)).astype(np.uint8)
    x = jnp.asarray(r.normal(size=(M, K)), jnp.float32).astype(dtype)
    scale = r.uniform(0.01, 1, (N, K // g)).astype(np.float32)
    zero = r.integers(0, 2**fmt.bits, (N, K // g)).astype(np.float32) if zero_point else None
    y = tmac(x, tmac_prepare(jnp.asarray(codes), fmt), jnp.asarray(scale),
             None if zero is None else jnp.asarray(zero), fmt=fmt, interpret=interpret)  # fmt: skip
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    exact = _exact(x64, codes, fmt, scale, zero, g)
    bound = _float_bound(x64, fmt, scale, zero, g)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)


def _float_bound(x64, fmt, scale, zero, g):
    """``γ_n · |x| @ ((2^b − 1) + |z|)ᵀ·|s|`` with ``n = K·(b + 2)`` (module docstring)."""
    K = x64.shape[1]
    zabs = np.zeros_like(scale) if zero is None else np.abs(zero)
    per_w = ((2**fmt.bits - 1) + zabs) * np.abs(scale)  # [N, K/g]
    T = np.abs(x64) @ np.repeat(per_w, g, axis=1).T
    n = K * (fmt.bits + 2)
    return n * 2.0**-24 / (1 - n * 2.0**-24) * T


@pytest.mark.parametrize("interpret", MODES)
def test_qarray_tmac_matches_the_dequantized_product(interpret):
    kx, kw = jax.random.split(jax.random.key(5))
    W = jax.random.normal(kw, (32, 128), jnp.float32)
    qa = quantize(W, rtn(3, group_size=64, sym=False))
    x = jax.random.normal(kx, (4, 128), jnp.float32)
    y = qarray_tmac(x, qa, interpret=interpret)
    codes = np.asarray(qa.codes)
    scale, zero = np.asarray(qa.scale, np.float64), np.asarray(qa.zero, np.float64)
    x64 = np.asarray(x, np.float64)
    exact = _exact(x64, codes, qa.format, scale, zero, 64)
    bound = _float_bound(x64, qa.format, scale, zero, 64)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)


# --------------------------------------------------------------------------- operation counts


def _tmac_model(x, codes, bits, scale, zero, g):
    """T-MAC in plain numpy with a counter per scalar operation (the algorithm of the module
    docstring, written independently of the kernel): returns (y, counts)."""
    M, K = x.shape
    N = codes.shape[0]
    c = {"table_entries": 0, "table_adds": 0, "lookups": 0, "lookup_adds": 0,
         "plane_shift_adds": 0, "multiplies": 0, "epilogue_adds": 0}  # fmt: skip
    y = np.zeros((M, N))
    for m in range(M):
        tables = []
        for j in range(K // 4):
            T = np.zeros(16)
            for p in range(1, 16):
                hb = p.bit_length() - 1
                if p == 1 << hb:
                    T[p] = x[m, 4 * j + hb]
                else:
                    T[p] = T[p - (1 << hb)] + x[m, 4 * j + hb]
                    c["table_adds"] += 1
            c["table_entries"] += 16
            tables.append(T)
        for n in range(N):
            for G in range(K // g):
                acc = 0.0
                for i in range(bits):
                    part = 0.0
                    for j in range(G * g // 4, (G + 1) * g // 4):
                        q = codes[n, 4 * j : 4 * j + 4]
                        idx = sum(((int(q[t]) >> i) & 1) << t for t in range(4))
                        part += tables[j][idx]
                        c["lookups"] += 1
                        c["lookup_adds"] += 1
                    acc += part * 2**i
                    c["plane_shift_adds"] += 1
                xsum = sum(tables[j][15] for j in range(G * g // 4, (G + 1) * g // 4))
                y[m, n] += scale[n, G] * (acc - zero[n, G] * xsum)
                c["multiplies"] += 2
                c["epilogue_adds"] += 2
    return y, c


def test_op_counts_match_an_instrumented_model():
    M, N, K, bits, g = 2, 3, 64, 3, 32
    r = np.random.default_rng(0)
    codes = r.integers(0, 2**bits, (N, K))
    x = r.integers(-5, 6, (M, K)).astype(np.float64)
    scale = 2.0 ** r.integers(-2, 2, (N, K // g))
    zero = r.integers(0, 2**bits, (N, K // g)).astype(np.float64)
    y, counts = _tmac_model(x, codes, bits, scale, zero, g)
    fmt = get_format("uint3")
    np.testing.assert_array_equal(y, _exact(x, codes.astype(np.uint8), fmt, scale, zero, g))
    reported = tmac_op_counts(M, N, K, bits, g)
    for k, v in counts.items():
        assert reported["tmac"][k] == v, k
    mul = reported["multiply_based"]
    assert mul["multiplies"] == M * N * K and mul["adds"] == M * N * K
    # the point of T-MAC: multiplications only in the per-group epilogue
    assert reported["tmac"]["multiplies"] * g // 2 == mul["multiplies"]
    assert reported["lookups_per_mac"] == bits / 4


# --------------------------------------------------------------------------- bad input


def test_tmac_rejects_bad_input():
    codes = jnp.zeros((16, 64), jnp.uint8)
    planes = tmac_prepare(codes, "uint4")
    x = jnp.zeros((2, 64), jnp.int8)
    with pytest.raises(ValueError, match="integer format"):
        tmac_prepare(codes, "nf4")
    with pytest.raises(ValueError, match="unsupported bit-width 5"):
        tmac_prepare(codes, "uint5")
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        tmac_prepare(jnp.zeros((16, 48), jnp.uint8), "uint4")
    with pytest.raises(ValueError, match="codes must be 2-D uint8"):
        tmac_prepare(codes.astype(jnp.int32), "uint4")
    with pytest.raises(ValueError, match="int8 .exact path. or bfloat16"):
        tmac(x.astype(jnp.int32), planes, fmt="uint4")
    with pytest.raises(ValueError, match="do not match"):
        tmac(x, planes, fmt="uint3")
    with pytest.raises(ValueError, match="do not match"):
        tmac(jnp.zeros((2, 128), jnp.int8), planes, fmt="uint4")
    with pytest.raises(ValueError, match="zero points need scales"):
        tmac(x, planes, None, jnp.zeros((16, 2)), fmt="uint4")
    with pytest.raises(ValueError, match="group size 16"):
        tmac(x, planes, jnp.ones((16, 4)), fmt="uint4")
    with pytest.raises(ValueError, match="scales must be"):
        tmac(x, planes, jnp.ones((16, 2), jnp.int32), fmt="uint4")
    with pytest.raises(ValueError, match="multiple of 4"):
        tmac_op_counts(1, 1, 66, 4)


def test_tmac_lowers_to_triton_without_a_gpu():
    codes = jnp.zeros((64, 256), jnp.uint8)
    planes = tmac_prepare(codes, "uint4")
    s = jnp.ones((64, 2), jnp.float32)
    f = lambda x, p, s, z: tmac(x, p, s, z, fmt="uint4")  # noqa: E731
    for x in (jnp.zeros((1, 256), jnp.int8), jnp.zeros((1, 256), jnp.bfloat16)):
        text = jax.jit(f).trace(x, planes, s, s).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text
