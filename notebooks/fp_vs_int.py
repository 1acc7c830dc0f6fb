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
# # FP vs INT on SmolLM2's real tensors: FP8 E4M3 / E5M2 vs INT8, FP4 E2M1 vs INT4, and the LLM-FP4 format search
#
# **Papers.** ZeroQuant-FP (Wu et al., arXiv 2307.09782), LLM-FP4 (Liu et al., arXiv
# 2310.16836) and "Give Me BF16 or Give Me Death" (Kurtic et al., arXiv 2411.02355). Their
# claims, as the project's paper list (`../shared/PAPERS.md`) and the abstracts in its seed
# documents give them:
#
# * ZeroQuant-FP (abstract): "for LLMs, FP8 activation consistently outshines its integer
#   (INT8) equivalent, with the performance edge becoming more noticeable in models possessing
#   parameters beyond one billion. For weight quantization, our findings indicate that FP4
#   exhibits comparable, if not superior, performance to INT4". PAPERS.md: "FP8 activations
#   beat INT8 above 1B; FP4 ≥ INT4 weights; FP6 ≈ FP16" (A = from the abstract).
# * LLM-FP4 (abstract): "One characteristic of FP quantization is that its performance largely
#   depends on the choice of exponent bits and clipping range. In this regard, we construct a
#   strong FP-PTQ baseline by searching for the optimal quantization parameters." PAPERS.md:
#   "search exponent bits and bias per tensor; per-channel activation scale folded into the
#   weight exponent bias"; headline "LLaMA-13B W4A4 avg 63.1 vs FP 68.9 (A)".
# * Give me BF16 (abstract): "(1) FP8 weight and activation quantization (W8A8-FP) is lossless
#   across all model scales, (2) INT8 weight and activation quantization (W8A8-INT), when
#   properly tuned, incurs surprisingly low 1-3% accuracy degradation, and (3) INT4
#   weight-only quantization (W4A16-INT) is competitive with 8-bit integer weight and
#   activation quantization."
#
# **What is measured here.** Tensor error (SQNR, dB; higher is better), not task accuracy:
#
# 1. every block linear weight of SmolLM2-135M (210 matrices; two of the last block in the small run) under
#    INT8 (symmetric / asymmetric), FP8 E4M3, FP8 E5M2, INT4 (symmetric / asymmetric) and FP4
#    E2M1, each per tensor, per output channel and in groups of 64 along the input (128 does
#    not divide 576); parameter-weighted means and a per-layer-type breakdown;
# 2. the inputs of the linears of a few blocks, captured on C4 calibration segments
#    (`harness.calibration.c4_calibration`), per tensor, per token, per input channel and in
#    groups of 64 per token;
# 3. an LLM-FP4-style search (§3 of the paper: exponent bits and maximum value / exponent bias)
#    with a tensor-MSE objective: for 4 bits E1M2 / E2M1 / E3M0, for 8 bits E1M6 … E5M2, each
#    with a per-channel (weights) or per-tensor (activations) search of the clipping ratio;
#    the chosen format per layer type and the gain over fixed E2M1 / E4M3.
#
# **The weights are already 4-bit.** SmolLM2 ships as a Q4_1 GGUF: every group of 32 weights
# along the input lies on a grid `d·q + m`, q ∈ 0..15 (checked below). All weight numbers are
# re-quantization errors of that grid, not of the original bf16 weights.
#
# Set `LOWBIT_SMALL=0` for the full-size run (figures go to `notebooks/figures/`).

# %%
import time
from collections import Counter

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import SMALL, linear_weights, savefig

from harness.calibration import c4_calibration
from harness.model import default_positions
from harness.pipeline import load
from numerics.config import QuantConfig
from numerics.formats import IntFormat, get_format
from numerics.quantize import quant_error
from numerics.zoo import markdown

GROUP = 64  # divides 576 and 1536; 128 does not divide 576
W_LAYERS = (29,) if SMALL else tuple(range(30))  # blocks whose weights are measured
W_KINDS = ("q_proj", "down_proj") if SMALL else None  # None: all seven linears of a block
A_LAYERS = (29,) if SMALL else (0, 7, 14, 21, 29)  # blocks whose linear inputs are captured
# C4 calibration segments x tokens; small: 576 tokens, so activations have the weights'
# shapes (576 x 576, 576 x 1536) and the small run compiles each quantizer only once
N_SEG, SEQLEN = (9, 64) if SMALL else (8, 512)
T0 = time.perf_counter()


