"""RotateKV: decoding = scoring, the codec's invariants (rotation and order exact, error in the
rotated basis = error in the model's basis, sinks exact), rotation helps on outlier channels,
bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.decode import Decoder
from harness.model import Model, ModelConfig, init_params
from methods.base import get_method
from methods.rotatekv import (
    RotatedCodec,
    RotateKVConfig,
    RotateKVPlainConfig,
    channel_order,
    clipped_quantize,
    key_orders,
    kv_quant,
    quantize_model,
    rotate,
)
from methods.rotatekv.core import unrotate

# GQA (4 query heads on 2 KV heads), two layers, head_dim 16: the rotation spans 2 heads (32).
CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=64)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    params = init_params(CFG, 0)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, CFG.vocab_size, size=(4, 32)).astype(np.int32)
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 24)).astype(np.int32)
    return params, calib, tokens


@pytest.fixture(scope="module")
def result(tiny):
    params, calib, _ = tiny
    return quantize_model(params, CFG, calib, RotateKVConfig())


def test_decoding_equals_scoring(tiny, result):
    """Prefill 9 tokens, then step the other 15: every step's logits = scoring the sequence."""
    params, _, tokens = tiny
    model = Model(CFG, result.hooks)
    full = np.asarray(model.forward(params, tokens))
    dec = Decoder(model, capacity=32)
    P = 9
    logits, state = dec.prefill(params, tokens[:, :P])
    np.testing.assert_allclose(np.asarray(logits), full[:, :P], atol=1e-4, rtol=1e-4)
    for t in range(P, tokens.shape[1]):
        step, state = dec.step(params, state, tokens[:, t])
        np.testing.assert_allclose(
            np.asarray(step).reshape(full[:, t].shape), full[:, t], atol=1e-4, rtol=1e-4
        )


def test_result_is_the_paper_configuration(result):
    kvq = result.hooks.kv_quant
    assert kvq.pre_rope and kvq.sink == 1
    assert kvq.key.span == CFG.n_kv_heads * CFG.head_dim  # all KV heads rotated together
    assert kvq.value.span == CFG.head_dim and not kvq.value.order  # values: per-head H only
    assert len(kvq.key.order) == CFG.n_layers
    assert kvq.key.rho == kvq.value.rho == 0.8 and kvq.key.bits == 2
    assert all(w == 0 and f == 1 for w, f in ((c.window, c.flush) for c in (kvq.key, kvq.value)))
    # codes + fp16 scale and zero per head of 16; the sink token at 16 bits; reported at the
    # context min(2048, max_seq_len) = 64
    assert kvq.key.element_bits(16) == kvq.value.element_bits(16) == 2 + 32 / 16
    assert result.kv_bits == pytest.approx((63 * (2 + 32 / 16) + 16) / 64)


def test_rotation_and_order_are_exact():
    x = jax.random.normal(jax.random.key(0), (2, 3, 96))
    for span in (32, 96):  # 2^5 (Sylvester) and 3·32 (Q_12 ⊗ H_8, not symmetric)
        y = rotate(x, span)
        np.testing.assert_allclose(np.asarray(unrotate(y, span)), np.asarray(x), atol=1e-5)
        np.testing.assert_allclose(  # orthonormal: norms kept
            np.linalg.norm(np.asarray(y), axis=-1),
            np.linalg.norm(np.asarray(x), axis=-1),
            rtol=1e-5,
        )
    order = channel_order(jnp.asarray([3.0, -1.0, 2.0, 0.0]))
    assert order == (1, 3, 2, 0)


def test_codec_error_is_the_rotated_basis_error():
    """Rotation and order are orthogonal: the read's error in the model's basis equals the
    quantization error of the stored (rotated, permuted) vector, token by token."""
    x = jax.random.normal(jax.random.key(1), (2, 1, 2, 16)) * jnp.arange(
        1, 33, dtype=jnp.float32
    ).reshape(1, 1, 2, 16)
    order = tuple(int(i) for i in np.random.default_rng(0).permutation(32))
    codec = RotatedCodec(bits=2, group=16, rho=0.8, span=32, order=(order,))
    code = codec.encode(0, x)
    assert code.codes.dtype == jnp.uint8 and int(code.codes.max()) <= 3
    assert code.scale.dtype == jnp.float16 and code.scale.shape == (2, 1, 2, 1)
    x_hat = codec.decode(0, code)
    assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32
    y = rotate(x.reshape(2, 1, 32), 32)[..., np.asarray(order)].reshape(x.shape)
    y_err = np.linalg.norm(np.asarray(code.dequantize() - y).reshape(2, -1), axis=-1)
    x_err = np.linalg.norm(np.asarray(x_hat - x).reshape(2, -1), axis=-1)
    np.testing.assert_allclose(x_err, y_err, rtol=1e-4)


