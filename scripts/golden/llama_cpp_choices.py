"""Zero-shot choice log-likelihoods: ours beside llama.cpp's on the same token rows.

For the first ``--limit`` items of a task, every lm-eval ``loglikelihood`` request is encoded once
(``harness.evaluate.encode_requests``: lm-eval's ``_encode_pair``, our tokenizer, whose ids equal
llama.cpp's) and scored twice: by our float32 forward (``score_rows``, the path of
``scripts/evaluate.py --tasks``) and by llama.cpp through llama-cpp-python (the ``golden`` extra)
on the same ids, with a fresh KV cache per request and logits at every position. Printed: the
largest |Δ log-likelihood| over requests, how many items pick the same choice, and each engine's
accuracy — so an accuracy that looks wrong (BoolQ below its majority class) can be told apart
from a harness bug: both engines see the same prompts, only the forward differs.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python scripts/golden/llama_cpp_choices.py \\
        --model smollm2 --task boolq --limit 40
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import data
from harness.evaluate import EvalConfig, encode_requests, score_rows
from harness.pipeline import load, logits_fn
from harness.tasks import TASKS
from harness.tokenizer import gguf_path


def llama_cpp_sums(llm, rows) -> np.ndarray:
    """Summed log-likelihood of the masked targets of each row, from llama.cpp's logits."""
    out = np.zeros(len(rows), np.float64)
    for i, (inputs, targets, mask) in enumerate(rows):
        llm.reset()
        llm.eval(inputs.tolist())
        logits = np.asarray(llm.scores[: len(inputs)], np.float64)[mask]
        t = targets[mask]
        m = logits.max(axis=1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        out[i] = float(np.sum(logits[np.arange(len(t)), t] - lse))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--task", choices=sorted(TASKS), default="boolq")
    ap.add_argument("--limit", type=int, default=40, help="first N items")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.limit < 1:
        raise SystemExit(f"--limit must be positive, got {args.limit}")

    import llama_cpp

    spec = TASKS[args.task]
    items = [spec.to_item(d) for d in data.load_task_docs(args.task)[: args.limit]]
    requests = [r for it in items for r in it.requests]
    model, params, tok = load(args.model)
    cfg = EvalConfig(progress=False)
    rows = encode_requests(tok, requests, cfg.max_length)
    n_ctx = max(len(r[0]) for r in rows)

    t0 = time.perf_counter()
    ours, _ = score_rows(logits_fn(model, params), rows, cfg)
    t_ours = time.perf_counter() - t0
    llm = llama_cpp.Llama(
        model_path=str(gguf_path(args.model)), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
        n_threads=args.threads, n_threads_batch=args.threads, logits_all=True,
        flash_attn=False, seed=0, verbose=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    theirs = llama_cpp_sums(llm, rows)
    t_theirs = time.perf_counter() - t0

    agree, hits_ours, hits_theirs, k = 0, 0, 0, 0
    for it in items:
        n = len(it.requests)
        p_ours, p_theirs = int(np.argmax(ours[k : k + n])), int(np.argmax(theirs[k : k + n]))
        agree += p_ours == p_theirs
        hits_ours += p_ours == it.gold
        hits_theirs += p_theirs == it.gold
        k += n
    d = np.abs(np.asarray(ours, np.float64) - theirs)
    print(f"{args.model} {args.task}, first {len(items)} items, {len(rows)} requests")
    print(
        f"  max |Δ loglik| {d.max():.4f} nats, mean {d.mean():.4f} (llama.cpp: quantized "
        "matmuls with Q8 activations, F16 KV cache)"
    )
    print(f"  same choice on {agree}/{len(items)} items")
    print(f"  acc: ours {hits_ours / len(items):.3f}, llama.cpp {hits_theirs / len(items):.3f}")
    print(f"  seconds: ours {t_ours:.1f}, llama.cpp {t_theirs:.1f}")


if __name__ == "__main__":
    main()