model, params, tok = load("smollm2")
CFG = model.cfg
WEIGHTS = linear_weights(params, CFG, W_LAYERS, W_KINDS)
NAMES = list(WEIGHTS)
N_PARAMS = sum(w.size for w in WEIGHTS.values())
print(f"SMALL={SMALL}  {len(WEIGHTS)} weight matrices, {N_PARAMS / 1e6:.1f}M parameters")


def kind(name: str) -> str:
    return name.split(".")[-1]


# %% [markdown]
# ## The data: Q4_1 groups
#
# Number of distinct values in each group of 32 consecutive weights of a row (Q4_1 stores one
# float16 step `d` and offset `m` per group and a 4-bit `q`): never more than 16.

# %%
distinct = np.concatenate(
    [
        np.count_nonzero(np.diff(np.sort(np.asarray(w).reshape(-1, 32), axis=1), axis=1), axis=1)
        + 1
        for w in WEIGHTS.values()
    ]
)
Q41_MAX_DISTINCT = int(distinct.max())
print(f"distinct values per group of 32: max {Q41_MAX_DISTINCT}, mean {distinct.mean():.2f}")

# %% [markdown]
# ## The formats
#
# Symmetric formats scale each block's absmax onto the format's largest value (INT8 ±127,
# E4M3 ±448 — OCP's E4M3 has one NaN code and no inf, E5M2 ±57344 with inf/NaN, INT4 ±7,
# E2M1 ±6); asymmetric INT maps [min, max] (widened to include 0) onto 0 … 2^b − 1 with an
# integer zero point. Scales are float32 here (the error of an fp16 scale is far below these
# errors). E5M2 has only 2 mantissa bits: a relative step of 2^-2 inside each binade.

# %%
FORMATS = {
    8: {"INT8 sym": "int8", "INT8 asym": "uint8", "FP8 E4M3": "fp8_e4m3", "FP8 E5M2": "fp8_e5m2"},
    4: {"INT4 sym": "int4", "INT4 asym": "uint4", "FP4 E2M1": "fp4_e2m1"},
}
W_GRANS = {
    "tensor": {"granularity": "tensor"},
    "channel": {"granularity": "channel", "axis": -1},  # per output channel of W[out, in]
    f"g{GROUP}": {"granularity": "group", "group_size": GROUP, "axis": -1},
}
A_GRANS = {
    "tensor": {"granularity": "tensor"},
    "token": {"granularity": "channel", "axis": -1},  # dynamic per-token scale
    "in-channel": {"granularity": "channel", "axis": 0},  # one scale per input channel
    f"g{GROUP}": {"granularity": "group", "group_size": GROUP, "axis": -1},
}


def config(fmt: str, gran: dict, **kw) -> QuantConfig:
    f = get_format(fmt)
    asym = isinstance(f, IntFormat) and not f.signed
    return QuantConfig(format=f, zero_point=asym, **gran, **kw)


def sqnr(x, cfg: QuantConfig) -> float:
    return quant_error(x, cfg)["sqnr_db"]


def weighted(rows, col, by="size"):
    """Parameter-weighted mean of a per-tensor column."""
    w = np.array([r[by] for r in rows], np.float64)
    return float(np.sum(w * np.array([r[col] for r in rows])) / w.sum())


def measure(tensors: dict, grans: dict) -> list[dict]:
    """One row per tensor: SQNR of every format x granularity."""
    rows = []
    for name, x in tensors.items():
        row = {"tensor": name, "kind": kind(name), "size": int(x.size)}
        for fmts in FORMATS.values():
            for fname, fmt in fmts.items():
                for gname, gran in grans.items():
                    row[f"{fname} | {gname}"] = sqnr(x, config(fmt, gran))
        rows.append(row)
    return rows


def summary(rows: list[dict], grans: dict) -> list[dict]:
    out = []
    for bits, fmts in FORMATS.items():
        for fname in fmts:
            out.append(
                {"bits": bits, "format": fname}
                | {g: weighted(rows, f"{fname} | {g}") for g in grans}
            )
    return out


