"""Evaluation throughput: the jitted SmolLM2 forward vs llama.cpp's prompt processing.

Measures tokens/s of the jitted float32 forward (batch of windows of seqlen tokens of
WikiText-2 test) and its peak memory (XLA's compiled memory analysis: arguments + outputs +
temporaries), beside llama.cpp (llama-cpp-python, built from its bundled source) evaluating the
same windows from the same GGUF with the same thread count, in the same run. Target (issue 3):
≥ 2× llama.cpp's prompt-processing throughput.

    .venv/bin/python scripts/bench_eval.py [--seqlens 512 2048 --windows 2 --threads 2]

llama-cpp-python is an optional dependency (`pip install -e .[golden]`, ~15 min build).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from harness import data, gguf_loader
from harness.pipeline import load


def bench_jax(model, params, windows: np.ndarray, batch: int):
    fwd = jax.jit(model.forward)
    x = jnp.asarray(windows[:batch])
    compiled = fwd.lower(params, x).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    fwd(params, x).block_until_ready()  # warm
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(windows) - batch + 1, batch):
        fwd(params, jnp.asarray(windows[s : s + batch])).block_until_ready()
        n += batch * windows.shape[1]
    return n / (time.perf_counter() - t0), peak


def bench_llama_cpp(windows: np.ndarray, threads: int):
    try:
        import llama_cpp
    except ImportError:
        return None
    seqlen = windows.shape[1]
    llm = llama_cpp.Llama(
        model_path=str(gguf_loader.smollm2_path()), n_ctx=seqlen, n_batch=seqlen,
        n_ubatch=seqlen, n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    llm.reset()
    llm.eval(windows[0].tolist())  # warm
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
    return windows.size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--windows", type=int, default=4, help="windows timed per seqlen")
    ap.add_argument("--batch", type=int, default=1, help="windows per jitted call")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    model, params, tok = load("smollm2")
    ids = np.asarray(tok.encode(data.wikitext2_text()), np.int32)
    print(f"device: {jax.devices()[0].device_kind}; threads for llama.cpp: {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| seqlen | lowbit jit tok/s | peak MiB | llama.cpp tok/s | ratio |")
    print("|---|---|---|---|---|")
    for L in args.seqlens:
        w = ids[: (len(ids) // L) * L].reshape(-1, L)[: args.windows * args.batch]
        ours, peak = bench_jax(model, params, w, args.batch)
        ref = bench_llama_cpp(w[: args.windows], args.threads)
        ratio = f"{ours / ref:.2f}x" if ref else "n/a"
        peak_s = f"{peak / 2**20:.0f}" if peak else "n/a"
        print(f"| {L} | {ours:.0f} | {peak_s} | {ref:.0f} | {ratio} |" if ref else
              f"| {L} | {ours:.0f} | {peak_s} | not installed | {ratio} |")


if __name__ == "__main__":
    main()
