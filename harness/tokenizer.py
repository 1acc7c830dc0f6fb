"""Tokenizers rebuilt from a GGUF file's metadata, giving the same token ids as llama.cpp.

Two vocabulary types, as llama.cpp names them (``tokenizer.ggml.model``):

* ``gpt2`` — byte-level BPE (SmolLM2). Built with the ``tokenizers`` package from
  ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges``. The pre-tokenizer follows
  ``tokenizer.ggml.pre``: llama.cpp's "smollm" type (``src/llama-vocab.cpp``, shared with
  starcoder / refact / codeshell) first isolates every ``\\p{N}`` code point, then applies the
  GPT-2 regex
  ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``;
  in ``tokenizers`` terms ``Digits(individual_digits=True)`` then ``ByteLevel(use_regex=True)``.
* ``llama`` — SentencePiece-style BPE with scores and byte fallback (Gemma 3). llama.cpp's
  ``llm_tokenizer_spm_session`` is SentencePiece's BPE encoder (repeatedly merge the adjacent
  pair whose concatenation is the highest-scoring vocabulary entry, ties to the left), so we
  build a SentencePiece ``ModelProto`` from ``tokens`` / ``scores`` / ``token_type`` and let
  ``sentencepiece`` run it. To reproduce llama.cpp rather than SentencePiece where the two differ,
  every piece except the 256 byte pieces is declared NORMAL (llama.cpp lets a merge produce any
  vocabulary entry, control tokens included), an extra UNKNOWN piece is appended after the real
  vocabulary (SentencePiece requires one; byte fallback means it is never emitted), and
  normalization is off: we replace " " by "▁" ourselves, as ``llama_escape_whitespace`` does.

Common to both, as in ``llama_vocab::impl::tokenize`` with ``parse_special = false``:
USER_DEFINED tokens (Gemma's newline / space / tab runs and HTML tags) are split out of the raw
text first, longest token first, and emitted as themselves; CONTROL tokens in the text are *not*
parsed (``"<eos>"`` is tokenized as ordinary text). BOS is prepended when the GGUF says
``tokenizer.ggml.add_bos_token`` (SmolLM2: no, Gemma 3: yes), EOS appended when it says
``add_eos_token``; for SPM a space is prefixed after a special token when ``add_space_prefix``.

The metadata is read by ``harness.gguf_loader.read_gguf`` (``gguf.GGUFReader`` gives the same
values but needs ~30 s for Gemma's 262,144-entry arrays). Exactness is checked against llama.cpp
on the whole WikiText-2 test text by
``tests/golden/tokens_*.json`` (written by ``scripts/golden/make_golden_tokens.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Tokenizer", "gguf_path"]

# llama.cpp token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gguf_path(model: str) -> Path:
    """Path of a packaged model's GGUF file: "smollm2" or "gemma3" (see harness.gguf_loader)."""
    from harness import gguf_loader

    paths = {"smollm2": gguf_loader.smollm2_path, "gemma3": gguf_loader.gemma3_270m_path}
    if model not in paths:
        raise ValueError(f"unknown model {model!r}; known: {sorted(paths)}")
    return paths[model]()


# --- SentencePiece model proto (hand-written protobuf wire format) --------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field_varint(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v)


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _field_f32(field: int, v: float) -> bytes:
    return _varint((field << 3) | 5) + struct.pack("<f", v)


def _spm_model_proto(tokens: Sequence[str], scores: np.ndarray, types: np.ndarray) -> bytes:
    """sentencepiece_model.proto ``ModelProto``: pieces (1: piece, 2: score, 3: type),
    trainer_spec (2: model_type=BPE(2) at 3, vocab_size 4, byte_fallback 35, unk/bos/eos/pad id
    40-43), normalizer_spec (3: name 1, add_dummy_prefix 3, remove_extra_whitespaces 4,
    escape_whitespaces 5)."""
    sp_normal, sp_unknown, sp_byte = 1, 2, 6
    out = bytearray()
    for piece, score, ttype in zip(tokens, scores.tolist(), types.tolist(), strict=True):
        kind = sp_byte if ttype == BYTE else sp_normal
        out += _field_bytes(
            1, _field_bytes(1, piece.encode()) + _field_f32(2, score) + _field_varint(3, kind)
        )
    unk_id = len(tokens)  # an extra, unreachable UNKNOWN piece after the real vocabulary
    out += _field_bytes(
        1, _field_bytes(1, b"<lowbit-unk>") + _field_f32(2, 0.0) + _field_varint(3, sp_unknown)
    )
    trainer = (
        _field_varint(3, 2)
        + _field_varint(4, len(tokens) + 1)
        + _field_varint(35, 1)
        + _field_varint(40, unk_id)
        + _field_varint(41, -1)
        + _field_varint(42, -1)
        + _field_varint(43, -1)
    )
    normalizer = (
        _field_bytes(1, b"identity")
        + _field_varint(3, 0)
        + _field_varint(4, 0)
        + _field_varint(5, 0)
    )
    return bytes(out + _field_bytes(2, trainer) + _field_bytes(3, normalizer))