# %% [markdown]
# ## 1. Weights
#
# Parameter-weighted mean SQNR (dB) over the weight matrices.

# %%
W_ROWS = measure(WEIGHTS, W_GRANS)
W_TABLE = summary(W_ROWS, W_GRANS)
print(markdown(W_TABLE))
print(f"[{time.perf_counter() - T0:.0f} s]")

# %% [markdown]
# By layer type (parameter-weighted within each type): FP minus INT of the same width, per
# output channel and in groups of 64. Positive = FP has the lower error.

# %%
KINDS = list(dict.fromkeys(kind(n) for n in NAMES))  # forward order
W_BY_KIND = []
for k in KINDS:
    rows = [r for r in W_ROWS if r["kind"] == k]
    row = {"layer": k}
    for g in ("channel", f"g{GROUP}"):
        row[f"E4M3 {g}"] = weighted(rows, f"FP8 E4M3 | {g}")
        row[f"E4M3-INT8 {g}"] = row[f"E4M3 {g}"] - weighted(rows, f"INT8 sym | {g}")
        row[f"E2M1 {g}"] = weighted(rows, f"FP4 E2M1 | {g}")
        row[f"E2M1-INT4sym {g}"] = row[f"E2M1 {g}"] - weighted(rows, f"INT4 sym | {g}")
        row[f"E2M1-INT4asym {g}"] = row[f"E2M1 {g}"] - weighted(rows, f"INT4 asym | {g}")
    W_BY_KIND.append(row)
print(markdown(W_BY_KIND))

# Per-tensor E4M3 SQNR range (a check of the 3-mantissa-bit bound: |error| <= 2^-4 |w| for
# every weight in E4M3's normal range, so SQNR >= 10 log10(2^8) = 24.08 dB per tensor).
E4M3_TENSOR = np.array([r["FP8 E4M3 | tensor"] for r in W_ROWS])
print(f"FP8 E4M3 per-tensor SQNR over {len(E4M3_TENSOR)} matrices: "
      f"min {E4M3_TENSOR.min():.2f}, max {E4M3_TENSOR.max():.2f} dB")  # fmt: skip

# %% [markdown]
# ## 2. Activations: the inputs of the linears
#
# C4 calibration segments run through the model block by block (one compiled block serves
# every index: all of SmolLM2's blocks are global-attention blocks with one RoPE base);
# `Model.apply_block(capture=True)` returns each linear's input. q/k/v share one input
# (`qkv_in`), as do gate/up (`gate_up_in`); `o_in` is the attention output, `down_in` the
# gated MLP hidden state. Each captured input is a `[tokens, d]` matrix.

# %%
assert not CFG.layer_types and CFG.sliding_window is None  # one block program for all indices
tokens = c4_calibration(tok, n_samples=N_SEG, seqlen=SEQLEN, seed=0)
positions = default_positions(tokens)
block_fn = jax.jit(lambda bp, h: model.apply_block(bp, 0, h, positions, capture=True))
h = jax.jit(model.embed)(params, tokens)
INPUT_OF = {"attn.q_proj": "qkv_in", "attn.o_proj": "o_in", "mlp.gate_proj": "gate_up_in",
            "mlp.down_proj": "down_in"}  # fmt: skip
ACTS = {}
for i in range(max(A_LAYERS) + 1):
    h, ins = block_fn(params["blocks"][i], h)
    if i in A_LAYERS:
        for lin, label in INPUT_OF.items():
            x = ins[lin]
            ACTS[f"blocks.{i}.{label}"] = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
print(f"{len(ACTS)} activation matrices of {N_SEG * SEQLEN} tokens; "
      f"[{time.perf_counter() - T0:.0f} s]")  # fmt: skip
ACT_STATS = []
for name, x in ACTS.items():
    ch = np.asarray(jnp.max(jnp.abs(x), axis=0))
    ACT_STATS.append({"input": name, "absmax": float(ch.max()), "median channel absmax":
                      float(np.median(ch)), "max/median": float(ch.max() / np.median(ch))})  # fmt: skip
print(markdown(ACT_STATS))

