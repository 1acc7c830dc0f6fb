"""Calibration segments: GPTQ's seeded draw of random C4 windows."""

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import calibration, data


def _gptq_reference(token_docs, n_samples, seqlen, seed):
    """IST-DASLab/gptq datautils.get_c4's loop, with the module-level random functions."""
    random.seed(seed)
    out = []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(token_docs) - 1)
            if len(token_docs[i]) > seqlen:
                break
        i_start = random.randint(0, len(token_docs[i]) - seqlen - 1)
        out.append(token_docs[i][i_start : i_start + seqlen])
    return np.asarray(out, np.int32)


_docs = st.lists(st.lists(st.integers(0, 1000), min_size=0, max_size=40), min_size=1, max_size=12)


@given(docs=_docs, n=st.integers(1, 6), seqlen=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_matches_gptq_draw(docs, n, seqlen, seed):
    if not any(len(d) > seqlen for d in docs):
        with pytest.raises(ValueError, match="more than seqlen"):
            calibration.random_segments(docs, n_samples=n, seqlen=seqlen, seed=seed)
        return
    got = calibration.random_segments(docs, n_samples=n, seqlen=seqlen, seed=seed)
    np.testing.assert_array_equal(got, _gptq_reference(docs, n, seqlen, seed))
    assert got.shape == (n, seqlen) and got.dtype == np.int32


def test_bad_arguments():
    with pytest.raises(ValueError):
        calibration.random_segments([[1, 2, 3]], n_samples=0, seqlen=1)
    with pytest.raises(ValueError):
        calibration.random_segments([], n_samples=1, seqlen=1)
    with pytest.raises(ValueError, match="more than seqlen"):  # exactly seqlen is not enough
        calibration.random_segments([[1, 2, 3]], n_samples=1, seqlen=3)


class _CountingTokenizer:
    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [ord(c) for c in text]


def test_only_drawn_documents_are_tokenized():
    tok = _CountingTokenizer()
    docs = ["x" * 50] * 1000
    lazy = calibration._LazyTokens(docs, tok)
    segs = calibration.random_segments(lazy, n_samples=3, seqlen=10, seed=0)
    assert segs.shape == (3, 10) and tok.calls <= 3


@pytest.mark.skipif(data.resolve_data_dir() is None, reason="no local data directory")
def test_c4_calibration_with_smollm2():
    from harness.tokenizer import Tokenizer, gguf_path

    try:
        tok = Tokenizer.from_gguf(gguf_path("smollm2"))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    a = calibration.c4_calibration(tok, n_samples=4, seqlen=512, seed=0)
    b = calibration.c4_calibration(tok, n_samples=4, seqlen=512, seed=0)
    c = calibration.c4_calibration(tok, n_samples=4, seqlen=512, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 512) and a.dtype == np.int32 and not np.array_equal(a, c)
    docs = [tok.encode(d) for d in data.c4_documents()]
    for row in a:  # every segment is a contiguous window of one document
        assert any(len(d) > 512 and _contains(d, row.tolist()) for d in docs)


def _contains(seq, window):
    n = len(window)
    return any(seq[i : i + n] == window for i in range(len(seq) - n + 1) if seq[i] == window[0])
