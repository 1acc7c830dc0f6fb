"""Where GPTQ's time goes on SmolLM2-135M: calibration forward + Hessians vs column solves,
compared with the evaluation forward's tokens/s on the same tokens (issue 4, "Speed").

The real walk (``methods.gptq.quantize_model``: true-sequential, one block at a time) is timed
with light wrappers around ``harness.capture.block_stats`` (the four capture passes: q/k/v's
input, then — after the previous groups are quantized — o, gate/up and down's inputs, each
reduced to Hessians), ``BlockCalibration.cache_attention`` (the one attention pass per block,
after q/k/v are quantized), ``BlockCalibration.cache_down_input`` (down_proj's input, once
gate/up are quantized) and ``BlockCalibration.outputs`` (the quantized block's forward that feeds
the next block, reusing both caches); the column solves are the per-layer seconds of the walk's
report. Every jitted function is compiled first by a warm-up run on one micro-batch (compilation
is reported apart).

Blocks of SmolLM2 are identical in shape, and all calibration costs are linear in the number of
tokens, so a run on ``--blocks`` blocks and ``--n-samples`` segments extrapolates to 30 blocks
and the paper's 128 × 2048 tokens; the column solves do not depend on the number of tokens.

    .venv/bin/python scripts/profile_gptq.py --n-samples 4 --blocks 4   # ~10 min on 2 busy cores
    .venv/bin/python scripts/profile_gptq.py --n-samples 128 --blocks 30  # the paper's size
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from collections import defaultdict

import jax
import jax.numpy as jnp

from harness import capture
from harness.calibration import c4_calibration
from harness.gguf_loader import load_smollm2
from harness.model import Model
from harness.tokenizer import Tokenizer
from methods.gptq import GPTQConfig, quantize_model


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load {a:.2f} {b:.2f} {c:.2f}"


@contextlib.contextmanager
def timed_capture(acc: dict[str, float]):
    """Accumulate wall time of the capture, attention and block-output passes into ``acc``."""
    BC = capture.BlockCalibration
    stats, outputs, attention = capture.block_stats, BC.outputs, BC.cache_attention
    down_in = BC.cache_down_input

    def clocked(key, fn):
        t, c = time.perf_counter(), time.process_time()
        r = jax.block_until_ready(fn())
        acc[key] += time.perf_counter() - t
        acc[key + "_cpu"] += time.process_time() - c
        return r

    def stats_t(*a, **k):
        return clocked("capture", lambda: stats(*a, **k))

    def attention_t(self, bp):
        clocked("attention", lambda: (attention(self, bp), self.mix)[1])

    def down_in_t(self, bp):
        clocked("down_in", lambda: (down_in(self, bp), self.down_in)[1])

    def outputs_t(self, bp):
        return clocked("outputs", lambda: outputs(self, bp))

    capture.block_stats, BC.outputs, BC.cache_attention = stats_t, outputs_t, attention_t
    BC.cache_down_input = down_in_t
    try:
        yield acc
    finally:
        capture.block_stats, BC.outputs, BC.cache_attention = stats, outputs, attention
        BC.cache_down_input = down_in


def eval_forward(cfg, params, tokens, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the jitted ``Model.forward`` over ``tokens`` in micro-batches
    (compiled first). CPU seconds count every thread of this process: far less sensitive to
    other processes' load on a shared machine than wall time."""
    f = jax.jit(Model(cfg).forward)
    f(params, jnp.asarray(tokens[:batch_size])).block_until_ready()
    t, c = time.perf_counter(), time.process_time()
    for s in range(0, tokens.shape[0], batch_size):
        f(params, jnp.asarray(tokens[s : s + batch_size])).block_until_ready()
    return time.perf_counter() - t, time.process_time() - c


def anatomy(cfg, n_seq: int, seqlen: int, batch_size: int) -> dict[str, float]:
    """Seconds, per block over ``n_seq`` sequences, of two pieces timed in isolation (compiled
    first, random inputs of the real shapes): the causal attention core (scores, mask, softmax,
    weighted sum) and the Hessian updates of the four input groups (q/k/v, o, gate/up: d = 576;
    down: d_ff = 1536). XLA drops the unused tail of a capture pass, so capture − forward
    under-counts the Hessians; these two numbers split the pass instead."""
    from harness.layers import causal_attention

    key = jax.random.key(0)
    B, T = batch_size, seqlen
    q = jax.random.normal(key, (B, T, cfg.n_heads, cfg.head_dim), jnp.float32)
    kv = jax.random.normal(key, (B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    att = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, scale=cfg.scale))  # in order
    hess = capture.hessian()
    dims = (cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_model, cfg.d_ff)
    xs = [jax.random.normal(key, (B, T, d), jnp.float32) for d in dims]
    upd = jax.jit(lambda states, xs: [hess.update(s, x) for s, x in zip(states, xs, strict=True)])
    states = [hess.init(d) for d in dims]
    out = {}
    for name, fn in (
        ("attention", lambda: att(q, kv, kv)),
        ("hessians", lambda: upd(states, xs)),
    ):
        jax.block_until_ready(fn())
        t = time.perf_counter()
        for _ in range(0, n_seq, batch_size):
            jax.block_until_ready(fn())
        out[name] = time.perf_counter() - t
    return out


