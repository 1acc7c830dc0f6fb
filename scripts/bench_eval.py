"""Evaluation throughput: the jitted SmolLM2 forward vs llama.cpp's prompt processing, same run.

For each seqlen L, windows of L tokens of WikiText-2 test (our tokenizer; the ids equal
llama.cpp's) are pushed through

* ``ours``: the jitted float32 forward (``Model.forward``, full ``[B, L, V]`` logits, weights
  dequantized from the GGUF), ``--batch`` windows per call, compiled ahead of time;
* ``llama.cpp pp``: llama-cpp-python (llama.cpp built from its bundled source) on the same GGUF,
  one window per ``eval`` with a cleared KV cache, ``n_batch = n_ubatch = L``, logits of the
  last token only — what llama-bench's "pp" test measures;
* ``llama.cpp all-logits``: the same with ``logits_all=True`` (logits at every position, what a
  perplexity evaluation needs and what ours computes).

The three run in alternation (``--repeats`` rounds of ``--tokens`` tokens each), so a machine whose
load changes (the 2-core development machine is shared) hurts them alike; we report the median
round. Besides wall-clock tokens/s, tokens per CPU-second of this process (``time.process_time``,
all threads; llama.cpp's spinning worker threads count too) are shown, which is far less sensitive
to other processes' load. Peak memory of ours is XLA's compiled memory analysis (arguments, i.e.
the float32 weights and tokens, + outputs + temporaries); the process's max RSS is printed at the
end (it covers both engines). XLA:CPU uses all cores; llama.cpp gets ``--threads`` (default: all
cores), so with the default both use the same cores.

``--profile`` adds a breakdown of our forward: the blocks alone (``Model.hidden``) vs the whole
forward (the difference is the final norm + lm_head), and per-token cost at each seqlen (the growth
with L is attention's T×T part).

    .venv/bin/python scripts/bench_eval.py [--seqlens 512 2048 --tokens 4096 --repeats 3]

llama-cpp-python is an optional dependency (``pip install -e .[golden]``, ~15 min build).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from harness import data, gguf_loader
from harness.pipeline import load


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


class Ours:
    """The jitted forward, compiled ahead of time for [batch, L] int32 tokens."""

    def __init__(self, f, params, windows: np.ndarray, batch: int):
        self.params, self.windows, self.batch = params, windows, batch
        x = jnp.asarray(windows[:batch])
        self.compiled = jax.jit(f).lower(params, x).compile()
        mem = self.compiled.memory_analysis()
        self.mem = (
            None
            if mem is None
            else {
                "args": mem.argument_size_in_bytes,
                "out": mem.output_size_in_bytes,
                "temp": mem.temp_size_in_bytes,
            }
        )
        self.compiled(params, x).block_until_ready()  # warm

    def run(self) -> None:
        for s in range(0, len(self.windows) - self.batch + 1, self.batch):
            self.compiled(
                self.params, jnp.asarray(self.windows[s : s + self.batch])
            ).block_until_ready()

    @property
    def tokens(self) -> int:
        return (len(self.windows) // self.batch) * self.batch * self.windows.shape[1]


class LlamaCpp:
    """llama.cpp evaluating each window from an empty KV cache."""

    def __init__(self, windows: np.ndarray, threads: int, logits_all: bool):
        import llama_cpp

        L = windows.shape[1]
        self.windows = [w.tolist() for w in windows]
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_loader.smollm2_path()),
            n_ctx=L,
            n_batch=L,
            n_ubatch=L,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )
        self.llm.reset()
        self.llm.eval(self.windows[0])  # warm

    def run(self) -> None:
        for w in self.windows:
            self.llm.reset()
            self.llm.eval(w)

    @property
    def tokens(self) -> int:
        return len(self.windows) * len(self.windows[0])


def _median_rate(tokens: int, times: list[float]) -> float:
    return tokens / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per engine per round")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (median reported)")
    ap.add_argument("--batch", type=int, default=1, help="windows per jitted call")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also time Model.hidden (no lm_head)")
    args = ap.parse_args()

    model, params, tok = load("smollm2")
    ids = np.asarray(tok.encode(data.wikitext2_text()), np.int32)
    have_llama = not args.no_llama_cpp
    if have_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            have_llama = False
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cores; "
        f"llama.cpp threads: {args.threads if have_llama else 'not installed'}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    rows = []
    for L in args.seqlens:
        n_win = max(args.batch, args.tokens // L // args.batch * args.batch)
        w = ids[: (len(ids) // L) * L].reshape(-1, L)[:n_win]
        engines = {"ours": Ours(model.forward, params, w, args.batch)}
        if args.profile:
            engines["ours blocks only"] = Ours(model.hidden, params, w, args.batch)
        if have_llama:
            engines["llama.cpp pp"] = LlamaCpp(w, args.threads, logits_all=False)
            engines["llama.cpp all-logits"] = LlamaCpp(w, args.threads, logits_all=True)
        wall = {k: [] for k in engines}
        cpu = {k: [] for k in engines}
        loads = []
        for _ in range(args.repeats):
            for k, e in engines.items():
                t, c = _timed(e.run)
                wall[k].append(t)
                cpu[k].append(c)
            loads.append(os.getloadavg()[0])
        mem = engines["ours"].mem
        peak = f"{sum(mem.values()) / 2**20:.0f}" if mem else "n/a"
        temp = f"{mem['temp'] / 2**20:.0f}" if mem else "n/a"
        for k, e in engines.items():
            rows.append(
                (
                    L,
                    k,
                    _median_rate(e.tokens, wall[k]),
                    _median_rate(e.tokens, cpu[k]),
                    len(w),
                    peak if k == "ours" else "",
                    temp if k == "ours" else "",
                    f"{min(loads):.1f}-{max(loads):.1f}",
                )
            )
        del engines
    print(
        "\n| seqlen | engine | tok/s (wall) | tok per CPU-s | windows/round | "
        "ours peak MiB (args+out+temp) | ours temp MiB | load avg |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for L, k, r, rc, n, p, t, ld in rows:
        print(f"| {L} | {k} | {r:.0f} | {rc:.0f} | {n} | {p} | {t} | {ld} |")
    rate = {(L, k): r for L, k, r, *_ in rows}
    rate_cpu = {(L, k): rc for L, k, _, rc, *_ in rows}
    if have_llama:
        print(
            "\n| seqlen | ours / llama.cpp pp (wall) | ours / llama.cpp all-logits (wall) | "
            "ours / pp (per CPU-s) | target |"
        )
        print("|---:|---:|---:|---:|---:|")
        for L in args.seqlens:
            print(
                f"| {L} | {rate[L, 'ours'] / rate[L, 'llama.cpp pp']:.2f}x | "
                f"{rate[L, 'ours'] / rate[L, 'llama.cpp all-logits']:.2f}x | "
                f"{rate_cpu[L, 'ours'] / rate_cpu[L, 'llama.cpp pp']:.2f}x | >= 2x |"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"\nprocess max RSS {rss:.0f} MiB; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
