"""GPTQ (methods/gptq): agreement with a plain transcription of Algorithm 1, and its properties.

The oracle below is a direct float64 numpy transcription of arXiv 2210.17323 Algorithm 1 as
IST-DASLab/gptq ``fasterquant`` runs it (Python loops over blocks and columns), on lowbit's
grid (float16-rounded scales, narrow signed grid when symmetric). The compiled core runs in
float32 with a different summation order, so a weight that sits exactly on a rounding boundary
may round the other way: we allow at most 0.1% of codes to differ, by one step at most.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from methods.base import LayerStats, get_method
from methods.gptq import GPTQConfig, gptq, quantize_layer
from methods.gptq.core import inverse_hessian_factor
from numerics import second_order as so
from numerics.quantize import quantize

# ------------------------------------------------------------------------------ the oracle


def oracle(
    W,
    H,
    *,
    bits,
    group_size,
    sym,
    percdamp=0.01,
    block_size=128,
    act_order=False,
    static_groups=False,
):
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    rows, n = W.shape
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)

    def params(X):
        if sym:
            s = (np.abs(X).max(1) / qmax).astype(np.float16).astype(np.float64)
            s[s == 0] = 1
            return s, np.zeros_like(s)
        lo, hi = np.minimum(X.min(1), 0), np.maximum(X.max(1), 0)
        s = ((hi - lo) / (qmax - qmin)).astype(np.float16).astype(np.float64)
        s[s == 0] = 1
        return s, np.clip(qmin - np.round(lo / s), qmin, qmax)

    g = group_size or n
    if group_size is None:
        s_row, z_row = params(W)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [params(W[:, i : i + g]) for i in range(0, n, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H[np.arange(n), np.arange(n)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    C = np.zeros((rows, n))
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, E1 = W[:, i1:i2].copy(), np.zeros((rows, i2 - i1))
        for i in range(i2 - i1):
            j = i1 + i
            if group_size is None:
                s, z = s_row, z_row
            elif static_groups:
                s, z = groups[perm[j] // g]
            elif j % g == 0:
                s, z = params(W[:, j : j + g])  # the lazily updated W, as the reference
            w = W1[:, i]
            y = w / s if sym else np.round(w / s) + z
            c = np.clip(np.round(y), qmin, qmax)
            C[:, j] = c
            E1[:, i] = (w - (c - z) * s) / U[j, j]
            W1[:, i:] -= np.outer(E1[:, i], U[j, j:i2])
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return C[:, np.argsort(perm)]


def layer(seed=0, rows=48, n=256, N=1024, dead=(5,), outliers=4):
    """A layer with correlated inputs and a few outlier channels (like LLM activations)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, n)) @ (rng.normal(size=(n, n)) / np.sqrt(n)) + 0.3 * rng.normal(
        size=(N, n)
    )
    X[:, :outliers] *= 20.0
    X[:, list(dead)] = 0.0
    H = (2.0 / N) * X.T @ X
    W = rng.normal(size=(rows, n)) / np.sqrt(n)
    return W.astype(np.float32), H.astype(np.float32), X.astype(np.float32)


def signed(codes, bits):
    c = np.asarray(codes).astype(np.int64)
    return np.where(c >= 2 ** (bits - 1), c - 2**bits, c)


CASES = [
    dict(bits=3, group_size=32, sym=False),  # g < block: groups start inside blocks
    dict(bits=3, group_size=None, sym=True),  # per-channel, symmetric
    dict(bits=4, group_size=64, sym=False, act_order=True, static_groups=True),
    dict(bits=2, group_size=128, sym=False, block_size=32),  # g > block
    dict(bits=4, group_size=64, sym=True, static_groups=True),
    dict(bits=3, group_size=None, sym=False, act_order=True, block_size=48),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_algorithm_1(kw):
    W, H, _ = layer()
    C = np.asarray(gptq(jnp.asarray(W), jnp.asarray(H), GPTQConfig(**kw))[0])
    C = signed(C, kw["bits"]) if kw["sym"] else C.astype(np.int64)
    ref = oracle(W, H, **kw)
    diff = np.abs(C - ref)
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, (diff.max(), np.mean(diff > 0))


def test_padding_to_whole_blocks_matches_a_short_last_block():
    W, H, _ = layer(n=192)  # 192 = 128 + a last block of 64 (padded inside the core)
    kw = dict(bits=3, group_size=64, sym=False)
    C = np.asarray(gptq(jnp.asarray(W), jnp.asarray(H), GPTQConfig(**kw))[0]).astype(np.int64)
    diff = np.abs(C - oracle(W, H, **kw))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3


RAGGED = [
    dict(bits=3, group_size=64, sym=False),  # 200 = 3 × 64 + a last group of 8
    dict(bits=3, group_size=128, sym=False, block_size=32),  # g > block: the last group spans 2
    dict(bits=4, group_size=64, sym=True, act_order=True, static_groups=True),
]


@pytest.mark.parametrize("kw", RAGGED, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_ragged_last_group_matches_algorithm_1(kw):
    """The reference slices ``W[:, i:i+g]``: at the last columns that is a shorter group."""
    W, H, _ = layer(n=200)
    cfg = GPTQConfig(**kw, ragged=True)
    C = np.asarray(gptq(jnp.asarray(W), jnp.asarray(H), cfg)[0])
    C = signed(C, kw["bits"]) if kw["sym"] else C.astype(np.int64)
    diff = np.abs(C - oracle(W, H, **kw))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, (diff.max(), np.mean(diff > 0))
    res = quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), cfg)
    g = kw["group_size"]
    assert res.weight.nb == (48, -(-200 // g)) and res.weight.shape == (48, 200)
    res.weight.check()
    with pytest.raises(ValueError, match="ragged=True"):
        quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), GPTQConfig(**kw))


