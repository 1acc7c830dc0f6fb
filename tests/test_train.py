"""harness.train: resume after an interruption is exact, batches are a pure function of the step,
configs reject bad input, the corpus remap keeps the most frequent ids, and the QiD
measurement quantizes exactly the block linears."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import train as T
from harness.data import resolve_data_dir
from harness.model import get_param, linear_names
from numerics.config import rtn

TINY = T.TrainConfig(
    d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=64, seq_len=8, batch_size=4,
    steps=7, warmup_steps=1, peak_lr=1e-2, save_every=2, budgets=(1, 3, 7),
)  # fmt: skip


def _corpus(n: int = 4000, vocab: int = 64, seed: int = 0) -> T.Corpus:
    """A learnable synthetic stream: a noisy cyclic sequence (next id = id + 1 mostly)."""
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) + np.cumsum(rng.random(n) < 0.1)) % vocab
    ids = ids.astype(np.int32)
    return T.Corpus(
        train=ids[: n * 3 // 4], val=ids[n * 3 // 4 :], keep=np.arange(1, vocab, dtype=np.int32),
        unk_rate={"train": 0.0, "val": 0.0}, fingerprint="synthetic",
    )  # fmt: skip


def _equal_trees(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


# ------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_same_params(tmp_path):
    corpus = _corpus()
    full = T.train(TINY, corpus, tmp_path / "full", progress=False)
    assert full.step == TINY.steps and full.resumed_from == 0

    # stopped after 5 steps without saving: states at 2 and 4 were written (4 kept), budgets 1, 3
    part = T.train(TINY, corpus, tmp_path / "cut", stop_after=5, progress=False)
    assert part.step == 5 and T.budget_steps(tmp_path / "cut") == [1, 3]
    assert not _equal_trees(part.params, full.params)
    resumed = T.train(TINY, corpus, tmp_path / "cut", progress=False)
    assert resumed.resumed_from == 4 and resumed.step == TINY.steps
    assert _equal_trees(resumed.params, full.params)  # bit for bit
    assert resumed.history == full.history
    assert resumed.seconds > 0 and full.seconds > 0
    assert T.budget_steps(tmp_path / "cut") == T.budget_steps(tmp_path / "full") == [1, 3, 7]
    for s in (1, 3, 7):
        (pa, ma), (pb, mb) = (T.load_budget(TINY, tmp_path / d, s) for d in ("cut", "full"))
        assert _equal_trees(pa, pb)
        assert ma["tokens"] == mb["tokens"] == s * TINY.batch_size * TINY.seq_len
    assert _equal_trees(T.load_budget(TINY, tmp_path / "full", 7)[0], full.params)

    # a finished run returns at once, with the same params
    again = T.train(TINY, corpus, tmp_path / "full", progress=False)
    assert again.resumed_from == TINY.steps and _equal_trees(again.params, full.params)


def test_crash_before_the_first_state_redoes_kept_budgets(tmp_path):
    cfg = dataclasses.replace(TINY, save_every=10, budgets=(2, 7))
    corpus = _corpus()
    T.train(cfg, corpus, tmp_path / "a", stop_after=3, progress=False)  # budget 2, no state
    assert T.budget_steps(tmp_path / "a") == [2]
    done = T.train(cfg, corpus, tmp_path / "a", progress=False)  # starts over, skips budget 2
    assert done.resumed_from == 0
    ref = T.train(cfg, corpus, tmp_path / "b", progress=False)
    assert _equal_trees(done.params, ref.params)
    assert _equal_trees(
        T.load_budget(cfg, tmp_path / "a", 2)[0], T.load_budget(cfg, tmp_path / "b", 2)[0]
    )


def test_resume_with_another_config_is_refused(tmp_path):
    corpus = _corpus()
    T.train(TINY, corpus, tmp_path, stop_after=3, progress=False)
    with pytest.raises(ValueError, match="different TrainConfig"):
        T.train(dataclasses.replace(TINY, peak_lr=2e-2), corpus, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="step 5"):
        T.load_budget(TINY, tmp_path, 5)


def test_training_lowers_the_loss(tmp_path):
    cfg = dataclasses.replace(TINY, steps=40, warmup_steps=4, save_every=40, budgets=(40,))
    corpus = _corpus()
    res = T.train(cfg, corpus, tmp_path, progress=False)
    assert [s for s, _ in res.history] == list(range(1, 41))
    first, last = res.history[0][1], np.mean([v for _, v in res.history[-5:]])
    assert first > math.log(cfg.vocab_size) - 1.0  # starts near uniform
    assert last < first - 1.0  # the cyclic stream is learned (≈ 0.33 nats is its entropy)
    w = T.val_windows(corpus.val, cfg.seq_len, 16)
    assert T.eval_loss(cfg, res.params, w) < first - 1.0


# ------------------------------------------------------------------------------- batches


@given(step=st.integers(0, 200), seed=st.integers(0, 3))
def test_batch_is_a_pure_function_of_the_step(step, seed):
    cfg = dataclasses.replace(TINY, seed=seed)
    ids = _corpus(n=500).train
    a, b = T.batch_at(ids, step, cfg), T.batch_at(ids, step, cfg)
    assert a.dtype == np.int32 and a.shape == (cfg.batch_size, cfg.seq_len + 1)
    assert np.array_equal(a, b)
    L = cfg.seq_len + 1
    windows = ids[: (ids.size // L) * L].reshape(-1, L)
    for row in a:  # every row is one of the non-overlapping windows
        assert np.any(np.all(windows == row[None, :], axis=1))


def test_one_epoch_visits_every_window_once():
    cfg = dataclasses.replace(TINY, batch_size=5)
    ids = np.arange(9 * 20, dtype=np.int32)  # 20 windows of 9 tokens, all distinct
    starts = np.concatenate([T.batch_at(ids, s, cfg)[:, 0] for s in range(4)])
    assert sorted(starts.tolist()) == list(range(0, 180, 9))
    nxt = np.concatenate([T.batch_at(ids, s, cfg)[:, 0] for s in range(4, 8)])
    assert sorted(nxt.tolist()) == list(range(0, 180, 9))  # second epoch: all again ...
    assert not np.array_equal(starts, nxt)  # ... in another order


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, match",
    [
        ({"d_model": 30}, "even-width heads"),
        ({"n_heads": 3}, "even-width heads"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"warmup_steps": 7}, "warmup_steps"),
        ({"peak_lr": float("nan")}, "peak_lr"),
        ({"peak_lr": 0.0}, "peak_lr > 0"),
        ({"b2": 1.0}, "b2 < 1"),
        ({"budgets": (3, 1)}, "budgets"),
        ({"budgets": (0,)}, "budgets"),
        ({"budgets": (8,)}, "budgets"),
    ],
)
def test_bad_train_config(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sources": ()}, "sources"),
        ({"sources": ("wiki",)}, "sources"),
        ({"sources": ("c4", "c4")}, "duplicate"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"vocab_size": 50000}, "vocab_size"),
        ({"val_every": 1}, "val_every"),
    ],
)
def test_bad_corpus_config(kw, match):
    with pytest.raises(ValueError, match=match):
        T.CorpusConfig(**kw)


def test_bad_data(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        T.train(TINY, _corpus(vocab=65), tmp_path, progress=False)
    floats = dataclasses.replace(_corpus(), train=_corpus().train.astype(np.float32))
    with pytest.raises(TypeError, match="integer token ids"):
        T.train(TINY, floats, tmp_path, progress=False)
    with pytest.raises(ValueError, match="log_every"):
        T.train(TINY, _corpus(), tmp_path, log_every=0, progress=False)
    with pytest.raises(ValueError, match="shorter than one window"):
        T.batch_at(np.arange(5, dtype=np.int32), 0, TINY)
    with pytest.raises(ValueError, match="n >= 1"):
        T.val_windows(np.arange(100, dtype=np.int32), 8, 0)


# ------------------------------------------------------------------------------- evaluation


def test_eval_loss_is_the_mean_nll_and_quantization_touches_only_block_linears():
    params = T.init_params(T.model_config(TINY), seed=1)
    w = T.val_windows(_corpus().val, TINY.seq_len, 10)
    logits = T.Model(T.model_config(TINY)).forward(params, jnp.asarray(w[:, :-1]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    ref = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(w[:, 1:, None]), axis=-1)))
    assert T.eval_loss(TINY, params, w, batch_size=3) == pytest.approx(ref, rel=1e-5)

    q = T.quantize_block_linears(params, TINY, rtn(2, group_size=8, sym=False))
    names = set(linear_names(T.model_config(TINY)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        new = get_param(q, key)
        if key in names:
            assert len(np.unique(np.asarray(new)[0, :8])) <= 4  # 2-bit codes per group of 8
            assert not np.array_equal(np.asarray(new), np.asarray(leaf))
        else:
            assert np.array_equal(np.asarray(new), np.asarray(leaf)), key


def test_measure_qid_orders_bit_widths(tmp_path):
    cfg = dataclasses.replace(TINY, steps=30, warmup_steps=3, save_every=30, budgets=(30,))
    corpus = _corpus()
    T.train(cfg, corpus, tmp_path, progress=False)
    quant = {b: rtn(b, group_size=8, sym=False) for b in (2, 4, 8)}
    rows = T.measure_qid(cfg, tmp_path, T.val_windows(corpus.val, cfg.seq_len, 16), quant)
    assert [(r["step"], r["P"]) for r in rows] == [(30, 2), (30, 4), (30, 8)]
    d = {r["P"]: r["dloss"] for r in rows}
    assert d[2] > d[4] > abs(d[8])
    assert all(r["N"] == T.non_embedding_params(cfg) and r["D"] == 30 * 32 for r in rows)


def test_non_embedding_params_counts_the_blocks():
    params = T.init_params(T.model_config(TINY), seed=0)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert T.non_embedding_params(TINY) == total - TINY.vocab_size * TINY.d_model


# ------------------------------------------------------------------------------- corpus


@pytest.mark.skipif(resolve_data_dir() is None, reason="needs the local C4 sample")
def test_corpus_remap_keeps_the_most_frequent_ids(tmp_path):
    cfg = T.CorpusConfig(sources=("c4",), vocab_size=512, val_every=10)
    c = T.build_corpus(cfg, cache_dir=tmp_path)
    assert c.train.dtype == c.val.dtype == np.int32
    assert c.train.min() >= 0 and c.train.max() < 512 and c.val.max() < 512
    assert c.keep.size == 511 and len(set(c.keep.tolist())) == 511
    counts = np.bincount(c.train, minlength=512)
    assert np.all(counts[1:] > 0)  # every kept id occurs in training ...
    assert np.all(np.diff(counts[1:]) <= 0)  # ... and new ids are in order of frequency
    assert c.unk_rate["train"] == pytest.approx(float(np.mean(c.train == 0)))
    assert 0 < c.unk_rate["train"] < 0.5
    assert 0.05 < c.val.size / (c.train.size + c.val.size) < 0.2  # ≈ 1 document in 10
    cached = T.build_corpus(cfg, cache_dir=tmp_path)
    assert cached.fingerprint == c.fingerprint
    assert np.array_equal(cached.train, c.train) and np.array_equal(cached.keep, c.keep)
