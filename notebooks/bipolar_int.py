# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bipolar-INT vs INT: value sets, exact bit-plane products, dot-product error
#
# **Paper.** Ma, Fang, Shao, Wang, *Efficient Arbitrary Precision Acceleration for Large Language
# Models on GPU Tensor Cores*, arXiv 2409.17870. Its abstract: "we introduce a novel bipolar-INT
# data format that facilitates parallel computing and supports symmetric quantization,
# effectively reducing data redundancy", and an arbitrary-precision matrix multiplication that
# "decomposes and recovers matrices at the bit level". A k-bit bipolar-INT code with bits c_i
# stands for Σ_i 2^i·b_i with b_i = 2c_i − 1 ∈ {−1, +1}: the odd integers from −(2^k − 1) to
# 2^k − 1. No code is wasted and the set is symmetric, but there is no zero.
#
# **What is checked here.** (1) The representable sets of INT and bipolar-INT at 1–4 bits and
# the lossless map between them. (2) That a bipolar-INT matrix product computed from 1-bit
# planes — Σ_i Σ_j 2^(i+j)·(n − 2·popcount(A_i XOR W_j)) — equals the direct product exactly,
# and likewise the two's-complement INT product from AND-popcounts. (3) The weight and
# dot-product error of bipolar-INT vs INT quantization at 2–4 bits on Gaussian data.
# The speed claims (GPU kernels) are out of scope here.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import SMALL, savefig

from numerics.analysis import (
    bipolar_dot_bitplanes,
    bipolar_values,
    error_stats,
    int_dot_bitplanes,
    int_to_bipolar_codes,
    int_values,
)
from numerics.config import QuantConfig, rtn
from numerics.formats import bipolar_int
from numerics.packing import bits_per_weight
from numerics.quantize import fake_quant, quantize
from numerics.zoo import markdown

DOT_SHAPE = (16, 1000, 16) if SMALL else (64, 4096, 64)  # m, n, p of the exactness check
TRIALS = 1 if SMALL else 8
ERR_SHAPE = (128, 1024) if SMALL else (4096, 4096)  # weights [out, in]
TOKENS = 32 if SMALL else 1024
GROUP = 128


print(f"SMALL={SMALL}")

# %% [markdown]
# ## 1. Representable sets
#
# Symmetric INT quantization uses the narrow range [−(2^(k−1) − 1), 2^(k−1) − 1]: 2^k − 1
# levels, the code of −2^(k−1) is never produced (and 1-bit INT has no symmetric range at all).
# Bipolar-INT uses all 2^k codes symmetrically; it spends the code INT gives to zero on one
# more level at each end (in units of its own step, ±(2^k − 1) with step 2).

# %%
SETS = []
for k in range(1, 5):
    full = np.asarray(int_values(np.arange(2**k, dtype=np.uint8), k)) if k > 1 else np.array([0, 1])
    sym = np.arange(-(2 ** (k - 1) - 1), 2 ** (k - 1)) if k > 1 else np.array([])
    bip = np.sort(np.asarray(bipolar_values(np.arange(2**k, dtype=np.uint8), k)))
    assert np.array_equal(bip, bipolar_int(k).finite_values())
    SETS.append(
        {
            "bits": k,
            "INT (two's compl.)": f"[{full.min()}, {full.max()}]",
            "INT symmetric levels": len(sym),
            "bipolar levels": len(bip),
            "bipolar values": " ".join(str(int(v)) for v in bip),
            "bipolar has 0": bool(np.any(bip == 0)),
            "bipolar symmetric": bool(np.array_equal(bip, -bip[::-1])),
        }
    )
print(markdown(SETS))

# Lossless map: the signed integer of code c equals (bipolar(c XOR 2^(k-1)) - 1) / 2.
LOSSLESS = {}
for k in range(2, 9):
    c = np.arange(2**k, dtype=np.uint8)
    x = np.asarray(int_values(c, k)).astype(np.int64)
    v = np.asarray(bipolar_values(int_to_bipolar_codes(c, k), k)).astype(np.int64)
    LOSSLESS[k] = bool(np.array_equal(2 * x, v - 1))
print("INT(c) == (bipolar(c ^ msb) - 1) / 2 for every code, k = 2..8:", LOSSLESS)

# %% [markdown]
# ## 2. Exact bit-plane products
#
# For ±1 vectors a, w of length n encoded as bits, a·w = n − 2·popcount(a XOR w). So a
# bipolar-INT product splits into k_a·k_w binary products of bit planes, each an XOR and a
# popcount (here on planes packed 32 to a uint32 word), recombined with weights 2^(i+j).
# Two's-complement INT splits the same way with AND-popcounts and a negative weight on the sign
# plane. Random codes, every pair of widths 1..4 (six of the pairs in the small run); the
# result must equal the direct int64 product to the last bit.

# %%
m, n, p = DOT_SHAPE
rng = np.random.default_rng(0)
EXACT = []
t0 = time.perf_counter()
PAIRS = (
    [(1, 1), (2, 2), (3, 3), (4, 4), (1, 4), (4, 2)]  # a sample of the width pairs when small
    if SMALL
    else [(ka, kw) for ka in range(1, 5) for kw in range(1, 5)]
)
for ka, kw in PAIRS:
    worst_bip = worst_int = 0
    for _ in range(TRIALS):
        a = rng.integers(0, 2**ka, size=(m, n)).astype(np.uint8)
        w = rng.integers(0, 2**kw, size=(n, p)).astype(np.uint8)
        direct = np.asarray(bipolar_values(a, ka), np.int64) @ np.asarray(
            bipolar_values(w, kw), np.int64
        )
        planes = np.asarray(bipolar_dot_bitplanes(a, w, ka, kw), np.int64)
        worst_bip = max(worst_bip, int(np.abs(planes - direct).max()))
        sa, sw = ka > 1, kw > 1  # 1-bit INT is unsigned {0, 1}
        direct_i = np.asarray(int_values(a, ka, signed=sa), np.int64) @ np.asarray(
            int_values(w, kw, signed=sw), np.int64
        )
        planes_i = np.asarray(int_dot_bitplanes(a, w, ka, kw, signed_a=sa, signed_w=sw))
        worst_int = max(worst_int, int(np.abs(planes_i.astype(np.int64) - direct_i).max()))
    EXACT.append(
        {
            "bits a": ka,
            "bits w": kw,
            "plane products": ka * kw,
            "max |bipolar planes - direct|": worst_bip,
            "max |INT planes - direct|": worst_int,
        }
    )
