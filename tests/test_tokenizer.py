"""Tokenizers rebuilt from GGUF metadata give llama.cpp's token ids (golden files from
scripts/golden/make_golden_tokens.py) on the whole WikiText-2 / PTB / C4 texts, plus properties."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import data
from harness.tokenizer import Tokenizer, gguf_path

GOLDEN = Path(__file__).parent / "golden"
MODELS = ("smollm2", "gemma3")
CORPORA = {
    "wikitext2": data.wikitext2_text,
    "ptb": lambda: data.ptb_text("test"),
    "c4": data.c4_text,
}
_cache: dict[str, Tokenizer] = {}


def _tokenizer(model: str) -> Tokenizer:
    if model not in _cache:
        try:
            path = gguf_path(model)
        except FileNotFoundError as e:
            pytest.skip(f"model package not installed: {e}")
        _cache[model] = Tokenizer.from_gguf(path)
    return _cache[model]


def _golden(model: str) -> dict:
    return json.loads((GOLDEN / f"tokens_{model}.json").read_text(encoding="utf-8"))


def _need_data() -> None:
    if data.resolve_data_dir() is None:
        pytest.skip("no local data directory (set LOWBIT_DATA_DIR)")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_whole_corpus_matches_llama_cpp(model, corpus):
    _need_data()
    tok, gold = _tokenizer(model), _golden(model)["corpora"][corpus]
    text = CORPORA[corpus]()
    assert hashlib.sha256(text.encode()).hexdigest() == gold["text_sha256"], "text prep changed"
    ids = tok.encode(text)
    assert len(ids) == gold["count"]
    assert ids[:512] == gold["head"] and ids[-512:] == gold["tail"]
    assert hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest() == gold["ids_sha256"]


@pytest.mark.parametrize("model", MODELS)
def test_tricky_strings_match_llama_cpp(model):
    tok = _tokenizer(model)
    for case in _golden(model)["strings"]:
        assert tok.encode(case["text"]) == case["ids"], repr(case["text"])


def test_metadata_and_bos_rules():
    smol, gemma = _tokenizer("smollm2"), _tokenizer("gemma3")
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.add_bos) == (49152, 1, 2, False)
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id, gemma.add_bos) == (262144, 2, 1, True)
    assert smol.encode("a") == smol.encode("a", add_bos=False)
    assert smol.encode("a", add_bos=True)[0] == 1
    assert gemma.encode("") == [2] and gemma.encode("", add_bos=False) == []
    assert gemma.encode("a")[1:] == gemma.encode("a", add_bos=False)
    # user-defined tokens are split out whole; control tokens in text are plain text
    assert gemma.encode("\n\n", add_bos=False) == [108]
    assert 1 not in gemma.encode("<eos>", add_bos=False)


# SmolLM2's byte-level vocabulary lacks the bytes 04 06 13 14 16 1D C0 C1 F1 F2 F5-FF, so control
# characters and code points >= U+40000 cannot be encoded (llama.cpp drops them too); "\u2581"
# is the SPM space marker and decodes to " ".
_TEXT = st.text(
    st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2581", max_codepoint=0x3FFFF
    )
    | st.sampled_from(" \n\t"),
    max_size=60,
)


@pytest.mark.parametrize("model", MODELS)
@given(text=_TEXT)
def test_decode_inverts_encode(model, text):
    tok = _tokenizer(model)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("model", MODELS)
@given(parts=st.lists(_TEXT, min_size=1, max_size=4))
def test_batch_equals_single(model, parts):
    tok = _tokenizer(model)
    assert tok.encode_batch(parts) == [tok.encode(p) for p in parts]


def test_bad_input():
    tok = _tokenizer("smollm2")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49152])
    with pytest.raises(ValueError, match="unsupported tokenizer model"):
        Tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer({"general.architecture": "llama"})
    with pytest.raises(ValueError, match="pre-tokenizer"):
        Tokenizer(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "qwen2",
                "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.merges": [],
            }
        )
