"""Calibration segments: seeded random windows of C4 documents, as GPTQ's ``get_c4`` draws them.

GPTQ (Frantar et al., arXiv:2210.17323; ``datautils.py: get_c4`` in IST-DASLab/gptq), also
used by AWQ-, OmniQuant- and QuIP-style methods: with Python's ``random`` seeded by ``seed``,
for each of the ``n_samples`` segments

1. draw ``i = randint(0, n_docs - 1)`` until document ``i`` has more than ``seqlen`` tokens
   (each document tokenized alone, with the tokenizer's own BOS rule, as HF's tokenizer call);
2. draw ``start = randint(0, n_tokens - seqlen - 1)`` and keep ``tokens[start : start + seqlen]``.

``random.Random(seed)`` gives the same draws as GPTQ's ``random.seed(seed)`` + ``random.randint``.
GPTQ's test is ``>= seqlen``, which crashes in ``randint(0, -1)`` on a document of exactly
``seqlen`` tokens; documents must have strictly more here. Locally the documents are the
1,000-document C4 sample of ``harness.data`` (GPTQ draws from C4's train shard 00000, which is
what ``c4_documents(split="train")`` loads from the hub) — the same sample is also the local C4
perplexity corpus, so a C4 perplexity after C4 calibration is not held out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Int

from harness import data as data_lib

__all__ = ["random_segments", "c4_calibration"]


class _LazyTokens(Sequence):
    """Documents tokenized on first access (GPTQ tokenizes only the documents it draws)."""

    def __init__(self, docs: Sequence[str], tokenizer: Any):
        self.docs, self.tokenizer, self.cache = docs, tokenizer, {}

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> list[int]:  # type: ignore[override]
        if i not in self.cache:
            self.cache[i] = self.tokenizer.encode(self.docs[i])
        return self.cache[i]


def random_segments(
    token_docs: Sequence[Sequence[int]], *, n_samples: int, seqlen: int, seed: int = 0
) -> Int[np.ndarray, "n seqlen"]:
    """GPTQ's draw of ``n_samples`` windows of ``seqlen`` tokens from tokenized documents."""
    if n_samples < 1 or seqlen < 1:
        raise ValueError(f"n_samples and seqlen must be positive, got {n_samples}, {seqlen}")
    if len(token_docs) == 0:
        raise ValueError("no documents to draw calibration segments from")
    rng = random.Random(seed)
    too_short: set[int] = set()
    out = np.empty((n_samples, seqlen), np.int32)
    for s in range(n_samples):
        while True:
            i = rng.randint(0, len(token_docs) - 1)
            doc = token_docs[i]
            if len(doc) > seqlen:
                break
            too_short.add(i)
            if len(too_short) == len(token_docs):
                raise ValueError(f"no document has more than seqlen={seqlen} tokens")
        start = rng.randint(0, len(doc) - seqlen - 1)
        out[s] = np.asarray(doc[start : start + seqlen], np.int32)
    return out


def c4_calibration(
    tokenizer: Any, *, n_samples: int = 128, seqlen: int = 2048, seed: int = 0, data_dir: Any = None
) -> Int[np.ndarray, "n seqlen"]:
    """``n_samples`` × ``seqlen`` calibration tokens from C4 (GPTQ defaults: 128 × 2048, seed 0)."""
    docs = data_lib.c4_documents(data_dir, split="train")
    return random_segments(
        _LazyTokens(docs, tokenizer), n_samples=n_samples, seqlen=seqlen, seed=seed
    )
