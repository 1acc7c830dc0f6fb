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
# # ZeroQuant-FP on SmolLM2-135M: FP8 vs INT8 activations, FP4 vs INT4 weights
#
# ZeroQuant-FP (arXiv 2307.09782): at W4A8, FP8 E4M3 activations beat INT8 ones at equal
# weights, and FP4 (E2M1) weights match or beat INT4; restricting the FP4 weights' scales to
# powers of two (M1: every group scale; M2: a real per-row scale times power-of-two group
# ratios) makes the FP4 → FP8 cast exact at little cost. All variants: g128 weight groups
# (ragged on SmolLM2's 576 inputs), per-token dynamic activations, round-to-nearest weights.
#
# **Sizes** as in `zeroquant_v2.py`: full size re-reads or measures 16 windows of 512 tokens
# on WikiText-2 and C4; small (CI) runs a 2-block cut and proves only that it runs.

# %%
import os

from _common import SMALL, plot_variants, variant_rows, variant_table

from methods.compare import CompareConfig

VARIANTS = {
    "INT4 w · INT8 a": ("zeroquant_fp", "W4A8g128", {"weight_format": "int", "act_format": "int"}),
    "INT4 w · FP8 a": ("zeroquant_fp", "W4A8g128", {"weight_format": "int"}),
    "FP4 w · FP8 a": ("zeroquant_fp", "W4A8g128", {}),
    "FP4 (M1) · FP8 a": ("zeroquant_fp", "W4A8g128", {"pow2_scale": "m1"}),
    "FP4 (M2) · FP8 a": ("zeroquant_fp", "W4A8g128", {"pow2_scale": "m2"}),
}
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
ROWS = variant_rows(VARIANTS, cmp=CMP, rows_from=ROWS_FROM, small=SMALL)
TABLE = variant_table(ROWS)
print(TABLE)

# %% [markdown]
# ## The paper's comparisons
#
# FP8 against INT8 activations at the same INT4 weights; FP4 against INT4 weights at FP8
# activations; the cost of each scale constraint against unconstrained FP4.

# %%
PPL = {(r.notes["variant"], r.dataset): r.value for r in ROWS if r.metric == "ppl"}
PAIRS = [
    ("INT4 w · INT8 a", "INT4 w · FP8 a"),
    ("INT4 w · FP8 a", "FP4 w · FP8 a"),
    ("FP4 w · FP8 a", "FP4 (M1) · FP8 a"),
    ("FP4 w · FP8 a", "FP4 (M2) · FP8 a"),
]
for a, b in PAIRS:
    for corpus in CMP.corpora:
        print(f"{corpus:9s} {a:18s} {PPL[(a, corpus)]:8.2f}   {b:18s} {PPL[(b, corpus)]:8.2f}")
plot_variants(ROWS, "ZeroQuant-FP on SmolLM2-135M (W4A8, g128)", "zeroquant_fp")