# %%
A_ROWS = measure(ACTS, A_GRANS)
A_TABLE = summary(A_ROWS, A_GRANS)
print("activations, element-weighted mean SQNR (dB)")
print(markdown(A_TABLE))
A_BY_INPUT = []
for label in INPUT_OF.values():
    rows = [r for r in A_ROWS if r["kind"] == label]
    A_BY_INPUT.append(
        {"input": label}
        | {f"{f} / {g}": weighted(rows, f"{f} | {g}")
           for f in ("INT8 sym", "FP8 E4M3", "INT4 sym", "FP4 E2M1") for g in ("tensor", "token")}
    )  # fmt: skip
print(markdown(A_BY_INPUT))
print(f"[{time.perf_counter() - T0:.0f} s]")

# %% [markdown]
# ## 3. LLM-FP4's search: exponent bits and maximum value
#
# LLM-FP4 (§3) quantizes `x` to a minifloat whose real-valued exponent bias `b` sets the
# maximum value `(2 − 2^−M)·2^(2^E − 1 − b)`; it searches the format (E/M split) and `b` —
# per output channel for weights, per tensor for activations (its "FPQ baseline"), minimizing
# the output error of the layer. With a free float scale a real-valued bias *is* a scale, so
# here the search is: for each E/M split, a clipping ratio ρ ∈ {1, 0.99, …, 0.21} of the
# block's absmax (`range="mse"`, squared error) per channel / per tensor, then the split with
# the least tensor MSE. The objective is the tensor's own MSE, not the layer output.
#
# Search spaces: 4 bits {E1M2, E2M1, E3M0}; 8 bits {E1M6, E2M5, E3M4, E4M3 (OCP), E5M2}. All
# codes are finite (as in LLM-FP4's quantizer) except OCP E4M3's one NaN code — kept so that
# the space contains the fixed baseline. ρ = 1 with E2M1 (E4M3) is the fixed baseline, so the
# search can never be worse than it.

# %%
SPACES = {
    4: {"E1M2": "fp4_e1m2", "E2M1": "fp4_e2m1", "E3M0": "fp4_e3m0"},
    8: {"E1M6": "fp8_e1m6_none", "E2M5": "fp8_e2m5_none", "E3M4": "fp8_e3m4_none",
        "E4M3": "fp8_e4m3", "E5M2": "fp8_e5m2_none"},
}  # fmt: skip
BASELINE = {4: "E2M1", 8: "E4M3"}
INT_REF = {4: "int4", 8: "int8"}


def search(x, bits: int, gran: dict) -> dict:
    fixed = sqnr(x, config(SPACES[bits][BASELINE[bits]], gran))
    found = {
        e: sqnr(x, config(f, gran, range="mse", mse_norm=2.0)) for e, f in SPACES[bits].items()
    }
    best = max(found, key=found.get)
    int_clip = sqnr(x, config(INT_REF[bits], gran, range="mse", mse_norm=2.0))
    return {"fixed": fixed, "best": best, "best SQNR": found[best],
            f"{BASELINE[bits]} clip only": found[BASELINE[bits]], "INT clip": int_clip}  # fmt: skip


SEARCH_W = {b: {n: search(w, b, W_GRANS["channel"]) for n, w in WEIGHTS.items()} for b in (4, 8)}
print(f"[{time.perf_counter() - T0:.0f} s]")
SEARCH_A = {b: {n: search(x, b, A_GRANS["tensor"]) for n, x in ACTS.items()} for b in (4, 8)}
print(f"[{time.perf_counter() - T0:.0f} s]")


def search_table(results: dict, sizes: dict, kinds: list[str]) -> list[dict]:
    rows = []
    for bits, res in results.items():
        base = BASELINE[bits]
        for k in kinds:
            names = [n for n in res if kind(n) == k]
            rs = [res[n] | {"size": sizes[n]} for n in names]
            chosen = Counter(res[n]["best"] for n in names)
            rows.append({
                "bits": bits, "layer": k, "tensors": len(names),
                "chosen (count)": " ".join(f"{e}:{c}" for e, c in sorted(chosen.items())),
                f"fixed {base} dB": weighted(rs, "fixed"),
                "searched dB": weighted(rs, "best SQNR"),
                "gain dB": weighted(rs, "best SQNR") - weighted(rs, "fixed"),
                "of which clip": weighted(rs, f"{base} clip only") - weighted(rs, "fixed"),
                "INT + clip dB": weighted(rs, "INT clip"),
            })  # fmt: skip
    return rows