def test_qarray_is_exactly_gptqs_choice():
    W, H, _ = layer()
    cfg = GPTQConfig(bits=3, group_size=32)
    res = quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), cfg)
    qa = res.weight
    qa.check()
    C, S, Z, loss = gptq(jnp.asarray(W), jnp.asarray(H), cfg)
    assert qa.scale.dtype == jnp.float16 and qa.codes.dtype == jnp.uint8
    assert qa.block_shape == (1, 32) and qa.shape == W.shape
    np.testing.assert_array_equal(np.asarray(qa.codes), np.asarray(C))
    np.testing.assert_array_equal(np.asarray(qa.scale, np.float32), np.asarray(S))  # fp16-exact
    Q = (np.asarray(C, np.float32) - np.repeat(np.asarray(Z), 32, 1)) * np.repeat(
        np.asarray(S), 32, 1
    )
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), Q)
    assert float(res.info["loss"]) == float(loss) > 0


def test_dead_inputs_give_zero_weights():
    W, H, _ = layer(dead=(3, 77, 200))
    qa = quantize_layer(
        jnp.asarray(W), LayerStats(H=jnp.asarray(H)), GPTQConfig(bits=3, group_size=32)
    ).weight
    Wq = np.asarray(qa.dequantize())
    assert np.all(np.isfinite(Wq))
    np.testing.assert_array_equal(Wq[:, [3, 77, 200]], 0.0)
    res = quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), GPTQConfig(bits=3))
    assert res.info["dead_inputs"] == 3  # the reference's fallback, counted


def with_eigenvalue(H, lam):
    """``H`` with its smallest eigenvalue moved to ``lam`` (same eigenvector)."""
    mu, V = np.linalg.eigh(np.asarray(H, np.float64))
    return (H + (lam - mu[0]) * np.outer(V[:, 0], V[:, 0])).astype(np.float32)


def test_degenerate_calibration_is_an_error():
    """Issue 21 item 5: H = 0 used to give an all-zero weight silently, a non-PSD H a NaN loss."""
    W, H, _ = layer(n=64, rows=16, dead=())
    cfg = GPTQConfig(bits=4, group_size=32)
    run = lambda H, cfg=cfg: quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), cfg)
    with pytest.raises(ValueError, match="calibration inputs of this layer are all zero"):
        run(np.zeros_like(H))
    tr = float(np.trace(H))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        run(with_eigenvalue(H, -0.05 * tr))
    # a negative eigenvalue too small to be called non-PSD but beyond a tiny damping: NaN factor
    mild = with_eigenvalue(H, -0.5 * so.PSD_RTOL * tr)
    with pytest.raises(ValueError, match="even after damping"):
        run(mild, GPTQConfig(bits=4, group_size=32, percdamp=1e-6))
    # … which the default damping (λ = 0.01 · mean diag H > its size here) absorbs
    assert np.all(np.isfinite(np.asarray(run(mild).weight.dequantize())))
    assert run(H).info["dead_inputs"] == 0


def test_inverse_hessian_factor():
    _, H, _ = layer()
    U = np.asarray(
        inverse_hessian_factor(jnp.asarray(H) + jnp.eye(256, dtype=jnp.float32), 0.01), np.float64
    )
    assert np.all(np.tril(U, -1) == 0)
    Hd = H.astype(np.float64) + np.eye(256)
    Hd += 0.01 * np.mean(np.diag(Hd)) * np.eye(256)
    np.testing.assert_allclose(U.T @ U @ Hd, np.eye(256), atol=2e-3)


