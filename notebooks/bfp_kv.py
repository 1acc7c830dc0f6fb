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
# # BFP KV cache with K-sort (arXiv 2403.20137) on SmolLM2: does K-sort halve the K-cache bits?
#
# Trukhanov & Soloveychik store the K cache in BFP12 — blocks of channels sharing one 8-bit
# exponent, 4-bit mantissas — and sort each head's key channels by the norms of W_k's rows
# (K-sort) so that channels of similar magnitude share a block; the abstract claims "2x savings
# in the memory footprint without significant degradation of the model's accuracy", i.e. BFP12
# keys (4 + 8/b bits per element) where plain BFP needs BFP16 (8 + 8/b). `notebooks/block_formats.py`
# measured the tensor side (key SQNR, score SQNR); this notebook measures perplexity through
# the KV-cache hook (`methods.bfp_kv`: every token stored in the cache's format as it is
# written; values fixed at BFP16; blocks of 32 channels, i.e. two blocks per 64-channel head —
# the analogue of the paper's 64-blocks on Llama-2's 128-channel heads).
#
# `KV<b>` settings: `b` is the **key mantissa width** (KV4 = BFP12, KV8 = BFP16). KIVI rows
# (2 / 4-bit keys and values, 128-token full-precision window) are a reference.
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`): the rows committed in `papers/data/bfp_kv_rows.json`
# (16 × 512 C4 calibration, first 16 windows of 512 of WikiText-2 and C4; `LOWBIT_ROWS=` another
# rows file) and, where present, the context-2048 rows of `papers/data/bfp_kv_2048_rows.json`.
# Small (CI): the first 2 blocks of SmolLM2, 2 windows of 128 — the pipeline runs; its numbers
# are not results.

# %%
import dataclasses
import math
import os

import matplotlib.pyplot as plt
import numpy as np
from _common import ROOT, SMALL, savefig, variant_rows, variant_table

from harness.results import load_results
from methods.bfp_kv import BFPCodec
from methods.compare import CompareConfig

HEAD_DIM, BLOCK = 64, 32  # SmolLM2's heads; the configs' default block
SORTED = {4: "BFP12 K-sort"}  # key mantissa bits → label
PLAIN = {4: "BFP12", 5: "BFP13", 8: "BFP16"}
VARIANTS = {SORTED[4]: ("bfp_kv", "KV4", {}), PLAIN[4]: ("bfp_kv_nosort", "KV4", {}),
            PLAIN[8]: ("bfp_kv_nosort", "KV8", {})}  # fmt: skip
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:  # the rows measured (papers/bfp_kv/README.md)
    VARIANTS |= {PLAIN[5]: ("bfp_kv_nosort", "KV5", {})}
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
ROWS_FROM = (
    None if SMALL else os.environ.get("LOWBIT_ROWS", str(ROOT / "papers/data/bfp_kv_rows.json"))
)
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %% [markdown]
# ## Bits per key element
#
# `M + 8/b` (mantissas + one E8M0 exponent per block), counted by `numerics.packing` through the
# codec. The K-sort permutation is a constant of the model (30 × 3 × 64 channel indices), not
# of the cache.

# %%
KEY_BITS = {m: BFPCodec(bits=m, block=BLOCK).element_bits(HEAD_DIM) for m in PLAIN}
print({PLAIN[m]: b for m, b in KEY_BITS.items()})

# %%
ROWS = variant_rows(VARIANTS, cmp=CMP, rows_from=ROWS_FROM, small=SMALL)
if ROWS_FROM:  # KIVI-2, copied from the KIVI card's rows (written before KIVIConfig had `keys`)
    ROWS += [dataclasses.replace(r, notes={**r.notes, "variant": "KIVI-2"})
             for r in load_results(ROWS_FROM) if r.method == "kivi" and r.notes["setting"] == "KV2"]  # fmt: skip
TABLE = variant_table(ROWS)
print(TABLE)
PPL = {(r.notes["variant"], r.dataset): r.value for r in ROWS if r.metric == "ppl"}
KV_BITS = {r.notes["variant"]: r.notes.get("kv_bits", 16.0) for r in ROWS}
CORPORA = sorted({c for _, c in PPL})

# %% [markdown]
# ## The headline: K-sort BFP12 against plain BFP16, and the equal-perplexity key bits
#
# For each corpus: the perplexity of BFP12 K-sort keys next to plain BFP16 and plain BFP12, and
# the key bits plain BFP would need to reach K-sort BFP12's perplexity — log-perplexity
# interpolated linearly in key bits between the measured plain widths (`None` where K-sort
# BFP12 is better than every plain width measured, or worse than all of them).


# %%
def equal_ppl_bits(target: float, corpus: str) -> float | None:
    pts = sorted((KEY_BITS[m], math.log(PPL[(PLAIN[m], corpus)]))
                 for m in PLAIN if (PLAIN[m], corpus) in PPL)  # fmt: skip
    y = math.log(target)
    for (b0, y0), (b1, y1) in zip(pts, pts[1:], strict=False):
        if min(y0, y1) <= y <= max(y0, y1) and y0 != y1:
            return b0 + (y - y0) * (b1 - b0) / (y1 - y0)
    return None


HEADLINE = {}
for c in CORPORA:
    s, p4, p8 = PPL[(SORTED[4], c)], PPL[(PLAIN[4], c)], PPL[(PLAIN[8], c)]
    HEADLINE[c] = {"K-sort BFP12": s, "plain BFP12": p4, "plain BFP16": p8,
                   "K-sort vs BFP16 (%)": 100 * (s / p8 - 1),
                   "plain bits for K-sort's ppl": equal_ppl_bits(s, c)}  # fmt: skip
    print(c, HEADLINE[c])

# %% [markdown]
# ## Context 2048 (full size only): the headline pair on 4 windows of 2048

# %%
ROWS_2048 = []
P2048 = ROOT / "papers/data/bfp_kv_2048_rows.json"
if not SMALL and P2048.exists():
    ROWS_2048 = [r for r in load_results(P2048) if r.metric == "ppl"]
    for r in ROWS_2048:
        print(f"{r.method:14s} {r.bits:32s} {r.dataset:9s} ppl {r.value:8.3f}")

# %% [markdown]
# ## Plot: perplexity against key bits per element

# %%
fig, axs = plt.subplots(1, len(CORPORA), figsize=(5.2 * len(CORPORA), 3.8), squeeze=False)
for ax, c in zip(axs[0], CORPORA, strict=True):
    for labels, style, name in ((PLAIN, "o-", "plain BFP"), (SORTED, "s--", "K-sort BFP")):
        pts = [(KEY_BITS[m], PPL[(lab, c)]) for m, lab in labels.items() if (lab, c) in PPL]
        ax.plot(*np.array(pts).T, style, label=name)
    if ("fp", c) in PPL:
        ax.axhline(PPL[("fp", c)], ls=":", color="k", lw=1, label="fp")
    ax.set(xlabel="key bits per element", ylabel="perplexity", title=c)
    ax.legend(fontsize=8)
fig.suptitle("SmolLM2-135M, K cache in BFP (blocks of 32), values BFP16")
savefig(fig, "bfp_kv")

# %% [markdown]
# ## Reading the result
#
# The card `papers/bfp_kv/README.md` quotes the full-size numbers and says whether K-sort
# halves the K-cache bits on SmolLM2.
