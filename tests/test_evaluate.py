"""Perplexity protocols and lm-eval zero-shot scoring on synthetic logits whose answers are known.

Tolerances: the scorer works in float32 (logits, logsumexp, per-row sums of at most a few dozen
terms of magnitude < 10), so results agree with float64 hand computations to ~1e-6 relative;
1e-5 leaves a decade of margin and still catches any off-by-one token (an error of >= 1e-2).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.tree_util import Partial

from harness import evaluate as ev
from harness.tasks import Request

QUIET = ev.EvalConfig(progress=False, batch_tokens=256)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _lookup(tbl, toks):
    return tbl[toks]  # one module-level function: every table shares the compiled scorer


def _bigram(V=13, seed=0):
    table = _log_softmax(np.random.default_rng(seed).normal(size=(V, V)) * 2).astype(np.float32)
    return table, Partial(_lookup, jnp.asarray(table))


class ByteTokenizer:
    """Test double: one token per UTF-8 byte, BOS = 256 (prepended when add_bos)."""

    def __init__(self, add_bos=False):
        self.add_bos, self.bos_id, self.eos_id, self.vocab_size = add_bos, 256, 256, 257

    def encode(self, text, *, add_bos=None):
        bos = self.add_bos if add_bos is None else add_bos
        return ([256] if bos else []) + list(text.encode())

    def encode_batch(self, texts, *, add_bos=None):
        return [self.encode(t, add_bos=add_bos) for t in texts]


# --- perplexity ------------------------------------------------------------------------------


def test_uniform_model_has_perplexity_vocab_size():
    V = 50
    fn = lambda toks: jnp.zeros((*toks.shape, V), jnp.float32)
    tokens = np.random.default_rng(1).integers(0, V, 1000)
    for protocol in ("gptq", "llama.cpp"):
        cfg = ev.PerplexityConfig(protocol=protocol, seqlen=64)
        r = ev.perplexity(fn, tokens, cfg, eval_cfg=QUIET)
        assert r.ppl == pytest.approx(V, rel=1e-5)


@given(n=st.integers(20, 200), seqlen=st.sampled_from([2, 3, 7, 16]), seed=st.integers(0, 3))
def test_gptq_protocol_matches_hand_computation(n, seqlen, seed):
    table, fn = _bigram(seed=seed)
    tokens = np.random.default_rng(seed).integers(0, 13, n)
    r = ev.perplexity(fn, tokens, ev.PerplexityConfig(seqlen=seqlen), eval_cfg=QUIET)
    W = n // seqlen  # the last partial window is dropped
    nll = [
        -float(table[w[t], w[t + 1]])
        for w in tokens[: W * seqlen].reshape(W, seqlen)
        for t in range(seqlen - 1)
    ]
    assert (r.windows, r.tokens) == (W, W * (seqlen - 1))
    assert r.nll == pytest.approx(np.mean(nll), rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_windows_of_both_protocols():
    tokens = np.arange(10)
    w, m = ev.perplexity_windows(tokens, seqlen=4)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [4, 5, 6, 7]])  # 8, 9 dropped
    np.testing.assert_array_equal(m, [[1, 1, 1, 0]] * 2)
    w, m = ev.perplexity_windows(tokens, seqlen=4, bos_id=99)  # a tokenizer that adds BOS
    np.testing.assert_array_equal(w, [[99, 1, 2, 3], [99, 5, 6, 7]])
    np.testing.assert_array_equal(m, [[1, 1, 1, 0]] * 2)
    w, m = ev.perplexity_windows(tokens, seqlen=4, protocol="llama.cpp", bos_id=99)
    np.testing.assert_array_equal(w, [[99, 1, 2, 3], [99, 5, 6, 7]])
    np.testing.assert_array_equal(m, [[0, 0, 1, 0]] * 2)  # logits n_ctx/2 .. n_ctx-2
    _, m = ev.perplexity_windows(np.arange(24), seqlen=12, protocol="llama.cpp")
    assert m[0].tolist() == [0] * 6 + [1] * 5 + [0]  # n_ctx - 1 - n_ctx/2 = 5 scored
    with pytest.raises(ValueError, match="2\\*n_ctx"):
        ev.perplexity_windows(np.arange(7), seqlen=4, protocol="llama.cpp")


def test_llama_cpp_protocol_uses_bos_and_second_half():
    # logits depend only on the window's first token, so the BOS replacement is visible
    table, _ = _bigram(V=13, seed=3)
    fn = Partial(
        lambda tbl, toks: jnp.broadcast_to(tbl[toks[:, :1]], (*toks.shape, 13)), jnp.asarray(table)
    )
    tokens = np.random.default_rng(5).integers(0, 12, 50)
    cfg = ev.PerplexityConfig(protocol="llama.cpp", seqlen=8)
    r = ev.perplexity(fn, tokens, cfg, bos_id=12, eval_cfg=QUIET)
    W = 50 // 8
    nll = [-float(table[12, tokens[i * 8 + t + 1]]) for i in range(W) for t in range(4, 7)]
    assert r.tokens == W * 3
    assert r.nll == pytest.approx(np.mean(nll), rel=1e-5)


def test_limit_and_bad_input():
    _, fn = _bigram()
    tokens = np.random.default_rng(0).integers(0, 13, 100)
    limited = ev.PerplexityConfig(seqlen=10, limit=3)
    assert ev.perplexity(fn, tokens, limited, eval_cfg=QUIET).windows == 3
    with pytest.raises(ValueError, match="seqlen"):
        ev.perplexity_windows(tokens, seqlen=1)
    with pytest.raises(TypeError):
        ev.perplexity_windows(tokens.astype(np.float32), seqlen=4)
    with pytest.raises(ValueError, match="protocol"):
        ev.perplexity_windows(tokens, seqlen=4, protocol="hf")
    with pytest.raises(ValueError, match="no window"):
        ev.perplexity(fn, tokens[:5], ev.PerplexityConfig(seqlen=10), eval_cfg=QUIET)
    with pytest.raises(ValueError, match="expected \\[B, T, V\\]"):
        ev.perplexity(
            lambda t: jnp.zeros(t.shape, jnp.float32),
            tokens,
            ev.PerplexityConfig(seqlen=10),
            eval_cfg=QUIET,
        )
    with pytest.raises(ValueError, match="vocabulary"):
        ev.perplexity(fn, tokens + 13, ev.PerplexityConfig(seqlen=10), eval_cfg=QUIET)
    with pytest.raises(ValueError, match="non-finite"):
        ev.perplexity(
            lambda t: jnp.full((*t.shape, 13), jnp.nan, jnp.float32),
            tokens,
            ev.PerplexityConfig(seqlen=10),
            eval_cfg=QUIET,
        )


# --- sharding and shapes -----------------------------------------------------------------------


def test_sharded_over_8_devices_equals_single_device():
    assert jax.device_count() == 8
    _, fn = _bigram(seed=7)
    tokens = np.random.default_rng(7).integers(0, 13, 700)
    cfg = ev.PerplexityConfig(seqlen=16)
    one = ev.EvalConfig(progress=False, batch_tokens=64, devices=tuple(jax.devices()[:1]))
    eight = ev.EvalConfig(progress=False, batch_tokens=64)
    a = ev.perplexity(fn, tokens, cfg, eval_cfg=one)
    b = ev.perplexity(fn, tokens, cfg, eval_cfg=eight)
    assert a.tokens == b.tokens and b.nll == pytest.approx(a.nll, rel=1e-6)
    docs = [{"goal": "ab", "sol1": "cd", "sol2": "efgh" * k, "label": k % 2} for k in range(1, 12)]
    _, fn_b = _bigram(V=257, seed=8)
    za = ev.zero_shot(fn_b, ByteTokenizer(), "piqa", docs=docs, cfg=one)
    zb = ev.zero_shot(fn_b, ByteTokenizer(), "piqa", docs=docs, cfg=eight)
    np.testing.assert_allclose(
        [d["lls"] for d in zb.per_doc], [d["lls"] for d in za.per_doc], rtol=1e-6
    )


def test_batches_are_bucketed_and_multiples_of_device_count():
    shapes = set()

    def fn(toks):
        shapes.add(toks.shape)  # runs at trace time only
        return jnp.zeros((*toks.shape, 257), jnp.float32)

    reqs = [Request(context="x" * k, continuation=" y" * (1 + k % 3)) for k in range(1, 60)]
    ev.loglikelihoods(fn, ByteTokenizer(), reqs, ev.EvalConfig(progress=False, batch_tokens=512))
    lengths = {s[1] for s in shapes}
    assert lengths <= {32, 64} and all(s[0] % 8 == 0 for s in shapes)
    assert len(shapes) == len(lengths)  # one compiled shape per bucket, not per item


# --- lm-eval requests and metrics --------------------------------------------------------------


def test_encode_pair_moves_trailing_spaces_and_truncates_left():
    tok = ByteTokenizer(add_bos=True)
    ((x, y, m),) = ev.encode_requests(tok, [Request(context="ab  ", continuation="c")], 100)
    full = [256, ord("a"), ord("b"), 32, 32, ord("c")]
    assert x.tolist() == full[:-1] and y.tolist() == full[1:]
    assert m.tolist() == [0, 0, 1, 1, 1]  # "  c" is the continuation now
    ((x, y, m),) = ev.encode_requests(tok, [Request(context="abcdefgh", continuation="ij")], 4)
    assert x.tolist() == list(b"fghi") and y.tolist() == list(b"ghij")
    assert m.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="max_length"):
        ev.encode_requests(tok, [Request(context="a", continuation="bcdef")], 4)


def test_acc_and_acc_norm_differ_on_constructed_case():
    fn = lambda toks: jnp.zeros((*toks.shape, 257), jnp.float32)  # every byte: log(1/257)
    docs = [
        {"goal": "g", "sol1": "ab", "sol2": "abcdefgh", "label": 1},  # acc 0, acc_norm 1
        {"goal": "g", "sol1": "abc", "sol2": "xyz", "label": 0},
    ]  # a tie: both pick 0
    r = ev.zero_shot(fn, ByteTokenizer(), "piqa", docs=docs, cfg=QUIET)
    c = math.log(257)
    assert r.per_doc[0]["lls"] == pytest.approx([-3 * c, -9 * c], rel=1e-5)  # " ab", " abcdefgh"
    assert [d["pred"] for d in r.per_doc] == [0, 0]
    assert [d["pred_norm"] for d in r.per_doc] == [1, 0]  # -3c/2 < -9c/8
    assert r.metrics["acc"] == 0.5 and r.metrics["acc_norm"] == 1.0
    assert r.metrics["acc_stderr"] == pytest.approx(0.5)  # sample std 0.7071 / sqrt(2)
    assert ev.zero_shot(fn, ByteTokenizer(), "piqa", docs=docs, limit=1, cfg=QUIET).n == 1


def _chain_fn(succ, miss=-5.0):
    logits = np.full((257, 257), miss, np.float32)
    for a, b in succ.items():
        logits[ord(a), ord(b)] = 0.0
    return Partial(_lookup, jnp.asarray(logits))


def test_lambada_accuracy_and_perplexity():
    fn = _chain_fn({"e": " ", " ": "a", "a": "b", "b": "c"})
    docs = [{"text": "pre abc"}, {"text": "pre abd"}]
    r = ev.zero_shot(fn, ByteTokenizer(), "lambada_openai", docs=docs, cfg=QUIET)
    lse = math.log(1 + 256 * math.exp(-5))
    ll = [-4 * lse, -4 * lse - 5]  # " abc" all greedy; "d" is a miss after "b"
    assert [d["lls"][0] for d in r.per_doc] == pytest.approx(ll, rel=1e-5)
    assert r.metrics["acc"] == 0.5
    assert r.metrics["perplexity"] == pytest.approx(math.exp(-np.mean(ll)), rel=1e-5)


def test_winogrande_partial_scoring():
    # the continuation after the blank is the same; the option sits in the context
    fn = _chain_fn({"A": " ", " ": "w"})
    doc = {"sentence": "x _ wins", "option1": "B", "option2": "A", "answer": "2"}
    r = ev.zero_shot(fn, ByteTokenizer(), "winogrande", docs=[doc], cfg=QUIET)
    assert r.per_doc[0]["pred"] == 1 and r.metrics["acc"] == 1.0
    assert set(r.metrics) == {"acc", "acc_stderr"}  # no acc_norm for WinoGrande


def test_zero_shot_bad_input():
    fn = lambda toks: jnp.zeros((*toks.shape, 257), jnp.float32)
    with pytest.raises(ValueError, match="unknown task"):
        ev.zero_shot(fn, ByteTokenizer(), "mmlu", docs=[])
    with pytest.raises(ValueError, match="limit"):
        ev.zero_shot(fn, ByteTokenizer(), "piqa", docs=[{}], limit=0)
    with pytest.raises(ValueError, match="no documents"):
        ev.zero_shot(fn, ByteTokenizer(), "piqa", docs=[])
