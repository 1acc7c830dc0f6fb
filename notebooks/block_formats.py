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
# # Block formats on SmolLM2: BFP, block minifloat and MX at blocks of 16 / 32 / 64, and K-sort for the key cache
#
# **Papers.** (1) Zhang et al., *Revisiting Block-based Quantisation: What is Important for
# Sub-8-bit LLM Inference?*, arXiv 2310.05079 — the project's paper list
# (`../shared/PAPERS.md`) summarises it as "block floating point / block minifloat / block
# logarithm with shared scaling offsets". (2) Trukhanov & Soloveychik, *Accurate Block
# Quantization in LLMs with Outliers*, arXiv 2403.20137 — PAPERS.md: "K-sort channel
# reordering + BFP12 blocks of 32/64", headline "2× K-cache saving (A)"; its abstract: "We
# exploit the common channel-wise patterns exhibited by the outliers to rearrange them in such
# a way, that their quantization quality is significantly improved. The methodology yields 2x
# savings in the memory footprint without significant degradation of the model's accuracy."
# K-sort sorts the rows of W_k by their norms and reorders W_q the same way, so q·kᵀ is
# unchanged. (3) OCP Microscaling (MX) v1.0 — PAPERS.md: "shared E8M0 exponent over blocks of
# 32; MXFP4/6/8, MXINT8".
#
# **The formats** (all from `numerics.config`: `block_fp`, `block_minifloat`, `mx`). A block of
# b elements along the reduction axis shares one 8-bit power-of-two scale (E8M0): BFP has
# two's-complement integer mantissas (BFP12 = 4-bit mantissas, the format of 2403.20137;
# BFP14 = 6-bit), block minifloat has minifloat elements (5-bit E2M2 and E3M1 here — element
# choices of this notebook, not the paper's grid), MX is the OCP set (MXFP8 E4M3 / E5M2,
# MXFP6 E3M2 / E2M3, MXFP4 = E2M1, MXINT8 = BFP with 8-bit mantissas) at b = 32, and the same
# elements at b = 16 and 64. For reference: INT4 and FP4 E2M1 with a float16 scale per block.
#
# **Measured.** (1) SQNR and bits per weight (`numerics.packing.bits_per_weight`) on every block
# linear weight of SmolLM2-135M (already Q4_1: 16 levels per group of 32 — these are
# re-quantization errors). (2) The post-RoPE keys that the KV cache holds, captured on C4
# segments, blocked along each head's 64 channels, with and without K-sort: channels sorted
# within each head by W_k's row norm (the paper's statistic) or by each channel's RMS on
# separate calibration segments, then blocked. The reorder is compensated by permuting q the
# same way; the equality of q·kᵀ is checked numerically.
#
# Set `LOWBIT_SMALL=0` for the full-size run (figures go to `notebooks/figures/`).

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import SMALL, linear_weights, savefig

from harness.calibration import c4_calibration
from harness.layers import apply_rope, causal_attention
from harness.model import default_positions
from harness.pipeline import load
from numerics.config import QuantConfig, block_fp, block_minifloat, mx
from numerics.packing import bits_per_weight
from numerics.quantize import fake_quant, quant_error, quantize
from numerics.zoo import markdown

BLOCKS = (16, 32, 64)
W_LAYERS = (29,) if SMALL else tuple(range(30))  # blocks whose weights are measured
W_KINDS = ("down_proj",) if SMALL else None  # None: all seven linears of a block
N_CAL, N_EVAL, SEQLEN = (2, 2, 64) if SMALL else (8, 4, 512)  # C4 segments (seed 0 / seed 1)
T0 = time.perf_counter()


model, params, tok = load("smollm2")
CFG = model.cfg
WEIGHTS = linear_weights(params, CFG, W_LAYERS, W_KINDS)
NAMES = list(WEIGHTS)
print(f"SMALL={SMALL}  {len(WEIGHTS)} weight matrices, "
      f"{sum(w.size for w in WEIGHTS.values()) / 1e6:.1f}M parameters")  # fmt: skip

