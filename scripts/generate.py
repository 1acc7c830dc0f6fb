"""Generate text with a KV cache: the full-precision cache or any kv_cache method's.

PYTHONPATH=. .venv/bin/python scripts/generate.py --model smollm2 --prompt "The capital of France"
PYTHONPATH=. .venv/bin/python scripts/generate.py --method kivi --bits 4 --max-tokens 64
PYTHONPATH=. .venv/bin/python scripts/generate.py --method kivi --temperature 0.8 --seed 1

Prints the generated text, the decode speed (tokens/s over the steps after the first, which
compiles; the prompt's prefill is not counted) and the cache's bytes per token: what the
method stores (``KVQuant.bits_per_element`` at the final length, both sides, every layer) and
what the decoder allocated (the fixed-capacity store, rings and sinks, over its capacity).
"""

import argparse
import time

import numpy as np

from harness import kvcache
from harness.calibration import c4_calibration
from harness.decode import Decoder
from harness.pipeline import MODELS, load
from methods.base import get_method
from methods.compare import config_for


def kv_hooks(name: str, model, params, tok, bits: int | None, *, n_calib: int = 16,
             calib_seqlen: int = 512):  # fmt: skip
    """``(hooks, label)`` of a kv_cache method at its config defaults (``bits`` replaced)."""
    method = get_method(name)
    if method.kind != "kv_cache":
        raise ValueError(f"{name} is a {method.kind} method; generate takes kv_cache methods")
    cfg = method.config() if bits is None else config_for(method, bits, None)
    calib = None
    if method.needs:  # calibrated caches read C4 statistics
        calib = c4_calibration(tok, n_samples=n_calib, seqlen=calib_seqlen, seed=0)
    q = method.quantize_model(params, model.cfg, calib, cfg)
    return q.hooks, f"{name} {cfg}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--method", default="fp", help="fp, or a kv_cache method (kivi, ...)")
    ap.add_argument("--bits", type=int, default=None, help="the method's code bits (its default)")
    ap.add_argument("--prompt", default="The history of the printing press")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity", type=int, default=2048)
    ap.add_argument("--attention", choices=["reference", "kernel"], default="reference")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, params, tok = load(args.model)
    label = "full precision"
    if args.method != "fp":
        hooks, label = kv_hooks(args.method, model, params, tok, args.bits)
        model = type(model)(model.cfg, hooks)
    elif args.bits is not None:
        raise ValueError("--bits needs a --method (fp is the 16-bit cache)")
    print(f"{MODELS[args.model][0]}, cache: {label} (loaded in {time.perf_counter() - t0:.1f} s)")
    dec = Decoder(model, args.capacity, attention=args.attention)
    ids = tok.encode(args.prompt)
    out = dec.generate(params, np.asarray([ids], np.int32), max_new_tokens=args.max_tokens,
                       temperature=args.temperature, seed=args.seed,
                       stop_token=tok.eos_id)  # fmt: skip
    gen = out.tokens[0].tolist()
    print("---")
    print(args.prompt + tok.decode(gen))
    print("---")
    timed = out.step_seconds[1:]  # the first step compiles
    if timed:
        print(f"decode: {len(timed) / sum(timed):.1f} tokens/s ({len(timed)} steps after a "
              f"warm-up step; prompt {len(ids)} tokens)")  # fmt: skip
    else:
        print("decode: too few steps to time (need max-tokens >= 3)")
    c = model.cfg
    kvq = kvcache.FULL if model.hooks.kv_quant is None else model.hooks.kv_quant
    n = out.state.length
    bits = kvq.bits_per_element(n, c.head_dim)
    stored = 2 * c.n_layers * c.n_kv_heads * c.head_dim * bits / 8
    print(
        f"cache: {stored:.0f} B/token as stored ({bits:.3f} bits/element at {n} tokens); "
        f"{out.cache_bytes / args.capacity:.0f} B/token allocated "
        f"({out.cache_bytes / 2**20:.2f} MiB for capacity {args.capacity})"
    )


if __name__ == "__main__":
    main()