# --- the tokenizer --------------------------------------------------------------------------

_DIGIT_ISOLATING_PRE = {"smollm", "starcoder", "refact", "codeshell"}  # "\p{N}" then GPT-2 regex
_GPT2_PRE = {"gpt2", "mpt", "olmo"}  # GPT-2 regex only


class Tokenizer:
    """A GGUF model's tokenizer: ``encode`` / ``decode`` with llama.cpp's token ids.

    Attributes: ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id`` (None if absent),
    ``add_bos`` / ``add_eos`` (the GGUF's ``add_bos_token`` / ``add_eos_token``), ``model``
    ("gpt2" or "llama"), ``pre`` (pre-tokenizer name).
    """

    def __init__(self, meta: dict[str, Any]):
        try:
            self.model: str = meta["tokenizer.ggml.model"]
            self.tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        except KeyError as e:
            raise ValueError(f"GGUF metadata has no tokenizer ({e.args[0]} missing)") from None
        n = len(self.tokens)
        self.token_types = np.asarray(
            meta.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), dtype=np.int32
        )
        if self.token_types.shape != (n,):
            raise ValueError(f"token_type has {self.token_types.shape} entries for {n} tokens")
        self.pre: str = meta.get("tokenizer.ggml.pre", "default")
        self.vocab_size = n
        self.bos_id: int | None = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = meta.get("tokenizer.ggml.eos_token_id")
        self.pad_id: int | None = meta.get("tokenizer.ggml.padding_token_id")
        self.unk_id: int | None = meta.get("tokenizer.ggml.unknown_token_id")
        spm = self.model == "llama"
        # llama.cpp defaults: SPM adds BOS and a space prefix unless the GGUF says otherwise.
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spm))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", spm))
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos_token is true but bos_token_id is not set")
        # user-defined tokens are split out before the model runs; longest first (llama.cpp's
        # cache_special_tokens order; ties kept in id order)
        user = [i for i in range(n) if self.token_types[i] == USER_DEFINED and self.tokens[i]]
        self._user_defined = sorted(((self.tokens[i], i) for i in user), key=lambda p: -len(p[0]))
        self._control = frozenset(
            int(i) for i in np.flatnonzero(np.isin(self.token_types, (CONTROL, UNKNOWN, UNUSED)))
        )
        if self.model == "gpt2":
            self._init_bpe(list(meta.get("tokenizer.ggml.merges", [])))
        elif spm:
            scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(n)), dtype=np.float32)
            self._init_spm(scores)
        else:
            raise ValueError(f"unsupported tokenizer model {self.model!r} (supported: gpt2, llama)")

    @classmethod
    def from_gguf(cls, path: str | Path, *, verify: bool = True) -> Tokenizer:
        """Build from a GGUF file's metadata (``harness.gguf_loader.read_gguf``; ``verify``
        checks the sha256 of the known model files)."""
        from harness.gguf_loader import read_gguf

        return cls(read_gguf(path, verify=verify).metadata)

    @classmethod
    def from_model(cls, model: str) -> Tokenizer:
        """Build for a packaged model: "smollm2" or "gemma3" (see ``gguf_path``)."""
        return cls.from_gguf(gguf_path(model))

    # --- backends ---------------------------------------------------------------------------

    def _init_bpe(self, merges: list[str]) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        if self.pre in _DIGIT_ISOLATING_PRE:
            pre = [pre_tokenizers.Digits(individual_digits=True)]
        elif self.pre in _GPT2_PRE:
            pre = []
        else:
            raise ValueError(f"unsupported gpt2 pre-tokenizer {self.pre!r}")
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep or " " in b:
                raise ValueError(f"malformed BPE merge {m!r}")
            pairs.append((a, b))
        vocab = {t: i for i, t in enumerate(self.tokens)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*pre, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
        hf.decoder = decoders.ByteLevel()
        self._hf = hf

    def _init_spm(self, scores: np.ndarray) -> None:
        import sentencepiece

        if scores.shape != (self.vocab_size,):
            raise ValueError(f"scores has {scores.shape} entries for {self.vocab_size} tokens")
        byte_ids = np.flatnonzero(self.token_types == BYTE)
        if len(byte_ids) != 256:
            raise ValueError(f"SPM vocabulary needs 256 byte tokens, has {len(byte_ids)}")
        self._byte_value = {int(i): int(self.tokens[i][3:5], 16) for i in byte_ids}
        self._sp = sentencepiece.SentencePieceProcessor(
            model_proto=_spm_model_proto(self.tokens, scores, self.token_types)
        )

    def _encode_raw(self, fragments: list[str], first_after_special: list[bool]) -> list[list[int]]:
        if not fragments:
            return []
        if self.model == "gpt2":
            return [e.ids for e in self._hf.encode_batch(fragments, add_special_tokens=False)]
        texts = [
            (" " + f if self.add_space_prefix and prev else f).replace(" ", "\u2581")
            for f, prev in zip(fragments, first_after_special, strict=True)
        ]
        return self._sp.encode(texts, out_type=int)

    # --- public API -------------------------------------------------------------------------

    def _partition(self, text: str) -> list[str | int]:
        """Split out user-defined tokens, longest first, as llama.cpp's tokenizer_st_partition."""
        parts: list[str | int] = [text] if text else []
        for piece, tid in self._user_defined:
            if piece not in text:
                continue
            out: list[str | int] = []
            for p in parts:
                if isinstance(p, int) or piece not in p:
                    out.append(p)
                    continue
                for k, chunk in enumerate(p.split(piece)):
                    if k:
                        out.append(tid)
                    if chunk:
                        out.append(chunk)
            parts = out
        return parts

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """Token ids of each text. ``add_bos=None`` follows the GGUF (BOS if ``add_bos_token``,
        EOS if ``add_eos_token``), as llama.cpp's ``llama_tokenize(..., add_special=true)``;
        True / False force BOS on / off and never add EOS."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode expects str, got {type(t).__name__}")
        if add_bos and self.bos_id is None:
            raise ValueError("this vocabulary has no BOS token")
        partitions = [self._partition(t) for t in texts]
        raw, after_special = [], []
        for parts in partitions:
            prev_special = True
            for p in parts:
                if isinstance(p, str):
                    raw.append(p)
                    after_special.append(prev_special)
                prev_special = isinstance(p, int)
        encoded = iter(self._encode_raw(raw, after_special))
        bos = self.add_bos if add_bos is None else add_bos
        eos = self.add_eos and add_bos is None
        out = []
        for parts in partitions:
            ids = [self.bos_id] if bos else []
            for p in parts:
                if isinstance(p, int):
                    ids.append(p)
                else:
                    ids.extend(next(encoded))
            if eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (see ``encode_batch`` for ``add_bos``)."""
        return self.encode_batch([text], add_bos=add_bos)[0]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of token ids; control tokens (BOS, EOS, pad, ...) are dropped unless
        ``skip_special=False``. Invalid UTF-8 byte sequences decode to U+FFFD."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
        if skip_special:
            ids = [i for i in ids if i not in self._control]
        if self.model == "gpt2":
            return self._hf.decode(ids, skip_special_tokens=False)
        out = bytearray()
        for i in ids:
            if i in self._byte_value:
                out.append(self._byte_value[i])
            else:
                out += self.tokens[i].replace("\u2581", " ").encode()
        text = out.decode("utf-8", errors="replace")
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]  # the space encode() prefixed (llama.cpp's detokenizer drops it too)
        return text

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored in the GGUF."""
        return self.tokens[token_id]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"
        )