# %% [markdown]
# ## The formats and their storage
#
# Bits per element = element bits + 8 / b for the E8M0 scale (16 / b for a float16 scale).
# MXINT8 is BFP with 8-bit mantissas: the two configs are the same object.

# %%


def f16_group(fmt: str, b: int) -> QuantConfig:
    return QuantConfig(format=fmt, granularity="group", group_size=b, scale_dtype="float16")


FORMATS = {  # name -> (family, block size -> config)
    "BFP12 (INT4 mant.)": ("BFP", lambda b: block_fp(4, b)),
    "BFP14 (INT6 mant.)": ("BFP", lambda b: block_fp(6, b)),
    "BM5 E2M2": ("block minifloat", lambda b: block_minifloat("fp5_e2m2", b)),
    "BM5 E3M1": ("block minifloat", lambda b: block_minifloat("fp5_e3m1", b)),
    "MXFP4 (E2M1)": ("MX", lambda b: mx("mxfp4").replace(group_size=b)),
    "MXFP6 E2M3": ("MX", lambda b: mx("mxfp6_e2m3").replace(group_size=b)),
    "MXFP6 E3M2": ("MX", lambda b: mx("mxfp6_e3m2").replace(group_size=b)),
    "MXFP8 E4M3": ("MX", lambda b: mx("mxfp8_e4m3").replace(group_size=b)),
    "MXFP8 E5M2": ("MX", lambda b: mx("mxfp8_e5m2").replace(group_size=b)),
    "MXINT8 (= BFP16)": ("MX", lambda b: mx("mxint8").replace(group_size=b)),
    "INT4 sym, fp16 scale": ("reference", lambda b: f16_group("int4", b)),
    "FP4 E2M1, fp16 scale": ("reference", lambda b: f16_group("fp4_e2m1", b)),
}
MXINT8_IS_BFP16 = mx("mxint8") == block_fp(8, 32)
W0 = next(iter(WEIGHTS.values()))
BPW = {
    (n, b): bits_per_weight(quantize(W0, make(b)))
    for n, (_, make) in FORMATS.items()
    for b in BLOCKS
}
print("MXINT8 config == block_fp(8, 32):", MXINT8_IS_BFP16)
print(markdown([{"format": n, "family": fam} | {f"b={b}": BPW[(n, b)] for b in BLOCKS}
                for n, (fam, _) in FORMATS.items()]))  # fmt: skip

# %% [markdown]
# ## 1. Weights
#
# Blocks along the input axis of `W[out, in]`; parameter-weighted mean SQNR (dB) over the
# matrices.

# %%
W_SQNR = {}  # (format, b) -> per-matrix SQNR
for n, (_, make) in FORMATS.items():
    for b in BLOCKS:
        W_SQNR[(n, b)] = np.array([quant_error(w, make(b))["sqnr_db"] for w in WEIGHTS.values()])
SIZES = np.array([w.size for w in WEIGHTS.values()], np.float64)
W_TABLE = [
    {"format": n}
    | {f"SQNR b={b}": float(np.sum(SIZES * W_SQNR[(n, b)]) / SIZES.sum()) for b in BLOCKS}
    | {f"bits b={b}": BPW[(n, b)] for b in BLOCKS}
    for n in FORMATS
]
print(markdown(W_TABLE))
print(f"[{time.perf_counter() - T0:.0f} s]")

# %% [markdown]
# **Clipping by the shared exponent.** The MX rule (OCP v1.0 §6.3, `numerics.ranges`) sets the
# block scale to 2^(⌊log2 amax⌋ − e_max): the block maximum lands in [2^e_max, 2^(e_max+1)) of
# the element grid, and whatever exceeds the element's largest value (E4M3 448 of [256, 512),
# E2M1 6 of [4, 8), INT8 127 of [64, 128)) is clamped. How many weights are clamped, and what
# share of the squared error they carry (first matrices of the list):

