"""mpGEMM kernel vs its reference: formats × group sizes × shapes × activation dtypes.

Tolerance (``kernels.dot_error_bound``): the kernel's dequantized tile is bit-identical to the
reference's, so the two outputs differ only by the order of the float32 accumulation (Higham's
``γ_K · |x|·|Ŵ|ᵀ`` for each side) and by the final rounding to the activation dtype. On
integer-valued activations with power-of-two scales every partial sum is exact in float32,
and then the outputs must be *equal*.

Each test runs in Pallas interpret mode on CPU and, marked ``gpu``, compiled on a GPU.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels import dot_error_bound, mpgemm, mpgemm_reference, qarray_fields, qarray_matmul
from numerics.config import QuantConfig, rtn
from numerics.formats import get_format
from numerics.packing import pack
from numerics.quantize import quantize
from numerics.scales import double_quantize

ON_GPU = jax.devices()[0].platform == "gpu"
MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(
        False,
        id="compiled",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")],
    ),
]
FEW = max(5, settings.default.max_examples // 6)  # each example compiles an interpreted kernel

CASES = {
    "uint4_zero": lambda g: rtn(4, group_size=g, sym=False),
    "int4": lambda g: rtn(4, group_size=g),
    "uint3_zero": lambda g: rtn(3, group_size=g, sym=False),
    "uint2_zero": lambda g: rtn(2, group_size=g, sym=False),
    "int8_bf16_scales": lambda g: rtn(8, group_size=g, scale_dtype="bfloat16"),
    "nf4": lambda g: QuantConfig(format="nf4", granularity="group", group_size=g),
    "fp4_e2m1": lambda g: QuantConfig(format="fp4_e2m1", granularity="group", group_size=g),
    "mxfp4": lambda g: QuantConfig(
        format="fp4_e2m1", granularity="group", group_size=g, scale_kind="pow2"
    ),
    "uint4_per_channel": lambda g: rtn(4, sym=False),
}


def _every_case(test):
    """Explicit examples: every format case runs at least once, whatever hypothesis draws."""
    dtypes = (jnp.bfloat16, jnp.float32)
    for i, case in enumerate(sorted(CASES)):
        test = example(
            case=case, g=(32, 64, 128)[i % 3], k_groups=1 + i % 2, M=(1, 5, 17)[i % 3],
            N=(16, 48)[i % 2], dtype=dtypes[i % 2], block_k=(None, 32)[i % 2], seed=i,
        )(test)  # fmt: skip
    return test


def _as_f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _assert_within_bound(y, y_ref, x, W_fed, products_exact):
    """|y − y_ref| ≤ dot_error_bound, with ``W_fed`` the weights the dot actually sees."""
    x64, W64 = _as_f64(x), _as_f64(W_fed)
    bound = dot_error_bound(
        np.abs(x64) @ np.abs(W64).T, _as_f64(y_ref), x.shape[1], y.dtype,
        products_exact=products_exact,
    )  # fmt: skip
    err = np.abs(_as_f64(y) - _as_f64(y_ref))
    assert np.all(err <= bound), f"max excess {np.max(err - bound)} (max err {err.max()})"


@pytest.mark.parametrize("interpret", MODES)
@settings(max_examples=FEW)
@given(
    case=st.sampled_from(sorted(CASES)),
    g=st.sampled_from([32, 64, 128]),
    k_groups=st.sampled_from([1, 2]),
    M=st.sampled_from([1, 5, 17]),
    N=st.sampled_from([16, 48]),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float32]),
    block_k=st.sampled_from([None, 32]),
    seed=st.integers(0, 2**16),
)
@_every_case
def test_mpgemm_matches_reference(interpret, case, g, k_groups, M, N, dtype, block_k, seed):
    K = g * k_groups
    kx, kw = jax.random.split(jax.random.key(seed))
    W = jax.random.normal(kw, (N, K), jnp.float32)
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    qa = quantize(W, CASES[case](g)).pack(axis=1, word_bits=32)
    w, s, z = qarray_fields(qa)
    y = mpgemm(x, w, s, z, fmt=qa.format, block_k=block_k, interpret=interpret)
    y_ref = mpgemm_reference(x, w, s, z, fmt=qa.format)
    assert y.shape == (M, N) and y.dtype == dtype
    W_fed = qa.dequantize(jnp.float32).astype(dtype)  # what both dots multiply by
    _assert_within_bound(y, y_ref, x, W_fed, products_exact=dtype != jnp.float32)


EXACT_FORMATS = ["uint4", "int4", "uint3", "int3", "uint2", "int8", "uint8", "fp4_e2m1"]


@pytest.mark.parametrize("interpret", MODES)
@settings(max_examples=FEW)
@given(
    name=st.sampled_from(EXACT_FORMATS),
    g=st.sampled_from([32, 64, 128]),
    e8m0=st.booleans(),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float32]),
    tiles=st.sampled_from(
        [{}, {"block_n": 16}, {"block_k": 32, "split_k": 2}, {"block_k": 64, "split_k": 4}]
    ),
    seed=st.integers(0, 2**16),
)
def test_mpgemm_exact_on_integer_inputs(interpret, name, g, e8m0, dtype, tiles, seed):
    """Integer activations, power-of-two scales, integer zeros: every product and partial
    sum is exact in float32, so kernel = reference = exact float64 result rounded."""
    fmt = get_format(name)
    M, N, K = 3, 32, 2 * 128
    r = np.random.default_rng(seed)
    codes = r.integers(0, 2**fmt.bits, (N, K)).astype(np.uint8)
    x = r.integers(-8, 9, (M, K)).astype(np.float32)
    expo = r.integers(-2, 3, (N, K // g))
    zero = None
    if name.startswith("uint"):
        zero = r.integers(0, 2**fmt.bits, (N, K // g)).astype(np.float32)
    scale = (2.0**expo).astype(np.float32)
    s_in = jnp.asarray(scale).astype(jnp.float8_e8m0fnu) if e8m0 else jnp.asarray(scale)
    w = pack(jnp.asarray(codes), fmt.bits, axis=1, word_bits=32)
    z_in = None if zero is None else jnp.asarray(zero)
    xj = jnp.asarray(x).astype(dtype)
    y = mpgemm(xj, w, s_in, z_in, fmt=fmt, interpret=interpret, **tiles)
    y_ref = mpgemm_reference(xj, w, s_in, z_in, fmt=fmt)
    vals = fmt.values()[codes].reshape(N, K // g, g)
    if zero is not None:
        vals = vals - zero[:, :, None]
    exact = x.astype(np.float64) @ (vals * scale[:, :, None]).reshape(N, K).T
    np.testing.assert_array_equal(np.asarray(y_ref), np.asarray(y))
    want = exact.astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32)
    np.testing.assert_array_equal(np.asarray(y), want)


@pytest.mark.parametrize("interpret", MODES)
def test_qarray_matmul_is_the_fake_quant_product(interpret):
    """The harness seam: ``qarray_matmul(x, qa)`` equals ``x @ qa.dequantize().astype(x)ᵀ``
    (the fake-quant linear) for batched x, unpacked / packed QArrays, bf16 weights with f32
    activations (dequant_dtype), scales of scales (QLoRA double quantization) and row blocks."""
    kx, kw = jax.random.split(jax.random.key(7))
    W = jax.random.normal(kw, (32, 128), jnp.float32)
    nf4 = QuantConfig(format="nf4", granularity="group", group_size=64)
    cases = [
        (quantize(W, rtn(4, group_size=32, sym=False)), jnp.bfloat16),  # unpacked: packed here
        (quantize(W.astype(jnp.bfloat16), rtn(3, group_size=64, sym=False)), jnp.float32),
        (double_quantize(quantize(W, nf4)).pack(axis=1, word_bits=32), jnp.bfloat16),
        (quantize(W, QuantConfig(format="int4", granularity="block", block_shape=(8, 32))),
         jnp.float32),
    ]  # fmt: skip
    for qa, dtype in cases:
        x = jax.random.normal(kx, (2, 3, 128), jnp.float32).astype(dtype)
        y = qarray_matmul(x, qa, interpret=interpret)
        W_fed = qa.dequantize().astype(dtype)  # harness.layers.dense(w, x.dtype)
        y_fake = jnp.einsum(
            "...i,oi->...o", x, W_fed, preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        ).astype(dtype)  # fmt: skip
        assert y.shape == (2, 3, 32) and y.dtype == dtype
        _assert_within_bound(
            y.reshape(6, 32), y_fake.reshape(6, 32), x.reshape(6, 128), W_fed, dtype != jnp.float32
        )


def test_tables_are_decoded_in_kernel():
    """Code k mod 2^b in column k: picking column i with a one-hot row gives value(code i),
    so the select-tree decode reproduces every table entry (NF, FP4 E2M1, integers)."""
    for name in ("nf4", "fp4_e2m1", "nf3", "int2", "uint3"):
        fmt = get_format(name)
        n = 2**fmt.bits
        codes = np.broadcast_to(np.arange(128) % n, (16, 128)).astype(np.uint8)
        w = pack(jnp.asarray(codes), fmt.bits, axis=1, word_bits=32)
        x = jnp.eye(n, 128, dtype=jnp.float32)
        y = mpgemm(x, w, jnp.ones((16, 4), jnp.float32), fmt=fmt, interpret=True)
        want = np.broadcast_to(fmt.values().astype(np.float32)[:, None], (n, 16))
        np.testing.assert_array_equal(np.asarray(y), want)


# --------------------------------------------------------------------------- bad input


def _fields(bits=4, N=32, K=128, g=32):
    codes = jnp.zeros((N, K), jnp.uint8)
    return pack(codes, bits, axis=1, word_bits=32), jnp.ones((N, K // g), jnp.float32)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=jnp.ones((2, 128), jnp.int8)), "bfloat16, float16 or float32"),
        (dict(x=jnp.ones((2, 3, 128), jnp.float32)), "2-D"),
        (dict(x=jnp.ones((0, 128), jnp.float32)), "empty"),
        (dict(x=jnp.ones((2, 96), jnp.float32)), "words per row"),
        (dict(w=jnp.zeros((32, 16), jnp.uint8)), "uint32"),
        (dict(w=jnp.zeros((24, 16), jnp.uint32), s=jnp.ones((24, 4))), "N=24 is not a positive"),
        (dict(w=jnp.zeros((0, 16), jnp.uint32), s=jnp.ones((0, 4))), "N=0 is not a positive"),
        (dict(s=jnp.ones((32, 3), jnp.float32)), "do not divide K"),
        (dict(s=jnp.ones((32, 8), jnp.float32)), "group size 16"),
        (dict(s=jnp.ones((16, 4), jnp.float32)), "scale must be"),
        (dict(s=jnp.ones((32, 4), jnp.int32)), "scale dtype"),
        (dict(z=jnp.ones((32, 2), jnp.float32)), "zero shape"),
        (dict(z=jnp.ones((32, 4), jnp.int32)), "zero points must be a float"),
        (dict(fmt="uint5"), "unsupported bit-width 5"),
        (dict(fmt="uint1"), "unsupported bit-width 1"),
        (dict(fmt="fp8_e4m3"), "unsupported bit-width 8"),
        (dict(block_n=24), "power of two"),
        (dict(block_n=64), "does not divide"),
        (dict(block_k=48), "block_k=48"),
        (dict(block_k=512), "block_k=512"),
        (dict(split_k=3), "split_k=3"),
        (dict(block_m=8), "block_m"),
    ],
)
def test_mpgemm_rejects_bad_input(change, match):
    w, s = _fields()
    args = dict(x=jnp.ones((2, 128), jnp.float32), w=w, s=s, z=None, fmt="uint4")
    args.update(change)
    tiles = {k: args.pop(k) for k in ("block_n", "block_k", "split_k", "block_m") if k in args}
    for f in (mpgemm, mpgemm_reference):
        if f is mpgemm_reference and tiles:
            continue
        with pytest.raises(ValueError, match=match):
            f(args["x"], args["w"], args["s"], args["z"], fmt=args["fmt"], **tiles)


def test_mpgemm_rejects_ragged_k():
    """K not a multiple of 32 (whole words) is rejected before anything runs."""
    codes = jnp.zeros((16, 100), jnp.uint8)
    w = pack(codes, 4, axis=1, word_bits=32)  # padded to 104 codes
    with pytest.raises(ValueError, match="K=100 is not a multiple of 32"):
        mpgemm(jnp.ones((1, 100), jnp.float32), w, jnp.ones((16, 1)), fmt="uint4")


def test_qarray_matmul_rejects_bad_qarrays():
    W = jax.random.normal(jax.random.key(0), (32, 64), jnp.float32)
    qa = quantize(W, rtn(4, group_size=32))
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="packed as"):
        qarray_matmul(x, qa.pack(axis=0, word_bits=32), interpret=True)
    with pytest.raises(ValueError, match="features"):
        qarray_matmul(jnp.ones((2, 32), jnp.float32), qa, interpret=True)
    with pytest.raises(ValueError, match="2-D"):
        qarray_matmul(x, quantize(W.reshape(2, 16, 64), rtn(4, group_size=32)), interpret=True)
    with pytest.raises(ValueError, match="QArray"):
        qarray_matmul(x, W, interpret=True)
    with pytest.raises(ValueError, match="ragged"):
        qarray_matmul(x, quantize(W, rtn(4, group_size=48, ragged=True)), interpret=True)


# --------------------------------------------------------------------------- GPU lowering


@pytest.mark.parametrize("case", ["uint4_zero", "uint3_zero", "uint2_zero", "nf4", "mxfp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_mpgemm_lowers_to_triton_without_a_gpu(case, dtype):
    """Cross-platform lowering for CUDA runs the Pallas Triton lowering on CPU: it checks the
    Triton constraints (power-of-two tensors, supported primitives, strided loads)."""
    W = jax.random.normal(jax.random.key(0), (128, 512), jnp.float32)
    qa = quantize(W, CASES[case](128 if case != "mxfp4" else 32)).pack(axis=1, word_bits=32)
    w, s, z = qarray_fields(qa)
    x = jnp.ones((1, 512), dtype)
    f = lambda x, w, s, z: mpgemm(x, w, s, z, fmt=qa.format)  # noqa: E731
    text = jax.jit(f).trace(x, w, s, z).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
