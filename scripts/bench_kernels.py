"""mpGEMM benchmark: the fused dequantize-matmul kernel against XLA, on a GPU.

For M in {1, 16, 64, 256} and K = N in {4096, 8192}, and each weight format, one run prints:

* kernel time (``kernels.mpgemm``, compiled with Pallas' Triton backend);
* effective bandwidth = bytes of packed weights + scales (+ zeros) + bf16 activations, over
  the kernel time, and that as a fraction of the GPU's peak memory bandwidth, taken from the
  table ``PEAK_BW`` below by ``device_kind`` (vendor data-sheet numbers, e.g. H100 SXM
  3.35 TB/s, H200 4.8 TB/s — not measured here);
* speedup over XLA's bf16 dot on already-dequantized weights (``x @ W_bf16ᵀ``);
* speedup over XLA's own dequantize-then-dot (``jax.jit`` of ``kernels.mpgemm_reference``,
  which reads the same packed codes and lets XLA fuse what it can).

Timing: every variant runs ``C`` times per loop iteration on ``C`` different weight copies
(together ≥ 2× the L2 cache, so each call reads its weights from HBM as in decoding, not from
L2), inside one jitted ``fori_loop`` whose carry depends on every output (nothing is hoisted
or dead); time per call = (t(R₂ iterations) − t(R₁ iterations)) / ((R₂ − R₁)·C), which cancels
dispatch and launch of the loop itself. Median of 3.

Issue 5 targets on an H100: at M = 1 with INT4, ≥ 70 % of memory bandwidth and ≥ 3× the
bf16 dot. The script prints whether they are met.

    python scripts/bench_kernels.py                     # GPU, all sizes and formats
    python scripts/bench_kernels.py --formats int4_g128 --tune   # also sweep the tiles
    python scripts/bench_kernels.py --interpret --small  # CPU: interpret mode, tiny sizes

On CPU (``--interpret --small``) the script only checks that everything runs: Pallas'
interpreter is orders of magnitude slower than a compiled kernel and the CPU has no peak
bandwidth in the table, so those numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from kernels.mpgemm import mpgemm, mpgemm_reference, qarray_fields
from numerics.config import QuantConfig, mx, rtn
from numerics.quantize import quantize

# Peak HBM bandwidth in bytes/s by device_kind substring (vendor data sheets), first match wins.
PEAK_BW = [
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("GH200", 4.0e12),
    ("H100", 3.35e12),  # H100 SXM5 80 GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100-PCIE-80GB", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
]
L2_BYTES = 50 * 2**20  # H100 L2 (50 MB); H200 the same; larger than A100's 40 MB

FORMATS = {
    "int4_g128": rtn(4, group_size=128, sym=False),  # GPTQ/AWQ-style asymmetric INT4
    "int3_g128": rtn(3, group_size=128, sym=False),
    "int2_g64": rtn(2, group_size=64, sym=False),
    "nf4_g64": QuantConfig(format="nf4", granularity="group", group_size=64),
    "mxfp4": mx("mxfp4"),
}
TUNE_GRID = {"block_n": (32, 64, 128), "block_k": (128, 256), "split_k": (1, 2, 4, 8)}


def peak_bandwidth(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for key, bw in PEAK_BW:
        if key in kind:
            return bw
    return None


def time_per_call(f, x, weight_sets, *, r1: int, r2: int) -> float:
    """Seconds per ``f(x, *ws)``: see the module docstring (rotating weights, two loop
    lengths, median of 3)."""

    def seq(x, sets, reps):
        def body(i, xx):
            for ws in sets:
                y = f(xx, *ws)
                dep = jnp.where(i < 0, y[0, 0].astype(xx.dtype), jnp.zeros((), xx.dtype))
                xx = xx.at[0, 0].add(dep)  # the next call depends on this output
            return xx

        return lax.fori_loop(0, reps, body, x)

    run = jax.jit(seq)
    run(x, weight_sets, r1).block_until_ready()  # compile (reps is traced: one compilation)

    def wall(reps):
        t = time.perf_counter()
        run(x, weight_sets, reps).block_until_ready()
        return time.perf_counter() - t

    samples = [(wall(r2) - wall(r1)) / ((r2 - r1) * len(weight_sets)) for _ in range(3)]
    return max(statistics.median(samples), 1e-12)


def make_weights(cfg, K: int, N: int, copies: int, seed: int = 0):
    sets, qa = [], None
    for c in range(copies):
        W = jax.random.normal(jax.random.key(seed + c), (N, K), jnp.float32) * 0.02
        qa = quantize(W, cfg).pack(axis=1, word_bits=32)
        sets.append(qarray_fields(qa))
    return sets, qa


def bench_one(name, cfg, M, K, *, interpret, tiles, r1, r2, seed=0):
    N = K
    x = (jax.random.normal(jax.random.key(99), (M, K), jnp.float32)).astype(jnp.bfloat16)
    one, qa = make_weights(cfg, K, N, 1, seed)
    w, s, z = one[0]
    qbytes = w.nbytes + s.nbytes + (0 if z is None else z.nbytes)
    copies = 1 if interpret else max(2, -(-2 * L2_BYTES // qbytes))
    sets, qa = make_weights(cfg, K, N, copies, seed)
    fmt = qa.format
    kern = functools.partial(mpgemm, fmt=fmt, interpret=interpret, **tiles)
    fused = jax.jit(functools.partial(mpgemm_reference, fmt=fmt))

    def kernel_call(x, w, s, z):
        return kern(x, w, s, z)

    def fused_call(x, w, s, z):
        return fused(x, w, s, z)

    # bf16 weights, dequantized once outside the timed loop (XLA's plain bf16 GEMM)
    bf16_copies = 1 if interpret else max(2, -(-2 * L2_BYTES // (N * K * 2)))
    dense = [(qa.dequantize(jnp.bfloat16),) for _ in range(bf16_copies)]

    def bf16_dot(x, W):
        return jnp.dot(x, W.T, preferred_element_type=jnp.float32).astype(x.dtype)

    y_k = kern(x, w, s, z)
    y_r = fused(x, w, s, z)
    err = float(jnp.max(jnp.abs(y_k.astype(jnp.float32) - y_r.astype(jnp.float32))))
    t_k = time_per_call(kernel_call, x, sets, r1=r1, r2=r2)
    t_f = time_per_call(fused_call, x, sets, r1=r1, r2=r2)
    t_d = time_per_call(bf16_dot, x, dense, r1=r1, r2=r2)
    moved = qbytes + x.nbytes
    return {
        "format": name, "M": M, "K": K, "N": N, "tiles": tiles,
        "kernel_us": t_k * 1e6, "bytes": moved, "kernel_GBps": moved / t_k / 1e9,
        "bf16_dot_us": t_d * 1e6, "bf16_dot_GBps": (N * K * 2 + x.nbytes) / t_d / 1e9,
        "xla_fused_us": t_f * 1e6,
        "speedup_vs_bf16_dot": t_d / t_k, "speedup_vs_xla_fused": t_f / t_k,
        "max_abs_diff_vs_reference": err,
    }  # fmt: skip


def tune(name, cfg, M, K, *, interpret, r1, r2):
    best = None
    for bn, bk, sk in itertools.product(*TUNE_GRID.values()):
        tiles = {"block_n": bn, "block_k": bk, "split_k": sk}
        try:
            row = bench_one(name, cfg, M, K, interpret=interpret, tiles=tiles, r1=r1, r2=r2)
        except ValueError:  # tile does not fit this shape / group size
            continue
        if best is None or row["kernel_us"] < best["kernel_us"]:
            best = row
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (M 1,16; K=N 256)")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--tune", action="store_true", help="sweep block_n/block_k/split_k")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    peak = peak_bandwidth(dev)
    if args.small:
        Ms, Ks, r1, r2 = (1, 16), (256,), 1, 3
    else:
        Ms, Ks, r1, r2 = (1, 16, 64, 256), (4096, 8192), 10, 60
    bw = f"{peak / 1e12:.2f} TB/s (data sheet, PEAK_BW table)" if peak else "unknown"
    print(f"device: {dev.device_kind} ({dev.platform}); peak bandwidth: {bw}")
    if args.interpret or dev.platform != "gpu":
        print("NOTE: interpret mode / no GPU: the times below are NOT meaningful.")
    hdr = (f"{'format':10} {'M':>4} {'K=N':>5} {'kernel µs':>10} {'GB/s':>8} {'%peak':>6} "
           f"{'bf16 µs':>9} {'×bf16':>6} {'xla-fused µs':>12} {'×fused':>7}")  # fmt: skip
    print(hdr)
    rows = []
    for name, M, K in itertools.product(args.formats, Ms, Ks):
        cfg = FORMATS[name]
        kw = dict(interpret=args.interpret, r1=r1, r2=r2)
        row = (
            tune(name, cfg, M, K, **kw) if args.tune else bench_one(name, cfg, M, K, tiles={}, **kw)
        )
        row["peak_fraction"] = row["kernel_GBps"] * 1e9 / peak if peak else None
        row["device"] = dev.device_kind
        rows.append(row)
        pct = f"{100 * row['peak_fraction']:5.1f}%" if peak else "   n/a"
        print(f"{name:10} {M:4d} {K:5d} {row['kernel_us']:10.1f} {row['kernel_GBps']:8.1f} {pct} "
              f"{row['bf16_dot_us']:9.1f} {row['speedup_vs_bf16_dot']:6.2f} "
              f"{row['xla_fused_us']:12.1f} {row['speedup_vs_xla_fused']:7.2f}"
              + (f"  tiles={row['tiles']}" if args.tune else ""), flush=True)  # fmt: skip
    target = [r for r in rows if r["format"] == "int4_g128" and r["M"] == 1]
    if target and peak and not args.interpret:
        for r in target:
            ok_bw, ok_x = r["peak_fraction"] >= 0.70, r["speedup_vs_bf16_dot"] >= 3.0
            print(f"target INT4 M=1 K=N={r['K']}: {100 * r['peak_fraction']:.0f}% of peak "
                  f"({'met' if ok_bw else 'NOT met'}, ≥70%), {r['speedup_vs_bf16_dot']:.2f}× bf16 "
                  f"dot ({'met' if ok_x else 'NOT met'}, ≥3×)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