# %%
CLIP_NAMES = NAMES[: min(len(NAMES), 7)]
CLIP = []
for n in (
    "MXFP8 E4M3",
    "MXFP8 E5M2",
    "MXFP6 E3M2",
    "MXFP6 E2M3",
    "MXFP4 (E2M1)",
    "MXINT8 (= BFP16)",
):
    row = {"format": n}
    for b in BLOCKS:
        cfg = FORMATS[n][1](b)
        n_clip = e2_clip = e2_all = count = 0.0
        for name in CLIP_NAMES:
            w = WEIGHTS[name]
            qa = quantize(w, cfg)
            y = np.abs(np.asarray(w)).reshape(w.shape[0], -1, b)
            over = y / np.asarray(qa.scale_array())[..., None] > cfg.fmt.max_abs
            e2 = ((np.asarray(qa.dequantize()) - np.asarray(w)) ** 2).reshape(y.shape)
            n_clip, count = n_clip + over.sum(), count + over.size
            e2_clip, e2_all = e2_clip + e2[over].sum(), e2_all + e2.sum()
        row[f"clamped b={b}"] = float(n_clip / count)
        row[f"err share b={b}"] = float(e2_clip / e2_all)
    CLIP.append(row)
print(markdown(CLIP))

# %% [markdown]
# ## 2. Keys: capture q and k after RoPE
#
# Calibration segments (seed 0) give the K-sort statistic; the errors are measured on other
# segments (seed 1). Each block runs with `Model.apply_block(capture=True)`; q and k are
# recomputed from the captured q/k/v input (`x @ W_qᵀ`, `x @ W_kᵀ`, split into heads, then
# `harness.layers.apply_rope` with the model's frequencies) — the cache holds these keys. The
# recomputation is checked against the model: attention over the recomputed q, k, v must give
# the captured input of o_proj.

# %%
assert not CFG.layer_types and CFG.sliding_window is None  # one block program for all indices
H, KV, D = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
INV_FREQ = CFG.rope_inv_freq(0)


def heads(x, w, n):
    y = jnp.einsum("btd,od->bto", x, w)
    return y.reshape(x.shape[0], x.shape[1], n, D)


def make_block_qkv(positions):
    def block_qkv(bp, h):
        out, ins = model.apply_block(bp, 0, h, positions, capture=True)
        x, a = ins["attn.q_proj"], bp["attn"]
        q = apply_rope(heads(x, a["q_proj"], H), positions, INV_FREQ)
        k = apply_rope(heads(x, a["k_proj"], KV), positions, INV_FREQ)
        v = heads(x, a["v_proj"], KV)
        o = causal_attention(q, k, v, positions, scale=CFG.scale)
        err = jnp.max(jnp.abs(o.reshape(ins["attn.o_proj"].shape) - ins["attn.o_proj"]))
        return out, q, k, err / jnp.max(jnp.abs(ins["attn.o_proj"]))

    return jax.jit(block_qkv)


def capture_qk(seed: int, n: int):
    tokens = c4_calibration(tok, n_samples=n, seqlen=SEQLEN, seed=seed)
    positions = default_positions(tokens)
    f = make_block_qkv(positions)
    h = jax.jit(model.embed)(params, tokens)
    qs, ks, errs = [], [], []
    for i in range(CFG.n_layers):
        h, q, k, err = f(params["blocks"][i], h)
        qs.append(q)
        ks.append(k)
        errs.append(float(err))
    return qs, ks, max(errs)


_, K_CAL, _ = capture_qk(0, N_CAL)
Q_EVAL, K_EVAL, ATTN_REL_ERR = capture_qk(1, N_EVAL)
print(f"attention over recomputed q, k, v vs the model's o_proj input: max rel. diff "
      f"{ATTN_REL_ERR:.1e}; [{time.perf_counter() - T0:.0f} s]")  # fmt: skip
ch_absmax = np.stack([np.asarray(jnp.max(jnp.abs(k), axis=(0, 1))) for k in K_EVAL])  # [L,KV,D]
print("key channels: max/median of per-channel absmax within a head, mean over layers x heads:",
      f"{np.mean(ch_absmax.max(-1) / np.median(ch_absmax, -1)):.2f}")  # fmt: skip

