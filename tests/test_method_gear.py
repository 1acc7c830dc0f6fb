"""GEAR (methods/gear): decoding reads the cache scoring reads, the quantized backbone is the
KIVI quantizer, outliers are exact, the low-rank part shrinks the residual, bits are counted
part by part, and bad input is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness.decode import Decoder
from harness.model import Model, ModelConfig, init_params
from methods import gear
from methods.gear import core
from methods.kivi.core import ChannelKeys, TokenValues

TINY = ModelConfig(
    vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64
)
SMALL = gear.GEARConfig(bits=2, group=16, rank=2, loop=3, outliers=0.05, buffer=8)


def _chunk(seed=0, shape=(2, 64, 3, 64)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., 5] *= 8.0  # an outlier channel (keys)
    x[0, 3, 1, 7] = 40.0  # a lone outlier entry
    return jnp.asarray(x)


def _codec(side, **kw):
    base = dict(bits=2, group=64, rank=2, loop=3, outliers=0.02, chunk=64, window=1, flush=64)
    return core.GEARCodec(side=side, **(base | kw))


def _decode_vs_score(cfg):
    params = init_params(TINY, 0)
    qm = gear.quantize_model(params, TINY, None, cfg)
    toks = np.random.default_rng(1).integers(0, TINY.vocab_size, size=(2, 27)).astype(np.int32)
    full = np.asarray(jax.jit(Model(TINY, qm.hooks).forward)(params, toks))
    dec = Decoder(Model(TINY, qm.hooks), capacity=32)
    logits, state = dec.prefill(params, toks[:, :11])
    got = [np.asarray(logits)]
    for t in range(11, toks.shape[1]):
        step, state = dec.step(params, state, toks[:, t])
        got.append(np.asarray(step).reshape(2, 1, -1))
    plain = np.asarray(Model(TINY).forward(params, toks))
    return np.concatenate(got, axis=1), full, plain


def test_decoding_matches_scoring():
    """Prefill + steps through the fixed-capacity cache give the logits of scoring the whole
    sequence: the chunk boundaries, the buffer, the outliers and the codes are the same on both
    paths."""
    got, full, plain = _decode_vs_score(dataclasses.replace(SMALL, rank=0))
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=1e-4)
    # query 8 is the first to read chunk 0 (tokens 0…7) quantized: n_b = 8 plus one token
    assert not np.allclose(full[:, 8], plain[:, 8], atol=1e-3)
    np.testing.assert_allclose(full[:, :8], plain[:, :8], atol=1e-5)


def test_decoding_matches_scoring_with_the_low_rank_part():
    """The same with the rank-2 residual. Looser: the power iteration runs in two compiled
    contexts whose float32 results differ by ~1e-6, and storing its factors in float16 turns
    that into up to half a float16 step (~5e-4 relative) of a factor entry."""
    got, full, plain = _decode_vs_score(SMALL)
    np.testing.assert_allclose(got, full, atol=5e-4, rtol=1e-3)
    assert not np.allclose(full[:, 8:], plain[:, 8:], atol=1e-3)


@pytest.mark.parametrize("side,kivi", [("key", ChannelKeys), ("value", TokenValues)])
def test_rank_zero_without_outliers_is_the_kivi_quantizer(side, kivi):
    x = _chunk()
    ours = _codec(side, rank=0, outliers=0.0)
    kw = dict(bits=2, chunk=64, window=1, flush=64) | ({} if side == "key" else {"group": 64})
    ref = kivi(**kw)
    np.testing.assert_array_equal(
        ours.decode(0, ours.encode(0, x)), ref.decode(0, ref.encode(0, x))
    )
    assert ours.element_bits(64) == ref.element_bits(64)


@pytest.mark.parametrize("side", ["key", "value"])
def test_outliers_are_exact_and_the_largest(side):
    x = _chunk(2)
    c = _codec(side, rank=0, outliers=0.02)
    code = c.encode(0, x)
    k = core.n_outliers(0.02, 64, 64)
    assert k == 81 and code["idx"].shape == (2, 3, k) and code["idx"].dtype == jnp.uint16
    y = np.asarray(c.decode(0, code))
    mask = np.asarray(core.outlier_mask(code["idx"].astype(jnp.int32), x.shape))
    assert mask.sum() == 2 * 3 * k
    np.testing.assert_array_equal(y[mask], np.asarray(x.astype(jnp.float16), np.float32)[mask])
    a = np.abs(np.asarray(x))
    for b in range(2):
        for h in range(3):  # every kept entry is at least as large as every dropped one
            assert a[b, :, h][mask[b, :, h]].min() >= a[b, :, h][~mask[b, :, h]].max()
    assert mask[0, 3, 1, 7]
    plain = _codec(side, rank=0, outliers=0.0)
    err = lambda cc: float(jnp.linalg.norm(cc.decode(0, cc.encode(0, x)) - x))
    assert err(c) < err(plain)


@pytest.mark.parametrize("side", ["key", "value"])
def test_low_rank_shrinks_the_residual(side):
    x = _chunk(3)

    def err(r):
        c = _codec(side, rank=r)
        return float(jnp.linalg.norm(c.decode(0, c.encode(0, x)) - x))

    err = {r: err(r) for r in (0, 2, 8)}
    assert err[8] < err[2] < err[0]


def test_power_iteration_recovers_a_low_rank_matrix():
    rng = np.random.default_rng(4)
    R = (rng.normal(size=(1, 2, 64, 3)) @ rng.normal(size=(1, 2, 3, 32))).astype(np.float32)
    A, B = gear.power_iteration(jnp.asarray(R), 3, 3, jax.random.key(0))
    assert A.shape == (1, 2, 64, 3) and B.shape == (1, 2, 32, 3)
    np.testing.assert_allclose(A @ jnp.swapaxes(B, -1, -2), R, atol=1e-3 * np.abs(R).max())


def test_encode_is_deterministic_and_shapes():
    x = _chunk(5)
    c = _codec("value")
    a, b = c.encode(0, x), c.encode(0, x)
    for key in ("idx", "val", "a", "b"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["a"].shape == (2, 3, 64, 2) and a["b"].shape == (2, 3, 64, 2)
    assert a["a"].dtype == jnp.float16 and a["val"].dtype == jnp.float16
    assert c.decode(0, a).shape == x.shape and c.decode(0, a).dtype == jnp.float32


def test_bits_are_counted_part_by_part():
    k = _codec("key", bits=4, rank=2, outliers=0.02)
    v = _codec("value", bits=4, rank=2, outliers=0.02, group=32)
    lr = 16 * 2 * (64 + 64) / (64 * 64)
    sp = 32 * 81 / (64 * 64)
    assert k.element_bits(64) == pytest.approx(4 + 32 / 64 + lr + sp)
    assert v.element_bits(64) == pytest.approx(4 + 32 / 32 + lr + sp)
    q = gear.quantize_model(init_params(TINY, 0), TINY, None, SMALL)
    kvq = q.hooks.kv_quant
    assert (kvq.key.chunk, kvq.key.window, kvq.key.flush) == (8, 1, 8)
    assert (kvq.value.chunk, kvq.value.window, kvq.value.flush) == (8, 1, 8)
    n = TINY.max_seq_len if TINY.max_seq_len < 2048 else 2048
    assert q.kv_bits == pytest.approx(kvq.bits_per_element(n, TINY.head_dim))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bits": 5}, "bits"),
        ({"rank": -1}, "rank"),
        ({"loop": 0}, "loop"),
        ({"buffer": 0}, "buffer"),
        ({"outliers": 0.5}, "outliers"),
        ({"outliers": float("nan")}, "outliers"),
        ({"group": 0}, "group"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        gear.GEARConfig(**kw)


def test_bad_input():
    with pytest.raises(ValueError, match="side"):
        core.GEARCodec(side="query")
    with pytest.raises(ValueError, match="multiple"):
        core.GEARCodec(chunk=64, flush=32)
    with pytest.raises(ValueError, match="does not divide"):
        gear.quantize_model(init_params(TINY, 0), TINY, None, gear.GEARConfig(group=12))
