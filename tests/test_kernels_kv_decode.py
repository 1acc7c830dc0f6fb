"""Quantized-KV decode attention vs its reference (dequantize the cache, masked softmax).

Tolerance: both sides see bit-identical dequantized K̂, V̂. The logits differ by the summation
order only, ``|Δs_t| ≤ 2γ_D·(|q|·|k̂_t|)·sm_scale``; the kernel's online softmax then rounds
each ``exp`` (≤ 4 ulp, generous for XLA's exp) and rescales once per block, so each weight
``p_t`` carries a relative error ``ε ≤ max_t |Δs_t| + (n_blocks + 2)·5u``; for the normalised
average ``o = Σ p_t v_t / Σ p_t`` that gives ``|Δo| ≤ (2ε + 4γ_T) · (Σ p_t|v_t|) / Σ p_t``
(first order; ``u = 2^-24``, ``γ_n = n·u/(1 − n·u)``, Higham eq. 3.5).

Runs in Pallas interpret mode on CPU and, marked ``gpu``, compiled on a GPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.kv_decode import (
    F16_SAFE,
    dequantize_cache,
    kv_decode,
    kv_decode_reference,
    merge_partials,
    needs_fallback,
    qarray_kv_decode,
)
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
FEW = max(5, settings.default.max_examples // 6)
U = 2.0**-24


def _gamma(n):
    return n * U / (1 - n * U)


def _cache(x, fmt, axis, group):
    zp = fmt.startswith("uint")
    cfg = QuantConfig(format=fmt, granularity="group", axis=axis, group_size=group, zero_point=zp)
    return quantize(x, cfg).pack(axis=3, word_bits=32)


@pytest.mark.parametrize("interpret", MODES)
@settings(max_examples=FEW)
@given(
    k_fmt=st.sampled_from(["uint4", "uint2", "int4", "nf4"]),
    v_fmt=st.sampled_from(["uint4", "uint2", "int3"]),
    rep=st.sampled_from([1, 4]),
    D=st.sampled_from([32, 64]),
    T=st.sampled_from([64, 128]),
    Gv=st.sampled_from([32, None]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kv_decode_matches_reference(interpret, k_fmt, v_fmt, rep, D, T, Gv, dtype, seed):
    B, Hkv, Gk = 2, 2, 32
    Gv = Gv or D
    kq_, kk, kv_, kl = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq_, (B, Hkv * rep, D), jnp.float32).astype(dtype)
    kc = _cache(jax.random.normal(kk, (B, Hkv, T, D), jnp.float32), k_fmt, 2, Gk)
    vc = _cache(jax.random.normal(kv_, (B, Hkv, T, D), jnp.float32), v_fmt, 3, Gv)
    lengths = jax.random.randint(kl, (B,), 1, T + 1, jnp.int32)
    args = (q, kc.codes, kc.scale, kc.zero, vc.codes, vc.scale, vc.zero, lengths)
    kw = dict(k_fmt=kc.format, v_fmt=vc.format)
    o = kv_decode(*args, **kw, interpret=interpret)
    o_ref = kv_decode_reference(*args, **kw)
    assert o.shape == q.shape and o.dtype == dtype
    # the bound, in float64 from the dequantized cache
    K = np.asarray(dequantize_cache(kc.codes, kc.scale, kc.zero, kc.format, (Gk, 1)), np.float64)
    V = np.asarray(dequantize_cache(vc.codes, vc.scale, vc.zero, vc.format, (1, Gv)), np.float64)
    qg = np.asarray(q.astype(jnp.float32), np.float64).reshape(B, Hkv, rep, D)
    sm = 1 / math.sqrt(D)
    s = np.einsum("bhrd,bhtd->bhrt", qg, K) * sm
    ds = 2 * _gamma(D) * np.einsum("bhrd,bhtd->bhrt", np.abs(qg), np.abs(K)) * sm
    valid = (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    s = np.where(valid, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    eps = np.where(valid, ds, 0).max(-1, keepdims=True) + (T // Gk + 2) * 5 * U
    bound = (
        (2 * eps + 4 * _gamma(T))
        * np.einsum("bhrt,bhtd->bhrd", p, np.abs(V))
        / p.sum(-1, keepdims=True)
    )
    bound = bound.reshape(B, Hkv * rep, D)
    o64, r64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (o, o_ref))
    if dtype == jnp.bfloat16:  # both rounded to bf16 at the end: u_out = 2^-8 each
        bound = bound + 2 * 2.0**-8 * (np.abs(r64) + bound)
    assert np.all(np.abs(o64 - r64) <= bound), np.max(np.abs(o64 - r64) - bound)


@pytest.mark.parametrize("interpret", MODES)
def test_qarray_kv_decode_and_full_length_default(interpret):
    """QArray front end (unpacked caches are packed here); ``lengths=None`` = whole cache,
    which must equal passing ``lengths = T`` exactly."""
    B, Hkv, T, D = 1, 2, 64, 32
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k1, (B, 2 * Hkv, D), jnp.float32)
    cfg_k = QuantConfig(format="uint4", granularity="group", axis=2, group_size=32, zero_point=True)
    cfg_v = QuantConfig(format="uint4", granularity="group", axis=3, group_size=32, zero_point=True)
    kq = quantize(jax.random.normal(k2, (B, Hkv, T, D), jnp.float32), cfg_k)
    vq = quantize(jax.random.normal(k3, (B, Hkv, T, D), jnp.float32), cfg_v)
    o_all = qarray_kv_decode(q, kq, vq, interpret=interpret)
    o_T = qarray_kv_decode(q, kq, vq, jnp.asarray([T], jnp.int32), interpret=interpret)
    np.testing.assert_array_equal(np.asarray(o_all), np.asarray(o_T))
    kp, vp = kq.pack(axis=3, word_bits=32), vq.pack(axis=3, word_bits=32)
    args = (q, kp.codes, kp.scale, kp.zero, vp.codes, vp.scale, vp.zero)
    o_fields = kv_decode(*args, k_fmt="uint4", v_fmt="uint4", interpret=interpret)
    np.testing.assert_array_equal(np.asarray(o_all), np.asarray(o_fields))


def test_kv_decode_rejects_bad_input():
    B, H, T, D = 1, 2, 64, 32
    kp = jnp.zeros((B, H, T, D * 4 // 32), jnp.uint32)
    ks, vs = jnp.ones((B, H, T // 32, D)), jnp.ones((B, H, T, 1))
    q = jnp.zeros((B, 4, D), jnp.float32)
    ok = dict(k_fmt="uint4", v_fmt="uint4", interpret=True)

    def call(**ch):
        a = dict(q=q, kp=kp, ks=ks, kz=None, vp=kp, vs=vs, vz=None, lengths=None) | ch
        kw = dict(ok) | {k: a.pop(k) for k in ("k_fmt", "v_fmt") if k in a}
        return kv_decode(*a.values(), **kw)

    for change, match in [
        (dict(q=q.astype(jnp.int32)), "q must be"),
        (dict(q=jnp.zeros((B, 3, D))), "not a multiple of 2 KV heads"),
        (dict(k_fmt="uint5"), "unsupported bit-width 5"),
        (dict(kp=kp.astype(jnp.uint8)), "k_packed must be uint32"),
        (dict(vp=jnp.zeros((B, H, T, 8), jnp.uint32)), "does not hold"),
        (dict(ks=jnp.ones((B, H, 8, D))), "key group Gk=8"),
        (dict(ks=jnp.ones((B, H, 3, D))), "do not divide T"),
        (dict(vs=jnp.ones((B, H, T, 3))), "v_scale must be"),
        (dict(kz=jnp.ones((B, H, 1, D))), "k_zero shape"),
        (dict(lengths=jnp.asarray([0], jnp.int32)), "lengths must lie in"),
        (dict(lengths=jnp.asarray([65], jnp.int32)), "lengths must lie in"),
        (dict(lengths=jnp.asarray([1.0])), "int array"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(**change)


def test_kv_decode_lowers_to_triton_without_a_gpu():
    B, H, T, D = 1, 2, 256, 128
    kp = jnp.zeros((B, H, T, D * 4 // 32), jnp.uint32)
    vp = jnp.zeros((B, H, T, D * 2 // 32), jnp.uint32)
    ks, vs = jnp.ones((B, H, T // 64, D)), jnp.ones((B, H, T, D // 32))
    q = jnp.zeros((B, 8, D), jnp.bfloat16)
    lengths = jnp.asarray([100], jnp.int32)

    def f(q, kp, ks, vp, vs, lengths):
        return kv_decode(q, kp, ks, ks, vp, vs, vs, lengths, k_fmt="uint4", v_fmt="uint2")

    text = jax.jit(f).trace(q, kp, ks, vp, vs, lengths).lower(lowering_platforms=("cuda",))
    assert "triton" in text.as_text()


# --- per-row LSE, token ranges, merging, FlashDecoding++'s unified maximum -------------------
# Tolerances: the kernel and the float64 reference below see the same dequantized cache; the
# logits differ by ≤ 2γ_D·|q||k̂|·sm_scale (~1e-6 here, |q|,|k̂| = O(√D)) and the softmax sums
# by (T/Gk + 2)·5u relative, so an LSE is within ~1e-5 absolute and an output within 1e-5 of
# max|V̂| (the test of the outputs above carries the full bound); a wrong range or a dropped
# block moves the LSE by ≥ log(1 + 1/T) ≈ 8e-3 for T = 128.

TOL = 1e-5


def _setup(seed, *, rep=4, T=128, D=32, B=2, Hkv=2, q_scale=None):
    kq_, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq_, (B, Hkv * rep, D), jnp.float32)
    if q_scale is not None:
        q = q * jnp.asarray(q_scale, jnp.float32)[None, :, None]
    kc = _cache(jax.random.normal(kk, (B, Hkv, T, D), jnp.float32), "uint4", 2, 32)
    vc = _cache(jax.random.normal(kv_, (B, Hkv, T, D), jnp.float32), "uint2", 3, 32)
    args = (q, kc.codes, kc.scale, kc.zero, vc.codes, vc.scale, vc.zero)
    K = np.asarray(dequantize_cache(kc.codes, kc.scale, kc.zero, kc.format, (32, 1)), np.float64)
    V = np.asarray(dequantize_cache(vc.codes, vc.scale, vc.zero, vc.format, (1, 32)), np.float64)
    qg = np.asarray(q, np.float64).reshape(B, Hkv, rep, D)
    s = np.einsum("bhrd,bhtd->bhrt", qg, K) / math.sqrt(D)
    return args, dict(k_fmt=kc.format, v_fmt=vc.format), s, V


def _exact64(s, V, starts, lengths):
    """float64 (o, lse, row max) over ``starts ≤ t < lengths``; empty rows: 0, −inf, −inf."""
    B, Hkv, rep, T = s.shape
    t = np.arange(T)
    ok = (t[None] >= np.asarray(starts)[:, None]) & (t[None] < np.asarray(lengths)[:, None])
    s = np.where(ok[:, None, None], s, -np.inf)
    m = s.max(-1)
    ms = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - ms[..., None])
    l = e.sum(-1)
    o = np.einsum("bhrt,bhtd->bhrd", e, V) / np.where(l > 0, l, 1)[..., None]
    lse = np.where(l > 0, ms + np.log(np.where(l > 0, l, 1)), -np.inf)
    return o.reshape(B, Hkv * rep, -1), lse.reshape(B, -1), m.reshape(B, -1)


@pytest.mark.parametrize("interpret", MODES)
def test_lse_and_token_ranges(interpret):
    args, kw, s, V = _setup(3)
    starts = jnp.asarray([5, 70], jnp.int32)
    lengths = jnp.asarray([100, 70], jnp.int32)  # the second range is empty
    out = kv_decode(*args, lengths, **kw, starts=starts, return_lse=True, interpret=interpret)
    ref = kv_decode_reference(*args, lengths, **kw, starts=starts, return_lse=True)
    o64, lse64, _ = _exact64(s, V, starts, lengths)
    for got in (out, ref):
        o, lse = np.asarray(got.o, np.float64), np.asarray(got.lse, np.float64)
        assert np.isneginf(lse[1]).all() and (o[1] == 0).all()
        np.testing.assert_allclose(lse[0], lse64[0], rtol=0, atol=TOL)
        assert np.abs(o[0] - o64[0]).max() <= TOL * np.abs(V).max()
        assert not np.asarray(got.fallback).any()
    # without the options the call is the old one, bit for bit
    o_plain = kv_decode(*args, jnp.asarray([100, 7], jnp.int32), **kw, interpret=interpret)
    o_opts = kv_decode(*args, jnp.asarray([100, 7], jnp.int32), **kw, interpret=interpret,
                       starts=jnp.zeros(2, jnp.int32), return_lse=True).o  # fmt: skip
    np.testing.assert_array_equal(np.asarray(o_plain), np.asarray(o_opts))


@pytest.mark.parametrize("interpret", MODES)
def test_merge_partials_of_a_split_range(interpret):
    """Attention over [0, L) = the LSE merge of [0, a) and [a, L) (a mid-block)."""
    args, kw, s, V = _setup(4)
    L, a = jnp.asarray([128, 90], jnp.int32), jnp.asarray([45, 33], jnp.int32)
    zero = jnp.zeros(2, jnp.int32)
    whole = kv_decode(*args, L, **kw, return_lse=True, interpret=interpret)
    p1 = kv_decode(*args, a, **kw, starts=zero, return_lse=True, interpret=interpret)
    p2 = kv_decode(*args, L, **kw, starts=a, return_lse=True, interpret=interpret)
    o, lse = merge_partials([p1, p2])
    np.testing.assert_allclose(np.asarray(lse), np.asarray(whole.lse), rtol=0, atol=TOL)
    assert np.abs(np.asarray(o) - np.asarray(whole.o)).max() <= TOL * np.abs(V).max()
    # an empty part changes nothing
    empty = kv_decode(*args, a, **kw, starts=a, return_lse=True, interpret=interpret)
    o3, lse3 = merge_partials([whole, empty])
    np.testing.assert_array_equal(np.asarray(o3), np.asarray(whole.o.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(lse3), np.asarray(whole.lse))


@pytest.mark.parametrize("interpret", MODES)
def test_unified_max_equals_exact_in_range(interpret):
    args, kw, s, V = _setup(5)
    L = jnp.asarray([128, 77], jnp.int32)
    o64, lse64, m64 = _exact64(s, V, np.zeros(2), L)
    phi = float(np.median(m64))  # every |m − φ| is a few units: far inside F32_SAFE
    for fn, extra in ((kv_decode, dict(interpret=interpret)), (kv_decode_reference, {})):
        got = fn(*args, L, **kw, return_lse=True, phi=phi, **extra)
        assert not np.asarray(got.fallback).any()
        np.testing.assert_allclose(np.asarray(got.lse), lse64, rtol=0, atol=TOL)
        assert np.abs(np.asarray(got.o, np.float64) - o64).max() <= TOL * np.abs(V).max()


@pytest.mark.parametrize("interpret", MODES)
def test_unified_max_fallback_triggers_exactly_when_out_of_range(interpret):
    """Rows whose largest logit leaves ``φ + [a, b]`` fall back, the others do not; both give
    the exact softmax. Query rows are scaled apart so their maxima spread over ~30 units."""
    rows = np.linspace(0.3, 6.0, 8)
    args, kw, s, V = _setup(6, q_scale=rows)
    L = jnp.asarray([128, 100], jnp.int32)
    o64, lse64, m64 = _exact64(s, V, np.zeros(2), L)
    a, b = F16_SAFE
    ms = np.sort(m64.ravel())
    k = len(ms) // 2
    phi = float((ms[k - 1] + ms[k]) / 2 - b)  # the upper half overflows fp16's exp range
    d = m64 - phi
    want = (d > b) | (d < a)
    assert want.any() and not want.all()
    assert np.min(np.abs(np.concatenate([d - b, d - a]))) > 1e-3  # no row on an edge
    for fn, extra in ((kv_decode, dict(interpret=interpret)), (kv_decode_reference, {})):
        got = fn(*args, L, **kw, return_lse=True, phi=phi, safe=F16_SAFE, **extra)
        np.testing.assert_array_equal(np.asarray(got.fallback), want)
        np.testing.assert_allclose(np.asarray(got.lse), lse64, rtol=0, atol=TOL)
        assert np.abs(np.asarray(got.o, np.float64) - o64).max() <= TOL * np.abs(V).max()
    # far out of float32's range: without the fallback exp(s − φ) is inf (NaN outputs)
    phi = float(ms[0] - 100.0)
    got = kv_decode(*args, L, **kw, return_lse=True, phi=phi, interpret=interpret)
    assert np.asarray(got.fallback).all()
    assert np.abs(np.asarray(got.o, np.float64) - o64).max() <= TOL * np.abs(V).max()
    d = np.asarray(needs_fallback(jnp.asarray(m64, jnp.float32), phi))
    assert d.all()


def test_options_reject_bad_input():
    args, kw, _, _ = _setup(7)
    L = jnp.asarray([64, 64], jnp.int32)
    with pytest.raises(ValueError, match="phi must be one finite"):
        kv_decode(*args, L, **kw, phi=float("nan"), interpret=True)
    with pytest.raises(ValueError, match="safe range"):
        kv_decode(*args, L, **kw, phi=0.0, safe=(0.0, 5.0), interpret=True)
    with pytest.raises(ValueError, match="needs return_lse"):
        kv_decode(*args, L, **kw, starts=L, interpret=True)
    with pytest.raises(ValueError, match="starts must lie in"):
        kv_decode(*args, L, **kw, starts=jnp.asarray([-1, 0], jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="lengths must lie in \\[0"):
        kv_decode(*args, jnp.asarray([-1, 3], jnp.int32), **kw, return_lse=True, interpret=True)


def test_kv_decode_options_lower_to_triton_without_a_gpu():
    """The LSE / range / unified-maximum variant (with its fallback ``cond``) lowers too."""
    B, H, T, D = 1, 2, 256, 64
    kp = jnp.zeros((B, H, T, D * 2 // 32), jnp.uint32)
    ks, vs = jnp.ones((B, H, T // 32, D)), jnp.ones((B, H, T, D // 32))
    q = jnp.zeros((B, 6, D), jnp.float32)

    def f(q, kp, ks, vs, starts, lengths):
        return kv_decode(q, kp, ks, ks, kp, vs, vs, lengths, k_fmt="uint2", v_fmt="uint2",
                         starts=starts, return_lse=True, phi=1.5)  # fmt: skip

    n = jnp.asarray([100], jnp.int32)
    text = jax.jit(f).trace(q, kp, ks, vs, n // 2, n).lower(lowering_platforms=("cuda",))
    assert "triton" in text.as_text()
