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
# # ZeroQuant-V2 on SmolLM2-135M: fine-grained W4A8 with and without LoRC
#
# ZeroQuant-V2 (arXiv 2303.08302) quantizes weights in groups (FGQ) and activations per token
# to 8 bits, and adds **LoRC**: the rank-8 SVD factors of the weight error `W − Ŵ`, themselves
# quantized to 8 bits (`numerics.lowrank.LowRankCorrected`). The paper's shape: LoRC lowers
# W4A8 perplexity for a few percent of extra bits (its Table 6 / 7). Bits per weight here count
# the factors (`numerics.sparse.weight_bits`).
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`, or `LOWBIT_ROWS=../papers/data/zeroquant_v2_rows.json`
# to re-read the rows the card quotes): 16 windows of 512 tokens of WikiText-2 and C4. Small
# (CI): SmolLM2's first 2 blocks, 2 windows of 128 — it shows the pipeline runs, nothing more.
# g128 groups are ragged on SmolLM2's 576 inputs (four of 128 and one of 64).

# %%
import os

from _common import SMALL, plot_variants, variant_rows, variant_table

from methods.compare import CompareConfig

VARIANTS = {
    "W4A8 g128": ("zeroquant_v2", "W4A8g128", {"lorc_rank": 0}),
    "W4A8 g128 + LoRC": ("zeroquant_v2", "W4A8g128", {}),
}
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:  # the measured rows (W3A8 not measured yet)
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
ROWS = variant_rows(VARIANTS, cmp=CMP, rows_from=ROWS_FROM, small=SMALL)
TABLE = variant_table(ROWS)
print(TABLE)

# %% [markdown]
# ## What LoRC costs and buys
#
# The extra bits are the factors' codes and per-row scales: for SmolLM2's seven linears per
# block, rank 8 with 8-bit factors adds about 0.21 bits per weight.

# %%
PPL = {(r.notes["variant"], r.dataset): r.value for r in ROWS if r.metric == "ppl"}
BPW = {r.notes["variant"]: r.notes.get("bpw", 16.0) for r in ROWS}
for base in [v for v in VARIANTS if "LoRC" not in v]:
    extra = BPW[base + " + LoRC"] - BPW[base]
    for corpus in CMP.corpora:
        p0, p1 = PPL[(base, corpus)], PPL[(base + " + LoRC", corpus)]
        print(f"{base:10s} {corpus:9s}: {p0:8.2f} -> {p1:8.2f} with LoRC "
              f"(+{extra:.3f} bits/weight, {100 * extra / BPW[base]:.1f}%)")  # fmt: skip
plot_variants(ROWS, "ZeroQuant-V2 on SmolLM2-135M (W·A8, per-token activations)", "zeroquant_v2")