# %% [markdown]
# ## K-sort
#
# For each layer and key head a permutation π of the 64 channels: descending W_k row norm
# (2403.20137's K-sort, data-free) or descending RMS of the post-RoPE key channel on the
# calibration segments. Blocks of b then hold channels of similar magnitude. The keys are
# stored permuted, `k[..., π]`; the query is permuted the same way, `q[..., π]` — for every
# query head of the key head's group — and `q[π]·k[π] = q·k` exactly in real arithmetic. (In
# a model, permuting the rows of W_k and W_q by π and RoPE's pairing and frequencies with
# them is the same thing at no run-time cost.) At b = 64 = head_dim a block is the whole head,
# so sorting within a head cannot change anything — a check of the plumbing.

# %%


def w_norm_perm(i: int) -> np.ndarray:
    wk = np.asarray(params["blocks"][i]["attn"]["k_proj"]).reshape(KV, D, -1)
    return np.argsort(-np.linalg.norm(wk, axis=-1), axis=-1, kind="stable")


def rms_perm(i: int) -> np.ndarray:
    rms = np.sqrt(np.mean(np.asarray(K_CAL[i], np.float64) ** 2, axis=(0, 1)))  # [KV, D]
    return np.argsort(-rms, axis=-1, kind="stable")


SORTS = {"none": None, "W_k row norm": w_norm_perm, "calib. RMS": rms_perm}


def permute(x, perm):
    """``x[..., h, π_h]`` for heads ``h``; ``perm`` [n_heads, D] (query heads: repeat it)."""
    return jnp.take_along_axis(x, jnp.broadcast_to(jnp.asarray(perm), x.shape), axis=-1)


def key_sqnr(k, cfg) -> float:
    return quant_error(k.reshape(-1, D), cfg)["sqnr_db"]


K_FORMATS = ("BFP12 (INT4 mant.)", "BFP14 (INT6 mant.)", "MXFP4 (E2M1)", "MXFP6 E2M3",
             "MXFP8 E4M3", "MXINT8 (= BFP16)")  # fmt: skip
K_SQNR = {}  # (format, b, sort) -> per-layer SQNR
PERMS = {s: [None if f is None else f(i) for i in range(CFG.n_layers)] for s, f in SORTS.items()}
for s in SORTS:
    ks = [k if PERMS[s][i] is None else permute(k, PERMS[s][i]) for i, k in enumerate(K_EVAL)]
    for n in K_FORMATS:
        for b in BLOCKS:
            cfg = FORMATS[n][1](b)
            K_SQNR[(n, b, s)] = np.array([key_sqnr(k, cfg) for k in ks])
K_TABLE = [
    {"format": n, "block": b, "bits/elem": BPW[(n, b)]}
    | {f"{s} dB": float(K_SQNR[(n, b, s)].mean()) for s in SORTS}
    | {"gain (calib.)": float(np.mean(K_SQNR[(n, b, "calib. RMS")] - K_SQNR[(n, b, "none")]))}
    for n in K_FORMATS
    for b in BLOCKS
]
print("post-RoPE keys, SQNR (dB) averaged over the 30 layers")
print(markdown(K_TABLE))
print(f"[{time.perf_counter() - T0:.0f} s]")

# %% [markdown]
# ### q·kᵀ under the permutation, and the attention-score error
#
# Scores `S = q·kᵀ` per query head (GQA: query head j reads key head j // 3) at causal
# positions. (1) Exact arithmetic: `S` from `(q[π], k[π])` against `S` from `(q, k)`; float32
# sums in another order may differ by at most 2·γ₆₄·Σ|q_i k_i| (γ_n = n·u/(1 − n·u),
# u = 2⁻²⁴). (2) With BFP12 keys: the score SQNR with and without K-sort. (3) b = 64: the
# dequantized sorted keys, un-permuted, equal the unsorted quantization bit for bit.

