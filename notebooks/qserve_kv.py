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
# # QServe / QoQ (arXiv 2405.04532): KV4 with SmoothAttention, against KIVI-4
#
# QServe stores keys and values per token and per head as asymmetric INT4 with an fp16 scale
# and zero point, every token as it is written. SmoothAttention divides the post-RoPE keys by
# `λ_i = max|K_i|^0.5` (shared by each RoPE pair, so it commutes with RoPE and folds into
# `W_k`) and multiplies the queries by `λ`: the scores are unchanged and the keys' outlier
# channels shrink before they are quantized. The claims checked here (the paper's §4.2 /
# Fig. 7 and its KV4 ablation): SmoothAttention lowers the perplexity of plain per-token KV4,
# and KV4 with SmoothAttention is close to full precision.
#
# Here `λ` is applied inside the key codec (the lent `kv_cache` contract keeps the weights);
# `core.fold_smooth_attention` folds it into the weights for W4A8KV4 instead — the same scores.
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`): the card's numbers, read from the committed rows
# file `papers/data/qserve_kv_rows.json` (or `LOWBIT_ROWS=`) — 16 × 512 C4 calibration tokens,
# the first 16 windows of 512. Small (CI): the first 2 blocks of SmolLM2, 2 × 128 calibration
# tokens, 2 windows of 128 — the pipeline runs; its numbers are not results.

# %%
import dataclasses
import os

from _common import ROOT, SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

METHODS = ["kivi", "qserve_kv", "qserve_kv_plain"]
SETTINGS = ["KV4"]
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
ROWS_FROM = None
if not SMALL:
    ROWS_FROM = os.environ.get("LOWBIT_ROWS", str(ROOT / "papers/data/qserve_kv_rows.json"))
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    if not ROWS:
        raise FileNotFoundError(f"{ROWS_FROM}: no results there")
    ROWS = list({(r.notes["setting"], r.method, r.dataset): r for r in ROWS}.values())
else:
    model, params, tok = load("smollm2")
    model = Model(dataclasses.replace(model.cfg, n_layers=2))  # CI: 2 blocks
    params = {**params, "blocks": params["blocks"][:2]}
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=METHODS, settings=SETTINGS, cmp=CMP,
        on_row=lambda r: print(f"  {r.method:15s} {r.bits:28s} {r.dataset:9s} ppl {r.value:9.2f}"),
    )  # fmt: skip
TABLE = pivot(ROWS)
print(TABLE)

# %% [markdown]
# ## The headline shape
#
# Bits per cached element at 2048 tokens: QServe's 4 bits + an fp16 scale and zero per token
# and head of 64 (4.5); KIVI-4's groups of 32 and its window of 128 full-precision tokens.

# %%
KV4 = [r for r in ROWS if r.notes.get("setting") == "KV4"]
PPL = {(r.method, r.dataset): r.value for r in KV4}
KV_BITS = {r.method: r.notes["kv_bits"] for r in KV4}
FP = {r.dataset: r.value for r in ROWS if r.method == "fp"}
CORPORA = sorted({c for _, c in PPL})
for c in CORPORA:
    line = "  ".join(f"{m} {PPL[(m, c)]:.2f}" for m in METHODS if (m, c) in PPL)
    print(f"{c}: fp {FP.get(c, float('nan')):.2f}  {line}")
print("bits/element:", {m: round(b, 3) for m, b in KV_BITS.items()})
SMOOTH_HELPS = {c: PPL[("qserve_kv", c)] < PPL[("qserve_kv_plain", c)] for c in CORPORA}
print("SmoothAttention helps:", SMOOTH_HELPS)