@settings(max_examples=12)  # each example is a full GPTQ + RTN run
@given(seed=st.integers(0, 2**16), kw=st.sampled_from([CASES[0], CASES[1]]))
def test_output_error_below_rtn_weight_error_above(seed, kw):
    """qwix's GPTQ property: RTN has the smaller ‖W − Ŵ‖, GPTQ the smaller ‖WX − ŴX‖."""
    W, H, X = layer(seed=seed, N=512)
    cfg = GPTQConfig(**kw)
    Wg = np.asarray(
        quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), cfg).weight.dequantize()
    )
    Wr = np.asarray(quantize(jnp.asarray(W), cfg.quant_config()).dequantize())
    out = lambda Wh: np.linalg.norm((W - Wh) @ X.T)
    assert out(Wg) < out(Wr)
    assert np.linalg.norm(W - Wr) <= np.linalg.norm(W - Wg)


def test_act_order_is_permutation_equivariant():
    """With act-order the processing order comes from diag H, so relabelling the inputs
    (W's columns and H's rows/columns together) relabels the result."""
    W, H, _ = layer(dead=())
    p = np.random.default_rng(1).permutation(W.shape[1])
    cfg = GPTQConfig(**CASES[5])  # per-channel, act-order
    C1 = np.asarray(gptq(jnp.asarray(W), jnp.asarray(H), cfg)[0]).astype(np.int64)
    C2 = np.asarray(gptq(jnp.asarray(W[:, p]), jnp.asarray(H[p][:, p]), cfg)[0]).astype(np.int64)
    assert np.mean(C1[:, p] != C2) <= 1e-3


@pytest.mark.parametrize("mse_clip", [False, True])
def test_static_group_parameters_are_rtns(mse_clip):
    """Static groups are chosen before any update: the same scales/zeros as RTN (mse or not)."""
    W, H, _ = layer(dead=())
    cfg = GPTQConfig(bits=3, group_size=32, static_groups=True, mse_clip=mse_clip)
    qa = quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), cfg).weight
    rtn = quantize(jnp.asarray(W), cfg.quant_config())
    np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(rtn.scale))
    np.testing.assert_array_equal(np.asarray(qa.zero), np.asarray(rtn.zero))


def test_lazy_batches_do_not_change_the_result():
    """Block size only reorders the (exact-arithmetic identical) updates (per-channel grid)."""
    W, H, _ = layer()
    cs = [
        np.asarray(gptq(jnp.asarray(W), jnp.asarray(H), GPTQConfig(**CASES[1], block_size=b))[0])
        for b in (16, 128)
    ]
    assert np.mean(cs[0] != cs[1]) <= 1e-3


def test_dtype_kept_and_registered():
    W, H, _ = layer()
    qa = quantize_layer(
        jnp.asarray(W, jnp.bfloat16), LayerStats(H=jnp.asarray(H)), GPTQConfig(**CASES[0])
    ).weight
    assert qa.dequantize().dtype == jnp.bfloat16
    m = get_method("gptq")
    assert m.config is GPTQConfig and m.needs == ("H",) and m.beats_rtn


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(bits=5), "bits"),
        (dict(bits=1, sym=True), "bits"),
        (dict(percdamp=0.0), "percdamp"),
        (dict(block_size=0), "block_size"),
        (dict(group_size=48, block_size=128), "divide"),
        (dict(group_size=0), "group_size"),
        (dict(act_order=True, group_size=64), "static_groups"),
        (dict(ragged=True, mse_clip=True), "min-max"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GPTQConfig(**kw)


def test_bad_input():
    W, H, _ = layer(n=64, rows=16)
    cfg = GPTQConfig(bits=4, group_size=32)
    with pytest.raises(ValueError, match="H"):
        quantize_layer(jnp.asarray(W), LayerStats(), cfg)
    with pytest.raises(ValueError, match="shape"):
        quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H[:32, :32])), cfg)
    with pytest.raises(ValueError, match="NaN"):
        quantize_layer(jnp.asarray(W).at[0, 0].set(jnp.nan), LayerStats(H=jnp.asarray(H)), cfg)
    with pytest.raises(ValueError, match="NaN"):
        quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H).at[1, 1].set(jnp.inf)), cfg)
    with pytest.raises(ValueError, match="divide"):
        quantize_layer(jnp.asarray(W[:, :48]), LayerStats(H=jnp.asarray(H[:48, :48])), cfg)
    with pytest.raises(TypeError, match="floating"):
        quantize_layer(jnp.asarray(W).astype(jnp.int32), LayerStats(H=jnp.asarray(H)), cfg)
    with pytest.raises(TypeError, match="GPTQConfig"):
        quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), object())


def test_jit_whole_layer():
    W, H, _ = layer()
    cfg = GPTQConfig(**CASES[0])
    f = jax.jit(lambda W, H: quantize_layer(W, LayerStats(H=H), cfg).weight)
    a = f(jnp.asarray(W), jnp.asarray(H))
    b = quantize_layer(jnp.asarray(W), LayerStats(H=jnp.asarray(H)), cfg).weight
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
