"""Numerics benchmark: quantize + dequantize throughput of the jitted core.

For INT4 g128, NF4 g64 and MXFP4 on a 4096×4096 float32 matrix it prints GB/s (input
bytes / wall time of one quantize→dequantize round trip) beside a plain NumPy
implementation of the same operation and a plain array copy, all measured in this run,
and the ratios. Targets (issue 2): faster than NumPy, and ≥ 1/4 of copy bandwidth.

    .venv/bin/python scripts/bench_numerics.py [--n 4096 --repeats 10]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from numerics.config import QuantConfig, mx, rtn
from numerics.formats import normal_float
from numerics.quantize import quantize

CONFIGS = {
    "INT4 g128": rtn(4, group_size=128),
    "NF4 g64": QuantConfig(format="nf4", granularity="group", group_size=64),
    "MXFP4": mx("mxfp4"),
}


# ----------------------------------------------------------------- NumPy baselines (same math)
def np_int4_g128(x):
    g = x.reshape(x.shape[0], -1, 128)
    s = np.abs(g).max(-1, keepdims=True) / 7
    s = np.where(s > 0, s, 1).astype(np.float32)
    q = np.clip(np.rint(g / s), -7, 7)
    return (q * s).reshape(x.shape)


_NF4 = normal_float(4).values().astype(np.float32)
_NF4_MID = (_NF4[1:] + _NF4[:-1]) / 2


def np_nf4_g64(x):
    g = x.reshape(x.shape[0], -1, 64)
    s = np.abs(g).max(-1, keepdims=True)
    s = np.where(s > 0, s, 1).astype(np.float32)
    idx = np.searchsorted(_NF4_MID, g / s)
    return (_NF4[idx] * s).reshape(x.shape)


def np_mxfp4(x):
    g = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(g).max(-1, keepdims=True)
    e = np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2
    s = np.where(amax > 0, np.exp2(e), 1).astype(np.float32)
    y = np.clip(g / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (y * s).reshape(x.shape)


NUMPY = {"INT4 g128": np_int4_g128, "NF4 g64": np_nf4_g64, "MXFP4": np_mxfp4}


def timeit(fn, repeats):
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description="quantize+dequantize throughput")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    xn = np.random.default_rng(0).standard_normal((args.n, args.n), dtype=np.float32)
    xj = jnp.asarray(xn)
    gb = xn.nbytes / 1e9
    t_np_copy = timeit(lambda: xn.copy(), args.repeats)
    jcopy = jax.jit(lambda a: a * jnp.float32(1.0))  # XLA materialises a new buffer
    t_j_copy = timeit(lambda: jcopy(xj).block_until_ready(), args.repeats)
    copy_bw = gb / min(t_np_copy, t_j_copy)
    print(f"device: {jax.devices()[0].device_kind}, {args.n}x{args.n} float32 ({gb * 1e3:.0f} MB)")
    print(
        f"copy bandwidth: numpy {gb / t_np_copy:.2f} GB/s, jax {gb / t_j_copy:.2f} GB/s "
        f"(baseline = the faster, {copy_bw:.2f} GB/s)\n"
    )
    print("| op | lowbit jit GB/s | NumPy GB/s | vs NumPy | vs copy | codes ≠ NumPy |")
    print("|---|---|---|---|---|---|")
    for name, cfg in CONFIGS.items():
        f = jax.jit(lambda a, c=cfg: quantize(a, c).dequantize())
        t_j = timeit(lambda f=f: f(xj).block_until_ready(), args.repeats)
        t_n = timeit(lambda name=name: NUMPY[name](xn), max(2, args.repeats // 3))
        # codes that differ (XLA may evaluate x/s as x·(1/s): rare near-ties round the
        # other way); 1-ulp float differences of the dequantized values are not counted
        differ = float(np.mean(~np.isclose(np.asarray(f(xj)), NUMPY[name](xn), rtol=1e-5, atol=0)))
        print(
            f"| {name} | {gb / t_j:.2f} | {gb / t_n:.2f} | {t_n / t_j:.1f}x | "
            f"{(gb / t_j) / copy_bw:.2f} | {differ:.1e} |"
        )


if __name__ == "__main__":
    main()
