"""Decode speed and memory with a KV cache vs the uncached forward (a benchmark, not a test).

PYTHONPATH=. LOWBIT_DATA_DIR=/work/shared/data .venv/bin/python scripts/bench_decode.py
PYTHONPATH=. .venv/bin/python scripts/bench_decode.py --contexts 512 --steps 16 --attention kernel

For each context C and cache (full precision, KIVI 4-bit, KIVI 2-bit at its defaults) the
prompt is C − steps − 1 WikiText-2 tokens, so the timed steps run with ~C tokens cached:

* ``tok/s`` — decode steps per second after one warm-up step (one sequence);
* ``peak MiB`` — the compiled step's memory (XLA's memory analysis: arguments + outputs +
  temporaries − aliased; the cache is its bulk), and ``cache MiB`` the cache arrays alone;
* ``uncached ms/tok`` — the same run's jitted forward over the whole C-token prefix, the cost
  of one new token without a cache; ``speedup`` = uncached / cached per token;
* ``compiles`` — XLA compilations during the timed steps (must be 0);
* the cost of converting KIVI's chunk-major store to the kernel's packed layout
  (``KVCodec.kernel_layout``, every layer) beside the reference path's dequantizing read.

llama.cpp's token generation on the same GGUF is the external reference when ``llama_cpp``
is importable (the optional ``golden`` extra).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from harness import kvcache
from harness.data import wikitext2_text
from harness.decode import Decoder, _step
from harness.layers import Hooks
from harness.pipeline import MODELS, load
from harness.tokenizer import gguf_path
from methods.kivi import KIVIConfig, kv_quant


def _timed(fn, n):
    fn()  # warm
    t0 = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / n


def _step_peak_mib(dec, params, st) -> float | None:
    try:
        ma = (
            _step.lower(
                dec._step_model, params, st.layers, jnp.zeros(1, jnp.int32), jnp.int32(st.length)
            )  # fmt: skip
            .compile()
            .memory_analysis()
        )
    except Exception:  # noqa: BLE001 (a backend without memory analysis)
        return None
    if ma is None:
        return None
    b = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    return (b - ma.alias_size_in_bytes) / 2**20


def _conversion_ms(kvq, dec, st, reps=5):
    """ms for every layer's kernel-layout conversion, and for the reference read."""
    L = jnp.int32(st.length)
    conv = jax.jit(lambda ls: [(kvq.key.kernel_layout(i, c["kq"]).codes,
                                kvq.value.kernel_layout(i, c["vq"]).codes)
                               for i, c in enumerate(ls)])  # fmt: skip
    read = jax.jit(lambda ls: [kvcache.read(kvq, i, c, L) for i, c in enumerate(ls)])
    return (1e3 * _timed(lambda: conv(st.layers), reps),
            1e3 * _timed(lambda: read(st.layers), reps))  # fmt: skip


def llama_cpp_line(model_name: str, n_ctx: int, steps: int) -> str:
    try:
        import llama_cpp
    except ImportError:
        return "llama.cpp: llama_cpp is not installed (the optional `golden` extra)"
    kw = dict(n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False)
    try:
        llm = llama_cpp.Llama(str(gguf_path(model_name)), use_extra_bufts=False, **kw)
    except TypeError:  # an older binding without the AMX switch
        llm = llama_cpp.Llama(str(gguf_path(model_name)), **kw)
    t0 = time.perf_counter()
    out = llm("The history of", max_tokens=steps, temperature=0.0)
    n = out["usage"]["completion_tokens"]
    rate = n / (time.perf_counter() - t0)
    return f"llama.cpp: {rate:.1f} tok/s (token generation after a short prompt)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--contexts", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--forward-reps", type=int, default=3)
    ap.add_argument("--attention", choices=["reference", "kernel"], default="reference")
    args = ap.parse_args()

    model, params, tok = load(args.model)
    ids = np.asarray(tok.encode(wikitext2_text()[:200_000]), np.int32)
    print(f"{MODELS[args.model][0]} on {jax.devices()[0].device_kind}, attention={args.attention}")
    caches = [("fp16", None), ("KIVI-4", kv_quant(KIVIConfig(bits=4))),
              ("KIVI-2", kv_quant(KIVIConfig(bits=2)))]  # fmt: skip
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: events.append(e) if e.endswith("backend_compile_duration") else None
    )
    hdr = (f"{'context':>7} {'cache':>7} {'tok/s':>7} {'ms/tok':>7} {'uncached ms/tok':>15} "
           f"{'speedup':>7} {'peak MiB':>8} {'cache MiB':>9} {'compiles':>8}")  # fmt: skip
    print(hdr)
    notes = []
    for C in args.contexts:
        fwd = jax.jit(model.forward)
        x = jnp.asarray(ids[None, :C])
        t_fwd = _timed(lambda x=x, fwd=fwd: fwd(params, x), args.forward_reps)
        for name, kvq in caches:
            m = type(model)(model.cfg, Hooks(kv_quant=kvq))
            attention = args.attention if kvq is not None else "reference"
            dec = Decoder(m, C, attention=attention)
            P = C - args.steps - 1
            _, st = dec.prefill(params, ids[None, :P])
            nxt = jnp.asarray(ids[P : P + args.steps + 1])
            lg, st = dec.step(params, st, nxt[:1])  # warm-up (compiles)
            jax.block_until_ready(lg)
            events.clear()
            t0 = time.perf_counter()
            for i in range(args.steps):
                lg, st = dec.step(params, st, nxt[i + 1 : i + 2])
            jax.block_until_ready(lg)
            t = (time.perf_counter() - t0) / args.steps
            n_comp = len(events)
            peak = _step_peak_mib(dec, params, st)
            cache = kvcache.cache_bytes(st.layers) / 2**20
            peak_s = "n/a" if peak is None else f"{peak:.1f}"
            row = (f"{C:>7} {name:>7} {1 / t:>7.1f} {1e3 * t:>7.2f} {1e3 * t_fwd:>15.1f} "
                   f"{t_fwd / t:>6.1f}x {peak_s:>8} {cache:>9.2f} {n_comp:>8}")  # fmt: skip
            print(row, flush=True)
            if kvq is not None:
                conv, read = _conversion_ms(kvq, dec, st)
                nl = model.cfg.n_layers
                notes.append(f"context {C} {name}: kernel-layout conversion {conv:.2f} ms per "
                             f"step ({nl} layers) vs the reference read {read:.2f} ms")  # fmt: skip
    for n in notes:
        print(n)
    print(llama_cpp_line(args.model, max(args.contexts), args.steps))


if __name__ == "__main__":
    main()