print(f"{TRIALS} random [{m}x{n}] @ [{n}x{p}] products per pair ({time.perf_counter() - t0:.1f} s)")
print(markdown(EXACT))
assert all(r["max |bipolar planes - direct|"] == 0 for r in EXACT)
assert all(r["max |INT planes - direct|"] == 0 for r in EXACT)

# %% [markdown]
# ## 3. Quantization error at 2–4 bits on Gaussian data
#
# Weights W ~ N(0, 1) of shape [out, in], quantized per group of 128 input features; inputs
# X ~ N(0, 1). INT symmetric and bipolar-INT use absmax scaling (the block maximum lands on the
# largest level), INT asymmetric uses min-max with a zero point. "+ MSE clip" searches a
# clipping ratio per group (`range="mse"`, squared error). Reported: SQNR of the weights, SQNR
# of the products X·Wᵀ with only W quantized, and with X also quantized to the same format per
# token (per group of 128 features).

# %%
kx, kw_ = jax.random.split(jax.random.key(1))
W = jax.random.normal(kw_, ERR_SHAPE, jnp.float32)
X = jax.random.normal(kx, (TOKENS, ERR_SHAPE[1]), jnp.float32)
Y = np.asarray(X @ W.T)


def configs(k):
    g = dict(granularity="group", group_size=GROUP)
    return {
        "INT sym": QuantConfig(format=f"int{k}", **g),
        "INT sym + MSE clip": QuantConfig(format=f"int{k}", range="mse", mse_norm=2.0, **g),
        "INT asym": rtn(k, group_size=GROUP, sym=False),
        "bipolar": QuantConfig(format=f"bipolar{k}", **g),
        "bipolar + MSE clip": QuantConfig(format=f"bipolar{k}", range="mse", mse_norm=2.0, **g),
    }


DOT_ERR = []
for k in (2, 3, 4):
    for name, cfg in configs(k).items():
        w_hat = fake_quant(W, cfg)
        x_hat = fake_quant(X, cfg)
        DOT_ERR.append(
            {
                "bits": k,
                "format": name,
                "levels": len(cfg.fmt.finite_values()) if not cfg.zero_point else 2**k,
                "bits/weight": bits_per_weight(quantize(W, cfg)),
                "W SQNR dB": error_stats(W, w_hat)["sqnr_db"],
                "XW^T SQNR dB (W only)": error_stats(Y, np.asarray(X @ w_hat.T))["sqnr_db"],
                "XW^T SQNR dB (X and W)": error_stats(Y, np.asarray(x_hat @ w_hat.T))["sqnr_db"],
            }
        )
print(markdown(DOT_ERR))

# %% [markdown]
# ## Plots

# %%
fig, axs = plt.subplots(1, 2, figsize=(11, 3.2))
for k in range(2, 5):
    s_int = np.arange(-(2 ** (k - 1) - 1), 2 ** (k - 1)) / (2 ** (k - 1) - 1)
    s_bip = np.sort(bipolar_int(k).finite_values()) / (2**k - 1)
    axs[0].plot(s_int, np.full_like(s_int, k + 0.12), "|", ms=12, mew=2, c="C0")
    axs[0].plot(s_bip, np.full_like(s_bip, k - 0.12), "|", ms=12, mew=2, c="C3")
axs[0].set(yticks=[2, 3, 4], xlabel="level / max level", ylabel="bits",
           title="INT symmetric (blue) vs bipolar-INT (red)")  # fmt: skip
for name in configs(2):
    rows = [r for r in DOT_ERR if r["format"] == name]
    axs[1].plot(
        [r["bits"] for r in rows], [r["XW^T SQNR dB (W only)"] for r in rows], "o-", label=name
    )
axs[1].set(xlabel="bits", ylabel="SQNR of X·W^T (dB)", title=f"Gaussian W, groups of {GROUP}")
axs[1].legend(fontsize=8)
savefig(fig, "bipolar_int")

# %% [markdown]
# ## Reading the result
#
# * The bit-plane decomposition is exact (integer arithmetic, zero difference on every pair of
#   widths), for bipolar-INT with XOR-popcounts and for two's-complement INT with AND-popcounts;
#   both need k_a·k_w binary plane products. Signed INT and bipolar-INT of the same width are
#   affine images of each other (flip the sign bit), so the conversion is lossless.
# * With absmax scaling, bipolar-INT's extra level helps most at 2 bits, where symmetric INT
#   has only {−1, 0, +1}; the gain over symmetric INT shrinks as the width grows. MSE clipping
#   helps both, and the asymmetric INT (one more level, plus a zero point per group) is the
#   other natural comparison. Gaussian data has no exact zeros, so bipolar-INT's missing zero
#   costs nothing here; on sparse data it would. See the table for the measured numbers; the paper reports speed, not error,
#   so there is no published error number to set beside them.