# %%
GROUP = H // KV
CAUSAL = jnp.tril(jnp.ones((SEQLEN, SEQLEN), bool))[None, None]  # [1, 1, t, s]
U = 2.0**-24
GAMMA = D * U / (1 - D * U)


def scores(q, k):
    return jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, GROUP, axis=2))


def masked_sqnr(s, s_hat) -> float:
    e = jnp.where(CAUSAL, s_hat - s, 0.0)
    sig = jnp.sum(jnp.where(CAUSAL, s, 0.0) ** 2)
    return float(10 * jnp.log10(sig / jnp.sum(e**2)))


SCORE_LAYERS = (0, 15, 29) if SMALL else tuple(range(CFG.n_layers))
PERM_RATIO, PERM_REL = 0.0, 0.0  # max |ΔS| / bound, max |ΔS| / max |S|
S_SQNR = {}  # (b, sort) -> per-layer score SQNR with BFP12 keys
E_KEY, E_QW = {}, {}  # (b, sort) -> Σ e², Σ E[q²]·e² over channels (summed over layers)
QK_CORR = []  # per layer and key head: correlation over channels of E[q²] and E[k²]
for i in SCORE_LAYERS:
    q, k = Q_EVAL[i], K_EVAL[i]
    S = scores(q, k)
    for s in SORTS:
        perm = PERMS[s][i]
        qp, kp = (
            (q, k) if perm is None else (permute(q, np.repeat(perm, GROUP, 0)), permute(k, perm))
        )
        if perm is not None:
            dS = jnp.abs(scores(qp, kp) - S)
            bound = 2 * GAMMA * scores(jnp.abs(q), jnp.abs(k))
            PERM_RATIO = max(PERM_RATIO, float(jnp.max(dS / jnp.maximum(bound, 1e-30))))
            PERM_REL = max(PERM_REL, float(jnp.max(dS) / jnp.max(jnp.abs(S))))
        q2 = jnp.mean(qp**2, axis=(0, 1)).reshape(KV, GROUP, D).mean(axis=1)  # [KV, D]
        if perm is None:
            k2 = np.asarray(jnp.mean(kp**2, axis=(0, 1)))
            QK_CORR += [np.corrcoef(np.asarray(q2)[j], k2[j])[0, 1] for j in range(KV)]
        for b in (16, 32):
            kq = fake_quant(kp.reshape(-1, D), block_fp(4, b)).reshape(kp.shape)
            S_SQNR.setdefault((b, s), []).append(masked_sqnr(S, scores(qp, kq)))
            e2 = jnp.mean((kq - kp) ** 2, axis=(0, 1))  # [KV, D] per-channel key error
            E_KEY[(b, s)] = E_KEY.get((b, s), 0.0) + float(jnp.sum(e2))
            E_QW[(b, s)] = E_QW.get((b, s), 0.0) + float(jnp.sum(q2 * e2))
print(f"q·kᵀ with (q[π], k[π]) vs (q, k): max |ΔS| = {PERM_REL:.1e} of max |S|, "
      f"{PERM_RATIO:.3f} of the float32 reordering bound")  # fmt: skip
S_TABLE = [
    {"BFP12 keys, block": b} | {f"{s} score dB": float(np.mean(S_SQNR[(b, s)])) for s in SORTS}
    for b in (16, 32)
]
print(markdown(S_TABLE))

# %% [markdown]
# Why the key error and the score error can disagree: a score's error is Σ_c q_c·e_c, so a
# key channel's error counts in proportion to E[q_c²]. Relative to no sorting, the change
# (dB, negative = less error) of the plain key error Σ e_c² and of the query-weighted key
# error Σ E[q_c²]·e_c², summed over layers and heads; and the correlation over channels
# between E[q²] and E[k²].

