"""Write the golden logits of llama.cpp for SmolLM2-135M and Gemma-3-270M (tests/golden/).

Two files per model:

* ``<model>_logits.json`` — llama.cpp on the shipped quantized GGUF (the fidelity target);
* ``<model>_f32_logits.json`` — llama.cpp on an all-F32 re-encoding of the same GGUF (every tensor
  dequantized with ``gguf.quants``, names, order and metadata unchanged). Its weights are exactly
  our loader's params, so it separates the decoder's own agreement from llama.cpp's quantized
  matmul path (8-bit activations).

Runs llama.cpp through ``llama-cpp-python==0.3.36`` (the ``golden`` extra; it builds llama.cpp from
its bundled source) on the start of WikiText-2 test, tokenized by llama.cpp itself, so the
golden-logits test does not depend on our tokenizer. For every position it stores the top-k ids
and logits, the logits of a fixed seeded subset of vocabulary ids, the log-sum-exp of the row, and
the log-probability of the next token (so perplexity agreement can be checked too).

Text: ``wiki.test.raw`` with CRLF → LF, its non-empty rows joined with "\\n\\n" (the GPTQ
protocol's join); llama.cpp's ``tokenize(add_bos=True)`` adds BOS only where the GGUF asks
(Gemma: yes, SmolLM2: no).

llama.cpp settings: one batch (``n_batch = n_ubatch = n_ctx``), F32 KV cache (so no F16 rounding
of K/V), flash attention off, ``n_threads=2``. It still multiplies quantized weight blocks with
activations quantized to 8 bits (Q8_0/Q8_1/Q8_K), which our float32 forward does not do.

Usage::

    python scripts/golden/make_golden_logits.py [--data-dir ../shared/data] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.gguf_loader import gemma3_270m_path, read_gguf, sha256_file, smollm2_path

REPO = Path(__file__).resolve().parents[2]
TOP_K = 8  # top-k ids / logits stored per position
N_SUBSET = 16  # fixed random vocabulary ids whose logits are stored at every position
MODELS = {  # name -> (GGUF locator, number of tokens)
    "smollm2": (smollm2_path, 512),
    "gemma3": (gemma3_270m_path, 600),  # > 512: crosses Gemma 3's sliding window
}


def wikitext_prefix(data_dir: Path, n_chars: int = 20_000) -> str:
    raw = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode("utf-8")
    rows = [r for r in raw.replace("\r\n", "\n").split("\n") if r.strip()]
    return "\n\n".join(rows)[:n_chars]


def write_f32_copy(src: Path, dst: Path) -> None:
    """Re-encode a GGUF with every tensor dequantized to F32 (metadata bytes copied verbatim)."""
    f = read_gguf(src)
    align = int(f.metadata.get("general.alignment", 32))
    pad = lambda n: -(-n // align) * align
    head = bytearray(b"GGUF" + struct.pack("<IQQ", f.version, len(f.tensors), len(f.metadata)))
    head += bytes(f.data[f.kv_span[0] : f.kv_span[1]])
    offset = 0
    for name, t in f.tensors.items():
        dims = list(reversed(t.shape))  # GGUF lists ne0 first
        head += struct.pack("<Q", len(name.encode())) + name.encode() + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack(
            "<IQ", 0, offset
        )  # type 0 = F32
        offset = pad(offset + 4 * int(np.prod(t.shape)))
    head += b"\0" * (pad(len(head)) - len(head))
    with open(dst, "wb") as out:
        out.write(head)
        for name in f.tensors:
            a = f.tensor(name).astype("<f4").tobytes()
            out.write(a + b"\0" * (pad(len(a)) - len(a)))


def golden(name: str, path: Path, text: str, threads: int) -> dict:
    import llama_cpp

    n_tokens = MODELS[name][1]
    n_ctx = 1024
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:n_tokens]
    assert len(tokens) == n_tokens, f"text too short: {len(tokens)} tokens"
    t0 = time.time()
    llm.reset()
    llm.eval(tokens)
    seconds = time.time() - t0
    logits = np.array(llm.scores[:n_tokens], dtype=np.float64)  # [T, V]
    V = logits.shape[1]
    top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    subset = np.sort(np.random.default_rng(0).choice(V, N_SUBSET, replace=False))
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float64)
    nxt = np.asarray(tokens[1:])
    next_logprob = logits[np.arange(n_tokens - 1), nxt] - lse[:-1]
    r4 = lambda a: np.round(np.asarray(a, dtype=np.float64), 4).tolist()
    return {
        "model": name,
        "gguf": path.name,
        "generator": "scripts/golden/make_golden_logits.py",
        "llama_cpp_python": llama_cpp.__version__,
        "settings": {
            "n_ctx": n_ctx,
            "n_batch": n_ctx,
            "n_threads": threads,
            "kv_cache": "f32",
            "flash_attn": False,
        },
        "text": "wikitext-2-raw/wiki.test.raw, CRLF->LF, non-empty rows joined with \\n\\n",
        "eval_seconds": round(seconds, 3),
        "vocab_size": V,
        "tokens": [int(t) for t in tokens],
        "top_k_ids": top.tolist(),
        "top_k_logits": r4(np.take_along_axis(logits, top, axis=1)),
        "subset_ids": subset.tolist(),
        "subset_logits": r4(logits[:, subset]),
        "logsumexp": r4(lse),
        "next_token_logprob": r4(next_logprob),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("LOWBIT_DATA_DIR", REPO.parent / "shared" / "data")),
    )
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests" / "golden")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    text = wikitext_prefix(args.data_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        path = MODELS[name][0]()
        with tempfile.TemporaryDirectory() as tmp:
            f32 = Path(tmp) / path.name  # same file name: the golden records the source GGUF
            write_f32_copy(path, f32)
            for suffix, p in (("", path), ("_f32", f32)):
                g = golden(name, p, text, args.threads)
                g["gguf_sha256"] = sha256_file(path)  # the source file, also for the F32 copy
                g["weights"] = (
                    "quantized (as shipped)" if not suffix else "all tensors re-encoded as F32"
                )
                out = args.out_dir / f"{name}{suffix}_logits.json"
                out.write_text(json.dumps(g, separators=(",", ":")) + "\n")
                kib = out.stat().st_size / 1024
                print(
                    f"{out}: {len(g['tokens'])} tokens, {kib:.0f} KiB, "
                    f"llama.cpp {g['eval_seconds']} s"
                )


if __name__ == "__main__":
    main()
