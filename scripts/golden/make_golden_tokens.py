"""Write tests/golden/tokens_<model>.json: llama.cpp's token ids for the evaluation texts.

Runs llama.cpp's own tokenizer (``llama-cpp-python``, ``Llama(model, vocab_only=True)``,
``tokenize(text, add_bos=True, special=False)`` = llama_tokenize with add_special=true,
parse_special=false: BOS only where the GGUF says add_bos_token) on

* the whole WikiText-2 test text, PTB test text and C4 text exactly as ``harness.data`` prepares
  them: for each, the id count, the sha256 of the ids as little-endian int32, and the first and
  last 512 ids;
* a list of short tricky strings (spaces, newlines, digits, Unicode, special-token look-alikes),
  with all their ids.

Only for regenerating the golden files (``pip install llama-cpp-python==0.3.36``, which compiles
llama.cpp); the tests never import llama_cpp. Usage: python scripts/golden/make_golden_tokens.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from harness import data
from harness.tokenizer import gguf_path

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden"
CORPORA = {
    "wikitext2": data.wikitext2_text,
    "ptb": lambda: data.ptb_text("test"),
    "c4": data.c4_text,
}
STRINGS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t\tx",
    "Hello world",
    "  leading and trailing  ",
    "a\n\nb\n \n c",
    "x  \n y\n",
    "It's we'll THEY'RE",
    "12345 3.14 1,000,000",
    "½ ² ٣ ៤ Ⅻ",
    "héllo wörld — “quotes” …",
    "日本語のテキスト 中文",
    "emoji 🤖👍🏽 ok",
    "▁already▁escaped",
    "<unk> <eos> <bos> <|endoftext|> <|im_start|>",
    "<b>bold</b> <h1>x</h1>",
    "\u00a0nbsp\u2009thin",
    "tab\tsep\tvalues",
    "zero\u200bwidth",
    "Ĳ ﬁ ｆｕｌｌ",
    "ARC: Question: Which?\nAnswer: yes",
]


def _ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    texts = {name: fn() for name, fn in CORPORA.items()}
    for model in ("smollm2", "gemma3"):
        path = gguf_path(model)
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        out = {
            "model": model,
            "gguf": path.name,
            "llama_cpp_python": llama_cpp.__version__,
            "call": "Llama(vocab_only=True).tokenize(text, add_bos=True, special=False)",
            "corpora": {},
            "strings": [],
        }
        for name, text in texts.items():
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            out["corpora"][name] = {
                "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "count": len(ids),
                "ids_sha256": _ids_sha256(ids),
                "head": ids[:512],
                "tail": ids[-512:],
            }
        for s in STRINGS:
            out["strings"].append(
                {"text": s, "ids": llm.tokenize(s.encode("utf-8"), add_bos=True, special=False)}
            )
        dest = OUT / f"tokens_{model}.json"
        dest.write_text(
            json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
        )
        counts = {k: v["count"] for k, v in out["corpora"].items()}
        print(dest, dest.stat().st_size, "bytes", counts)


if __name__ == "__main__":
    main()