# %%
DECOMP = [
    {"BFP12 keys, block": b, "sort": s,
     "key error dB": float(10 * np.log10(E_KEY[(b, s)] / E_KEY[(b, "none")])),
     "q²-weighted key error dB": float(10 * np.log10(E_QW[(b, s)] / E_QW[(b, "none")])),
     "score SQNR change dB": float(np.mean(S_SQNR[(b, s)]) - np.mean(S_SQNR[(b, "none")]))}
    for b in (16, 32) for s in SORTS if s != "none"
]  # fmt: skip
print(markdown(DECOMP))
print(f"corr(E[q²], E[k²]) over channels: mean {np.mean(QK_CORR):.2f}, "
      f"range {np.min(QK_CORR):.2f} … {np.max(QK_CORR):.2f}")  # fmt: skip

k29, p29 = K_EVAL[-1].reshape(-1, KV, D), PERMS["calib. RMS"][-1]
kq_sorted = fake_quant(permute(k29, p29).reshape(-1, D), block_fp(4, 64)).reshape(k29.shape)
inverse = np.argsort(p29, axis=-1)
B64_MAX_DIFF = float(
    jnp.max(jnp.abs(permute(kq_sorted, inverse)
                    - fake_quant(k29.reshape(-1, D), block_fp(4, 64)).reshape(k29.shape)))
)  # fmt: skip
print(f"b = 64: max |unpermute(Q(k[π])) − Q(k)| = {B64_MAX_DIFF}")
print(f"[{time.perf_counter() - T0:.0f} s]")

# %% [markdown]
# ## Plots

# %%
fig, axs = plt.subplots(1, 2, figsize=(12, 4.2))
for n, (fam, _) in FORMATS.items():
    xs = [BPW[(n, b)] for b in BLOCKS]
    ys = [next(r for r in W_TABLE if r["format"] == n)[f"SQNR b={b}"] for b in BLOCKS]
    axs[0].plot(xs, ys, "o-" if fam != "reference" else "x--", label=n, ms=4)
axs[0].set(xlabel="bits per weight (elements + scales)", ylabel="SQNR (dB), parameter-weighted",
           title="SmolLM2 weights, blocks of 16 / 32 / 64 (right to left)")  # fmt: skip
axs[0].legend(fontsize=6, ncol=2)
for s, style in zip(SORTS, ("-", "--", ":"), strict=True):
    for b, c in ((16, "C0"), (32, "C1")):
        axs[1].plot(K_SQNR[("BFP12 (INT4 mant.)", b, s)], style, color=c, label=f"b={b}, {s}")
axs[1].set(xlabel="layer", ylabel="key SQNR (dB)", title="BFP12 post-RoPE keys, K-sort")
axs[1].legend(fontsize=7)
savefig(fig, "block_formats")
print(f"total {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Reading the result
#
# The numbers are in the printed tables; `papers/block_formats/README.md` quotes the full run.
#
# * **Block size.** Integer mantissas (BFP12, BFP14, MXINT8) gain about 1.1 dB per halving of
#   the block. Minifloat elements with a wide exponent do not: MXFP8 E4M3 is *worse* at b = 16
#   than at 64, and MXFP4 is flat. The E8M0 rule puts the block maximum in
#   [2^e_max, 2^(e_max+1)) of the element grid and clamps what exceeds the largest element (448
#   of [256, 512) for E4M3); smaller blocks have more maxima, and the clamping table shows the
#   few clamped weights carrying a large share of the error. The float16-scaled INT4 / E2M1
#   rows show what an exact absmax scale buys, at twice the scale storage.
# * **Families.** At equal element width FP elements beat INT mantissas at b = 64 (a float's
#   relative step does not care where the block maximum falls); at b = 16 the two are level.
# * **K-sort.** Sorting key channels lowers the key error at b = 16 / 32 and changes nothing at
#   b = 64 (one block per head; the paper reports no gain at 128 = Llama-2's head_dim). But the
#   attention scores weigh a channel's error by E[q²]: sorting by the keys' own calibration RMS
#   lowers the key error yet raises the query-weighted error and the score error, while the
#   paper's W_k-row-norm order improves the scores. The permutation leaves q·kᵀ unchanged up to
#   float32 reordering.
# * **What is not measured.** The papers report perplexity and accuracy (2403.20137: Llama2-7B
#   on WikiText-2 with BFP12 keys); here only tensor and attention-score errors.
