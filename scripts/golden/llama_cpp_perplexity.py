"""llama.cpp's perplexity (its perplexity tool's protocol) on our WikiText-2 token ids, beside ours.

Reproduces the protocol of llama.cpp's ``tools/perplexity/perplexity.cpp`` (``perplexity()``)
through llama-cpp-python (the ``golden`` extra, which builds llama.cpp from its bundled source),
so no separate llama.cpp build is needed:

* the text is tokenized once, BOS first when the GGUF says ``add_bos_token`` (Gemma 3: yes,
  SmolLM2: no); here the ids come from OUR tokenizer on ``harness.data.wikitext2_text()`` (they
  equal llama.cpp's; ``--check-tokens`` re-verifies it with llama.cpp's own tokenizer);
* chunk ``i`` is ``tokens[i·n_ctx : (i+1)·n_ctx]`` with a fresh KV cache; when the model adds BOS
  the chunk's first token is replaced by BOS for the evaluation;
* only the second half is scored: logits at positions ``n_ctx/2 … n_ctx−2`` predict the tokens at
  ``n_ctx/2+1 … n_ctx−1`` (``n_ctx − 1 − n_ctx/2`` per chunk); ppl = exp(mean NLL), NLL computed
  from llama.cpp's float32 logits (log-softmax in float64; the tool accumulates in double too);
* the tool refuses fewer than ``2·n_ctx`` tokens; so does this script.

llama.cpp settings: ``n_batch = n_ubatch = n_ctx`` (one ubatch per chunk, as the tool does for
n_ctx ≤ its default 512-token ubatch), ``n_threads``, KV cache F16 (the tool's default; ``--kv f32``
removes that rounding), flash attention off. llama.cpp multiplies the *quantized* weight blocks with
activations quantized to 8-bit blocks (Q8_0 / Q8_1 / Q8_K); ``--f32-weights`` instead runs it on an
all-F32 re-encoding of the GGUF (``make_golden_logits.write_f32_copy``), whose weights are exactly
our dequantized ones, to isolate that effect.

With ``--ours`` the same windows are also scored by our float32 forward (the windows, BOS and mask
of ``harness.evaluate.perplexity_windows(protocol="llama.cpp")``, scored by ``score_rows``, i.e.
what ``scripts/evaluate.py --protocol llama.cpp`` computes) and the per-window NLLs are compared.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python scripts/golden/llama_cpp_perplexity.py \\
        --model smollm2 --n-ctx 512 --chunks 16 --ours --json results/llama_cpp_ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import data
from harness.tokenizer import Tokenizer, gguf_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden_logits import write_f32_copy  # noqa: E402  (script beside this one)


def chunk_nlls(
    llm, tokens: np.ndarray, *, n_ctx: int, n_chunks: int, bos_id: int | None
) -> np.ndarray:
    """Summed NLL of the scored second half of each chunk, llama.cpp's protocol [n_chunks]."""
    first = n_ctx // 2
    out = np.zeros(n_chunks, np.float64)
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx].tolist()
        if bos_id is not None:
            chunk[0] = bos_id
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first : n_ctx - 1], np.float64)  # [n_ctx-1-first, V]
        target = np.asarray(chunk[first + 1 : n_ctx])
        m = logits.max(axis=1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        out[i] = float(np.sum(lse - logits[np.arange(len(target)), target]))
    return out


def our_window_nlls(
    model_name: str, tokens: np.ndarray, *, n_ctx: int, n_chunks: int, bos_id: int | None
) -> np.ndarray:
    """Summed NLL per window of our float32 forward on the same windows: the windows and masks of
    ``harness.evaluate.perplexity_windows(protocol="llama.cpp")`` scored by ``score_rows`` — the
    exact path of ``perplexity`` / ``scripts/evaluate.py --protocol llama.cpp``, kept per row."""
    from harness.evaluate import EvalConfig, perplexity_windows, score_rows
    from harness.pipeline import load, logits_fn

    model, params, _ = load(model_name)
    windows, mask = perplexity_windows(tokens, seqlen=n_ctx, protocol="llama.cpp", bos_id=bos_id)
    windows, mask = windows[:n_chunks], mask[:n_chunks]
    targets = np.concatenate([windows[:, 1:], np.zeros((len(windows), 1), np.int32)], axis=1)
    rows = [(windows[i], targets[i], mask[i]) for i in range(len(windows))]
    sums, _ = score_rows(logits_fn(model, params), rows, EvalConfig(progress=False), length=n_ctx)
    return -sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="first N chunks (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16", help="KV-cache type")
    ap.add_argument(
        "--f32-weights",
        action="store_true",
        help="run llama.cpp on an all-F32 re-encoding of the GGUF",
    )
    ap.add_argument(
        "--check-tokens",
        action="store_true",
        help="also tokenize with llama.cpp and require equal ids",
    )
    ap.add_argument("--ours", action="store_true", help="also score the windows with our forward")
    ap.add_argument("--json", type=Path, default=None, help="append the result to this JSON list")
    args = ap.parse_args()

    import llama_cpp

    if args.n_ctx < 4 or args.n_ctx % 2:
        raise ValueError(f"--n-ctx must be an even number >= 4, got {args.n_ctx}")
    tok = Tokenizer.from_model(args.model)
    text = data.wikitext2_text()
    tokens = np.asarray(tok.encode(text), np.int32)
    if len(tokens) < 2 * args.n_ctx:
        raise ValueError(f"need at least 2*n_ctx = {2 * args.n_ctx} tokens, got {len(tokens)}")
    n_max = len(tokens) // args.n_ctx
    n_chunks = n_max if args.chunks <= 0 else min(args.chunks, n_max)
    bos_id = tok.bos_id if tok.add_bos else None
    src = gguf_path(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        path = src
        if args.f32_weights:
            path = Path(tmp) / src.name
            write_f32_copy(src, path)
        kv = llama_cpp.GGML_TYPE_F16 if args.kv == "f16" else llama_cpp.GGML_TYPE_F32
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=args.n_ctx,
            n_batch=args.n_ctx,
            n_ubatch=args.n_ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            logits_all=True,
            flash_attn=False,
            type_k=kv,
            type_v=kv,
            seed=0,
            verbose=False,
        )
        if args.check_tokens:
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            if theirs != tokens.tolist():
                n = min(len(theirs), len(tokens))
                diff = next((i for i in range(n) if theirs[i] != tokens[i]), n)
                raise SystemExit(f"token ids differ from llama.cpp's at position {diff}")
            print(f"token ids equal llama.cpp's ({len(tokens)} tokens)")
        t0 = time.perf_counter()
        theirs_nll = chunk_nlls(llm, tokens, n_ctx=args.n_ctx, n_chunks=n_chunks, bos_id=bos_id)
        seconds = time.perf_counter() - t0
        del llm

    per_tok = args.n_ctx - 1 - args.n_ctx // 2
    n_scored = n_chunks * per_tok
    ppl_ref = math.exp(theirs_nll.sum() / n_scored)
    result = {
        "model": args.model,
        "gguf": src.name,
        "text": "wikitext2 test (harness.data)",
        "n_ctx": args.n_ctx,
        "chunks": n_chunks,
        "chunks_available": n_max,
        "scored_tokens": n_scored,
        "threads": args.threads,
        "kv_cache": args.kv,
        "weights": "F32 re-encoding" if args.f32_weights else "quantized (as shipped)",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_ppl": ppl_ref,
        "llama_cpp_seconds": round(seconds, 2),
        "llama_cpp_chunk_nll": (theirs_nll / per_tok).round(6).tolist(),
    }
    print(
        f"{args.model} n_ctx={args.n_ctx} chunks={n_chunks}/{n_max} kv={args.kv} "
        f"weights={result['weights']}: llama.cpp ppl {ppl_ref:.4f} ({seconds:.1f} s)"
    )
    if args.ours:
        t0 = time.perf_counter()
        ours_nll = our_window_nlls(
            args.model, tokens, n_ctx=args.n_ctx, n_chunks=n_chunks, bos_id=bos_id
        )
        ppl_ours = math.exp(ours_nll.sum() / n_scored)
        d = (ours_nll - theirs_nll) / per_tok
        result.update(
            {
                "ours_ppl": ppl_ours,
                "ours_seconds": round(time.perf_counter() - t0, 2),
                "rel_diff": ppl_ours / ppl_ref - 1.0,
                "chunk_nll_diff_mean": float(d.mean()),
                "chunk_nll_diff_absmax": float(np.abs(d).max()),
                "ours_chunk_nll": (ours_nll / per_tok).round(6).tolist(),
            }
        )
        print(
            f"ours ppl {ppl_ours:.4f}; relative difference {100 * result['rel_diff']:+.3f}%; "
            f"per-window NLL difference mean {d.mean():+.5f}, max |.| {np.abs(d).max():.5f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(old + [result], indent=1) + "\n")


if __name__ == "__main__":
    main()