def test_clip_saturates_and_full_range_is_within_half_a_step():
    x = jax.random.normal(jax.random.key(2), (1, 4, 1, 16))
    full = clipped_quantize(x, 4, 16, 1.0)
    s = np.asarray(full.scale, np.float32)
    assert np.all(np.abs(np.asarray(full.dequantize() - x)) <= s * 0.5 + 1e-6)
    q = clipped_quantize(x, 2, 16, 0.8)
    s = np.asarray(q.scale, np.float32)
    hi = 0.8 * np.max(np.asarray(x), axis=-1, keepdims=True)
    lo = 0.8 * np.min(np.asarray(x), axis=-1, keepdims=True)
    # the range is [ρ·min, ρ·max]; the integer zero point shifts the grid by at most s/2
    assert np.allclose(s, (hi - lo) / 3, rtol=2e-3)
    out = np.asarray(q.dequantize())
    assert np.all(out <= hi + s / 2 + 1e-6) and np.all(out >= lo - s / 2 - 1e-6)


def test_rotation_helps_keys_with_outlier_channels():
    """The paper's premise (§3.1): a few large channels set a per-token group's range and the
    other channels round to a handful of levels; the Hadamard spreads them, so the 2-bit error
    of the same quantizer drops. (Outliers that also hold most of the energy — ≫ √(d/n) times
    the rest — are a different regime: spread, they make every channel noisy.)"""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 256, 2, 16)).astype(np.float32)
    x[..., [3, 4]] *= 4.0  # two outlier channels in each head
    x = jnp.asarray(x)
    err = lambda c: float(jnp.mean((c.decode(0, c.encode(0, x)) - x) ** 2))
    plain = RotatedCodec(bits=2, group=16, rho=1.0)
    rotated = RotatedCodec(bits=2, group=16, rho=1.0, span=32)
    assert err(rotated) < 0.9 * err(plain)


def test_sink_token_is_exact(tiny, result):
    """Query 0 reads only token 0, a sink: its logits are the full-precision model's."""
    params, _, tokens = tiny
    fp = np.asarray(Model(CFG).forward(params, tokens))
    q = np.asarray(Model(CFG, result.hooks).forward(params, tokens))
    np.testing.assert_allclose(q[:, 0], fp[:, 0], atol=1e-5)
    assert not np.allclose(q[:, 5:], fp[:, 5:], atol=1e-3)


def test_order_is_the_sorted_rotated_key_mean(tiny):
    params, calib, _ = tiny
    orders = key_orders(params, CFG, calib, RotateKVConfig())
    assert len(orders) == CFG.n_layers
    for o in orders:
        assert sorted(o) == list(range(CFG.n_kv_heads * CFG.head_dim))
    # layer 0's keys from the embeddings directly
    p = params["blocks"][0]["attn"]
    from harness.layers import rms_norm

    h = Model(CFG).embed(params, jnp.asarray(calib))
    x = rms_norm(h, params["blocks"][0]["attn_norm"], CFG.norm_eps)
    k = (x @ jnp.asarray(p["k_proj"]).T).reshape(-1, 32)
    mean = np.asarray(jnp.mean(rotate(k, 32), axis=0))
    assert np.all(np.diff(mean[np.asarray(orders[0])]) >= -1e-5)


def test_plain_ablation_has_no_rotation(tiny):
    params, calib, _ = tiny
    plain = get_method("rotatekv_plain")
    qm = plain.quantize_model(params, CFG, calib, RotateKVPlainConfig())
    kvq = qm.hooks.kv_quant
    assert kvq.key.span == kvq.value.span == 0 and not kvq.key.order
    assert kvq.key.rho == 0.8 and kvq.sink == 1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"bits": 5}, "bits"),
        ({"head_group": 0}, "head_group"),
        ({"group": 0}, "group"),
        ({"clip_ratio": 0.0}, "clip_ratio"),
        ({"clip_ratio": 1.5}, "clip_ratio"),
        ({"sink": -1}, "sink"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        RotateKVConfig(**kw)


def test_bad_shapes_and_calibration(tiny):
    params, calib, _ = tiny
    with pytest.raises(ValueError, match="head_group"):
        kv_quant(RotateKVConfig(head_group=3, reorder=False), CFG)
    with pytest.raises(ValueError, match="group"):
        kv_quant(RotateKVConfig(group=5, reorder=False), CFG)
    with pytest.raises(ValueError, match="channel order per layer"):
        kv_quant(RotateKVConfig(), CFG, ())
    with pytest.raises(ValueError, match="non-empty"):
        quantize_model(params, CFG, np.zeros((0, 8), np.int32), RotateKVConfig())
    with pytest.raises(ValueError, match="NaN"):
        channel_order(jnp.asarray([0.0, jnp.nan]))
    dead = jax.tree_util.tree_map(lambda a: a, params)
    dead["blocks"] = [dict(b, attn=dict(b["attn"])) for b in params["blocks"]]
    dead["blocks"][0]["attn"]["k_proj"] = jnp.zeros_like(params["blocks"][0]["attn"]["k_proj"])
    with pytest.raises(ValueError, match="dead"):
        quantize_model(dead, CFG, calib, RotateKVConfig())
    nan = dict(dead)
    nan["blocks"] = [dict(b, attn=dict(b["attn"])) for b in params["blocks"]]
    nan["blocks"][1]["attn"]["k_proj"] = params["blocks"][1]["attn"]["k_proj"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(nan, CFG, calib, RotateKVConfig())


def test_config_is_flat_and_frozen():
    cfg = RotateKVConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 4
    assert cfg.rho == 0.8 and RotateKVConfig(bits=4).rho == 1.0