def gptq_run(cfg, params, tokens, gcfg, batch_size: int):
    acc: dict[str, float] = defaultdict(float)
    with timed_capture(acc):
        t = time.perf_counter()
        qm = quantize_model(params, cfg, tokens, gcfg, batch_size=batch_size)
        total = time.perf_counter() - t
    acc["solves"] = sum(r["seconds"] for r in qm.report)
    acc["total"] = total
    passes = ("capture", "attention", "down_in", "outputs")
    acc["other"] = total - sum(acc[k] for k in passes) - acc["solves"]
    return dict(acc), qm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-samples", type=int, default=4, help="calibration segments (paper: 128)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=4, help="first blocks to quantize (SmolLM2: 30)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--anatomy-only", action="store_true", help="only the attention/Hessian split")
    a = ap.parse_args()

    cfg, params = load_smollm2()
    print(f"[{load()}] anatomy of a block pass ...", flush=True)
    parts = anatomy(cfg, a.n_samples, a.seqlen, a.batch_size)
    for k, v in parts.items():
        print(f"  {k:10s} {v:8.2f} s per block for {a.n_samples} x {a.seqlen} tokens  [{load()}]")
    if a.anatomy_only:
        return
    tokens = c4_calibration(Tokenizer.from_model("smollm2"), n_samples=a.n_samples, seqlen=a.seqlen)
    n_tok = tokens.size
    L = min(a.blocks, cfg.n_layers)
    cut = dataclasses.replace(cfg, n_layers=L)
    cut_params = {**params, "blocks": params["blocks"][:L]}
    gcfg = GPTQConfig(bits=a.bits, group_size=a.group_size)
    out: dict = {
        "anatomy": parts,
        "n_samples": a.n_samples,
        "seqlen": a.seqlen,
        "blocks": L,
        "config": repr(gcfg),
        "devices": str(jax.devices()),
        "cpu_count": os.cpu_count(),
    }
    print(f"SmolLM2-135M, {a.n_samples} x {a.seqlen} C4 tokens, {L}/{cfg.n_layers} blocks, {gcfg}")

    print(f"[{load()}] eval forward ...", flush=True)
    t_eval, c_eval = eval_forward(cfg, params, tokens, a.batch_size)
    out["eval_tok_s"] = n_tok / t_eval
    out["eval_tok_per_cpu_s"] = n_tok / c_eval
    out["eval_load"] = os.getloadavg()
    print(
        f"  eval forward (30 blocks + head): {t_eval:.1f} s = {n_tok / t_eval:.0f} tok/s"
        f"  [{load()}]"
    )

    print(f"[{load()}] warm-up (compiles every jitted function on one micro-batch) ...", flush=True)
    t = time.perf_counter()
    gptq_run(cut, cut_params, tokens[: a.batch_size], gcfg, a.batch_size)
    out["warmup_s"] = time.perf_counter() - t
    print(f"  warm-up: {out['warmup_s']:.1f} s  [{load()}]")

    print(f"[{load()}] GPTQ walk ...", flush=True)
    acc, qm = gptq_run(cut, cut_params, tokens, gcfg, a.batch_size)
    out["walk"] = acc
    out["walk_load"] = os.getloadavg()
    per_block = {k: v / L for k, v in acc.items()}
    tok_s = lambda sec_per_block: n_tok / (sec_per_block * cfg.n_layers)  # whole-model tokens/s
    passes = ("capture", "attention", "down_in", "outputs")
    cal_ts = sum(per_block[k] for k in passes)
    cal_cpu = sum(per_block[k + "_cpu"] for k in passes)
    rows = [
        ("attention pass (q/k/v quantized, cached)", per_block["attention"]),
        ("4 capture passes (partial forward + Hessians)", per_block["capture"]),
        ("down_proj input pass (gate/up quantized, cached)", per_block["down_in"]),
        ("block output (reuses both caches)", per_block["outputs"]),
        ("column solves (7 linears)", per_block["solves"]),
        ("other (embedding, bookkeeping)", per_block["other"]),
    ]
    print(f"\nper block, {n_tok} tokens  [{load()}]")
    for name, sec in rows:
        print(f"  {name:42s} {sec:8.2f} s")
    out["per_block"] = per_block
    ratio_ts = tok_s(cal_ts) / out["eval_tok_s"]
    ratio_cpu = tok_s(cal_cpu) / out["eval_tok_per_cpu_s"]
    scale = 128 * 2048 / n_tok
    cal_paper = cal_ts * cfg.n_layers * scale
    solves_paper = per_block["solves"] * cfg.n_layers
    out |= {
        "calib_ts_tok_s": tok_s(cal_ts),
        "calib_tok_per_cpu_s": tok_s(cal_cpu),
        "ratio_cpu": ratio_cpu,
        "ratio_true_sequential": ratio_ts,
        "extrapolated_calibration_s": cal_paper,
        "extrapolated_solves_s": solves_paper,
        "solves_over_calibration": solves_paper / cal_paper,
        "bits_per_weight": qm.bits_per_weight,
    }
    print(f"\nwhole model ({cfg.n_layers} blocks), tokens/s:")
    print(f"  eval forward                                 {out['eval_tok_s']:8.0f}")
    print(
        f"  calibration forward + Hessians (true-seq.)   {tok_s(cal_ts):8.0f}"
        f"  ({ratio_ts:.2f}x eval)"
    )
    print(
        f"  per CPU-second: eval {out['eval_tok_per_cpu_s']:.0f}, calibration "
        f"{tok_s(cal_cpu):.0f}  ({ratio_cpu:.2f}x eval)"
    )
    print("  target: >= 0.5x eval")
    print(f"\nextrapolated to 128 x 2048 tokens, {cfg.n_layers} blocks:")
    print(f"  calibration forward + Hessians {cal_paper / 60:8.1f} min")
    print(
        f"  column solves                  {solves_paper / 60:8.1f} min  "
        f"({solves_paper / cal_paper:.3f} of calibration; target <= 0.2)"
    )
    print(f"  eval forward of the same tokens {128 * 2048 / out['eval_tok_s'] / 60:7.1f} min")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
