"""SpQR (arXiv 2306.03078): the compiled loop against a plain per-column reference, exact
outliers, bits by hand, outliers lowering the output error, storage invariants, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.model import Model, ModelConfig, init_params
from methods import get_method
from methods.base import LayerStats
from methods.spqr import SpQRConfig, quantize_layer, quantize_model, spqr_quantize, to_qarray
from numerics.config import rtn
from numerics.quantize import quantize
from numerics.sparse import DenseSparse, weight_bits

M, N, NX = 32, 96, 512


def _layer(seed: int = 0):
    """Heavy-tailed W (Student t, 4 dof) and a Hessian of correlated inputs."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    W = jax.random.t(k1, 4.0, (M, N)) * 0.05
    A = jax.random.normal(k2, (N, N)) / np.sqrt(N) + jnp.eye(N)
    X = jax.random.normal(k3, (NX, N)) @ A
    return W, X, (2.0 / NX) * X.T @ X


def _out_err(W, What, X) -> float:
    return float(jnp.sum(jnp.square((W - What) @ X.T)))


# ----------------------------------------------------------------------------- reference


def _fit(x, maxq):
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    flat = hi <= lo
    lo, hi = np.where(flat, -1, lo), np.where(flat, 1, hi)
    s = (hi - lo) / maxq
    return s, np.round(-lo / s)


def _qdq(x, s, z, maxq):
    q = np.clip(np.round(x / np.maximum(s, 1e-9) + z), 0, maxq)
    return q, (q - z) * s