W_SIZES = {n: int(w.size) for n, w in WEIGHTS.items()}
A_SIZES = {n: int(x.size) for n, x in ACTS.items()}
SEARCH_W_TABLE = search_table(SEARCH_W, W_SIZES, KINDS)
SEARCH_A_TABLE = search_table(SEARCH_A, A_SIZES, list(INPUT_OF.values()))
print("weights, per-output-channel maximum value; format chosen per matrix")
print(markdown(SEARCH_W_TABLE))
print("activations, per-tensor maximum value; format chosen per matrix")
print(markdown(SEARCH_A_TABLE))
SEARCH_MIN_GAIN = min(
    r["best SQNR"] - r["fixed"] for res in (*SEARCH_W.values(), *SEARCH_A.values())
    for r in res.values()
)  # fmt: skip
print(f"smallest per-tensor gain of the search over the fixed format: {SEARCH_MIN_GAIN:.4f} dB")

# %% [markdown]
# ## Plots

# %%
fig, axs = plt.subplots(1, 2, figsize=(12, 4))
for ax, (title, table, grans) in zip(
    axs,
    (("weights", W_TABLE, W_GRANS), ("activations (linear inputs)", A_TABLE, A_GRANS)),
    strict=True,
):
    xs = np.arange(len(table))
    width = 0.8 / len(grans)
    for j, g in enumerate(grans):
        ax.bar(xs + j * width, [r[g] for r in table], width, label=g)
    ax.set_xticks(xs + 0.4 - width / 2, [r["format"] for r in table], rotation=30, ha="right")
    ax.set(ylabel="SQNR (dB), parameter-weighted", title=f"SmolLM2-135M {title}")
    ax.legend(fontsize=8)
savefig(fig, "fp_vs_int_sqnr")

fig, ax = plt.subplots(figsize=(7, 3.5))
for bits, marker in ((4, "o"), (8, "s")):
    gains = [r["best SQNR"] - r["fixed"] for r in SEARCH_W[bits].values()]
    ax.plot(range(len(gains)), gains, marker, ms=3, label=f"{bits}-bit weights")
ax.set(xlabel="weight matrix (forward order)", ylabel="search gain over fixed format (dB)",
       title="LLM-FP4-style search of E/M split and clipping")  # fmt: skip
ax.legend(fontsize=8)
savefig(fig, "fp_vs_int_search")
print(f"total {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Reading the result
#
# `papers/fp_vs_int/README.md` quotes the full-size run; in short:
#
# * **8-bit weights:** INT8 has 7 bits of resolution across the range where E4M3 has 3
#   mantissa bits: per output channel INT8 is about 10 dB ahead of FP8 E4M3, and E5M2 is 6 dB
#   below E4M3. E4M3's error hardly depends on the granularity — a float's relative error does
#   not depend on the scale — which is why per-tensor E4M3 is as good as per-tensor INT8 or
#   better.
# * **8-bit activations:** per tensor, a few massive input channels set the INT8 step for every
#   other value and E4M3 wins by 9.5 dB (ZeroQuant-FP's direction); per token E4M3 is still
#   ahead of symmetric INT8 but not of asymmetric INT8, and with per-input-channel or per-group
#   scales INT8 is ahead.
# * **4-bit:** E2M1 beats symmetric INT4 at every granularity and asymmetric INT4 per channel;
#   in groups of 64 asymmetric INT4 (16 levels plus a zero point) is ahead on these Q4_1 weights.
# * **LLM-FP4 search:** for 4-bit weights E2M1 is already the best split and the clipping search
#   gives 0.5–0.7 dB; for per-tensor activations the search moves to E3M0 (4-bit) and E3M4
#   (8-bit) and gains 4–10 dB; 8-bit weights move to E2M5 (almost INT8).
# * **Why this may disagree with the papers:** they report task accuracy of whole models
#   (1B–405B), where what matters is the error that reaches the logits through outlier
#   channels and attention, and where INT8 activations are combined with SmoothQuant-style
#   smoothing and GPTQ; a tensor SQNR weighs every element alike. SmolLM2 is 135M (below
#   ZeroQuant-FP's "beyond one billion"), and its weights are already Q4_1.