def _reference(W, H, cfg: SpQRConfig):
    """Algorithm 1 written plainly in float64: one column at a time, OBS update of every later
    column at once (no lazy blocks), leave-one-out by explicit loops."""
    W, H = np.array(W, np.float64), np.array(H, np.float64)
    m, n = W.shape
    maxq, b1 = 2**cfg.bits - 1, cfg.beta1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + cfg.percdamp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    tau = cfg.outlier_threshold * np.mean(W.var(0, ddof=1) / np.diag(U) ** 2)
    codes, outl = np.zeros((m, n), np.uint8), np.zeros((m, n), bool)
    for g in range(n // b1):
        cols = slice(g * b1, (g + 1) * b1)
        Wg, d = W[:, cols].copy(), np.diag(U)[cols]
        if np.isfinite(tau):
            _, deq = _qdq(Wg, *(a[:, None] for a in _fit(Wg, maxq)), maxq)
            base = (((deq - Wg) / d) ** 2).sum(1)
            drop = np.zeros_like(Wg)
            for i in range(b1):
                o = [j for j in range(b1) if j != i]
                _, deq = _qdq(Wg[:, o], *(a[:, None] for a in _fit(Wg[:, o], maxq)), maxq)
                drop[:, i] = base - (((deq - Wg[:, o]) / d[o]) ** 2).sum(1)
            keep = drop <= tau
            mean = (Wg * keep).sum(1) / np.maximum(keep.sum(1), 1)
            Wg = np.where(keep, Wg, mean[:, None])
        s, z = _fit(Wg, maxq)
        S = s.reshape(-1, cfg.beta2)
        lo, hi, mq2 = S.min(1), S.max(1), 2**cfg.scale_bits - 1
        s2 = (
            np.maximum(np.maximum((hi - lo) / mq2, hi / 512), 2.0**-14)
            .astype(np.float16)
            .astype(np.float64)
        )
        z2 = (-lo / s2).astype(np.float16).astype(np.float64)
        c = np.clip(np.round(S / s2[:, None] + z2[:, None]), 0, mq2)
        s_hat = ((c - z2[:, None]) * s2[:, None]).reshape(-1)
        for j in range(g * b1, (g + 1) * b1):
            w = W[:, j].copy()
            q, deq = _qdq(w, s_hat, z, maxq)
            o = ((w - deq) / U[j, j]) ** 2 > tau
            deq = np.where(o, w.astype(np.float16).astype(np.float64), deq)
            e = (w - deq) / U[j, j]
            W[:, j + 1 :] -= np.outer(e, U[j, j + 1 :])
            W[:, j] = deq
            codes[:, j], outl[:, j] = q, o
    return W, codes, outl


@pytest.mark.parametrize("threshold", [0.2, float("inf")])
def test_compiled_loop_matches_plain_reference(threshold):
    """Lazy blocks (3 of 32 columns; 1 of 96), groups, leave-one-out and outliers agree exactly
    with the unblocked float64 loop on a fixed layer."""
    W, _, H = _layer()
    cfg = SpQRConfig(outlier_threshold=threshold, block=32 if np.isfinite(threshold) else 128)
    r = spqr_quantize(W, H, cfg)
    W_ref, codes_ref, out_ref = _reference(W, H, cfg)
    np.testing.assert_array_equal(np.asarray(r.codes), codes_ref)
    np.testing.assert_array_equal(np.asarray(r.outlier), out_ref)
    np.testing.assert_allclose(np.asarray(r.W_hat), W_ref, rtol=0, atol=1e-6)
    if np.isfinite(threshold):
        assert 0 < out_ref.sum() < 0.1 * W.size  # the comparison covers outliers


def test_block_size_does_not_change_the_result():
    W, _, H = _layer(1)
    a = spqr_quantize(W, H, SpQRConfig(block=32))  # 3 blocks
    b = spqr_quantize(W, H, SpQRConfig(block=128))  # shrunk to 96: one block
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    np.testing.assert_array_equal(np.asarray(a.outlier), np.asarray(b.outlier))
    np.testing.assert_allclose(np.asarray(a.W_hat), np.asarray(b.W_hat), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- outliers, bits


def test_outliers_exact_and_excluded_from_group_statistics():
    """With H = I there is no error feedback, so every outlier is the fp16 of the original
    weight; planted outliers are caught and do not inflate their group's scale."""
    W = jax.random.normal(jax.random.key(3), (M, N)) * 0.1
    planted = [(0, 5), (7, 40), (20, 81), (31, 95)]
    for r, c in planted:
        W = W.at[r, c].set(3.0 if c % 2 else -3.0)
    res = quantize_layer(W, LayerStats(H=jnp.eye(N)), SpQRConfig())
    ds = res.weight
    assert isinstance(ds, DenseSparse)
    got = {(int(r), int(c)) for r, c in zip(ds.rows, ds.cols, strict=True)}
    assert set(planted) <= got
    Wf16 = np.asarray(W.astype(jnp.float16))
    np.testing.assert_array_equal(
        np.asarray(ds.values), Wf16[np.asarray(ds.rows), np.asarray(ds.cols)]
    )
    deq = np.asarray(ds.dequantize())
    np.testing.assert_array_equal(
        deq[np.asarray(ds.rows), np.asarray(ds.cols)],
        Wf16[np.asarray(ds.rows), np.asarray(ds.cols)],
    )
    s_hat = np.asarray(ds.dense.scale_array())  # [M, N / 16]
    for r, c in planted:  # fitted on N(0, 0.1²) weights, not on the ±3 outlier
        assert s_hat[r, c // 16] < 0.25 * 3.0 / (2**3 - 1)
    assert res.info["n_outliers"] == len(got)


def test_bits_per_weight_hand_count():
    W, _, H = _layer()
    cfg = SpQRConfig()
    res = quantize_layer(W, LayerStats(H=H), cfg)
    k = res.info["n_outliers"]
    G = N // 16
    hand = (
        M * N * 3  # codes
        + M * G * 3  # 3-bit zero points
        + M * G * 3  # 3-bit codes of the group scales
        + (M // 16) * G * (16 + 16)  # second level: fp16 scale + fp16 zero per 16 × 16 tile
        + 32 * k  # fp16 value + 16-bit index per outlier
    ) / (M * N)
    assert weight_bits(res.weight) == pytest.approx(hand, rel=1e-12)
    assert res.info["bits"] == pytest.approx(hand, rel=1e-12)
    # the reference repo's formula (main.py, round_zero=True):
    #   b + (b_s + b)/β₁ + 32/(β₁β₂) + 32·(outlier share)
    assert hand == pytest.approx(3 + 6 / 16 + 32 / 256 + 32 * k / (M * N), rel=1e-12)
    no_out = quantize_layer(
        W, LayerStats(H=H), dataclasses.replace(cfg, outlier_threshold=float("inf"))
    )
    assert weight_bits(no_out.weight) == pytest.approx(3.5)


def test_outliers_lower_the_output_error_and_gptq_style_beats_rtn():
    W, X, H = _layer(2)
    with_o = quantize_layer(W, LayerStats(H=H), SpQRConfig()).weight.dequantize()
    without = quantize_layer(W, LayerStats(H=H), SpQRConfig(outlier_threshold=float("inf")))
    rtn_q = quantize(W, rtn(3, group_size=16, sym=False, scale_dtype="float16")).dequantize()
    e_with, e_without, e_rtn = (
        _out_err(W, w, X) for w in (with_o, without.weight.dequantize(), rtn_q)
    )
    assert e_with < e_without < e_rtn


def test_storage_reproduces_the_loop_and_is_deterministic():
    W, _, H = _layer()
    cfg = SpQRConfig()
    r = spqr_quantize(W, H, cfg)
    qa = to_qarray(r, cfg)
    qa.check()
    keep = ~np.asarray(r.outlier)
    np.testing.assert_array_equal(np.asarray(qa.dequantize())[keep], np.asarray(r.W_hat)[keep])
    a = quantize_layer(W, LayerStats(H=H), cfg, key=jax.random.key(0)).weight
    b = quantize_layer(W, LayerStats(H=H), cfg, key=jax.random.key(1)).weight
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(r.W_hat))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@given(seed=st.integers(0, 2**16), log_scale=st.floats(-6, 2), dead=st.booleans())
def test_storage_invariants(seed, log_scale, dead):
    """Codes and statistics in range, integer zero points, positive scales, finite output —
    for any weight scale, with and without a dead input (zero row/column of H)."""
    W, _, H = _layer(seed % 7)
    W = W * jnp.float32(10.0**log_scale)
    if dead:
        H = H.at[3, :].set(0.0).at[:, 3].set(0.0)
    r = spqr_quantize(W, H, SpQRConfig())
    assert int(jnp.max(r.codes)) <= 7 and int(jnp.max(r.scale_codes)) <= 7
    z = np.asarray(r.zero)
    assert np.all((z >= 0) & (z <= 7) & (z == np.round(z)))
    qa = to_qarray(r, SpQRConfig())
    assert bool(jnp.all(qa.scale_array() > 0))
    assert bool(jnp.all(jnp.isfinite(r.W_hat)))
    if dead:
        assert bool(jnp.all(r.W_hat[:, 3] == 0))


# ----------------------------------------------------------------------------- input checks


def test_bad_input_rejected():
    W, _, H = _layer()
    cfg = SpQRConfig()
    with pytest.raises(ValueError, match="NaN"):
        quantize_layer(W.at[0, 0].set(jnp.nan), LayerStats(H=H), cfg)
    with pytest.raises(TypeError, match="float"):
        quantize_layer(jnp.ones((M, N), jnp.int32), LayerStats(H=H), cfg)
    with pytest.raises(ValueError, match="needs LayerStats.H"):
        quantize_layer(W, LayerStats(), cfg)
    with pytest.raises(ValueError, match="H has shape"):
        quantize_layer(W, LayerStats(H=H[:-1, :-1]), cfg)
    with pytest.raises(ValueError, match="beta1=16 does not divide"):
        quantize_layer(W[:, :40], LayerStats(H=H[:40, :40]), cfg)
    with pytest.raises(ValueError, match="beta2=16 does not divide"):
        quantize_layer(W[:24], LayerStats(H=H), cfg)
    with pytest.raises(ValueError, match="finite"):
        quantize_layer(W, LayerStats(H=H.at[1, 1].set(jnp.inf)), cfg)
    with pytest.raises(ValueError, match="bits=5"):
        SpQRConfig(bits=5)
    with pytest.raises(ValueError, match="multiple of beta1"):
        SpQRConfig(block=40)
    with pytest.raises(ValueError, match="outlier_threshold"):
        SpQRConfig(outlier_threshold=0.0)
    with pytest.raises(ValueError, match="percdamp"):
        SpQRConfig(percdamp=-1.0)
    with pytest.raises(ValueError, match="beta2"):
        SpQRConfig(beta2=1)


def test_degenerate_calibration():
    """Issue 21 item 5: an all-zero H (every input dead) used to give an all-zero weight, and a
    non-PSD H whose negative eigenvalue the large damping (λ = mean diag H) hides went through
    silently; partly dead inputs are zeroed and counted."""
    W, _, H = _layer()
    with pytest.raises(ValueError, match="calibration inputs of this layer are all zero"):
        quantize_layer(W, LayerStats(H=jnp.zeros_like(H)), SpQRConfig())
    mu, V = np.linalg.eigh(np.asarray(H, np.float64))
    bad = np.asarray(H) - (mu[0] + 0.05 * np.trace(np.asarray(H))) * np.outer(V[:, 0], V[:, 0])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        quantize_layer(W, LayerStats(H=jnp.asarray(bad, jnp.float32)), SpQRConfig())
    dead = H.at[:, [3, 50]].set(0.0).at[[3, 50], :].set(0.0)
    res = quantize_layer(W, LayerStats(H=dead), SpQRConfig())
    assert res.info["dead_inputs"] == 2
    np.testing.assert_array_equal(np.asarray(res.weight.dequantize())[:, [3, 50]], 0.0)
    assert quantize_layer(W, LayerStats(H=H), SpQRConfig()).info["dead_inputs"] == 0


# ----------------------------------------------------------------------------- model walk


def test_quantize_model_on_a_tiny_model():
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=32
    )
    params = init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    assert get_method("spqr").quantize_model is quantize_model
    qm = quantize_model(params, cfg, tokens, SpQRConfig())
    assert len(qm.report) == 7
    assert all(r["bits"] >= 3.5 for r in qm.report)
    assert all(r["dead_inputs"] == 0 for r in qm.report)  # the count reaches the walk's report
    assert qm.bits_per_weight == pytest.approx(np.mean([r["bits"] for r in qm.report]))
    logits = Model(cfg).forward(qm.params, tokens)
    assert bool(jnp.all(jnp.isfinite(logits)))
    ref = Model(cfg).forward(params, tokens)
    assert float(jnp.max(jnp.abs(logits - ref))) < float(jnp.max(jnp.abs(ref)))
