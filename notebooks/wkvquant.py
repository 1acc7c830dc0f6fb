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
# # WKVQuant (arXiv 2402.12065): past-only, two-dimensional KV-cache quantization with CRR
#
# Keys (after RoPE) and values are shifted and scaled per channel by static parameters, then
# quantized per token and head; the parameters start from calibration ranges and are fitted
# with a loss read `k` blocks downstream (cross-block reconstruction); the current token stays
# full precision in its own attention (past-only: `window=1`). Weights stay float (the paper's
# W4KV4 also quantizes weights). The shape checked: past-only below quantizing the current
# token too (`past_only=False`: `window=0`), same config.
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`, or `LOWBIT_ROWS=papers/data/wkvquant_rows.json`):
# 16 × 512 C4 calibration, CRR with `k = 2`, 5 Adam steps on 2 × 128 tokens per block, first 16
# windows of 512. Small (CI): 2 blocks of SmolLM2, 1 CRR step on 32 tokens, 2 windows of 128 —
# it shows the pipeline runs; its numbers are not results.

# %%
import dataclasses
import os

from _common import SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=64, seqlen=128, windows=2)
    CRR = {"crr_blocks": 2, "steps": 1, "samples": 1, "tokens": 32}
    SETTINGS = ["KV4"]
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
    CRR = {"crr_blocks": 2, "steps": 5}
    SETTINGS = ["KV4", "KV2"]
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  CRR {CRR}  rows from: {ROWS_FROM or 'this run'}")

# %%
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    if not ROWS:
        raise FileNotFoundError(f"LOWBIT_ROWS={ROWS_FROM}: no results there")
else:
    model, params, tok = load("smollm2")
    if SMALL:
        model = Model(dataclasses.replace(model.cfg, n_layers=2))
        params = {**params, "blocks": params["blocks"][:2]}
    show = lambda r: print(f"  {r.method:8s} {r.bits:28s} {r.dataset:9s} ppl {r.value:9.2f}")
    ROWS = []
    for past_only in (True, False):
        ROWS += run(model, params, tok, model_name="smollm2", methods=["wkvquant"],
                    settings=SETTINGS, cmp=CMP, fp=past_only, on_row=show,
                    overrides={"wkvquant": CRR | {"past_only": past_only}})  # fmt: skip
print(pivot(ROWS))


# %% [markdown]
# ## Past-only against quantizing the current token


# %%
def row_name(r) -> str:
    if r.method != "wkvquant":
        return r.method
    return "past-only" if "past_only=True" in r.notes["config"] else "current too"


PPL = {(row_name(r), r.notes["setting"], r.dataset): r.value for r in ROWS if r.metric == "ppl"}
KV_BITS = {(row_name(r), r.notes["setting"]): r.notes.get("kv_bits", 16.0) for r in ROWS}
CORPORA = sorted({c for *_, c in PPL})
for (name, setting), bits in sorted(KV_BITS.items()):
    ppl = "  ".join(f"{c} {PPL.get((name, setting, c), float('nan')):.2f}" for c in CORPORA)
    print(f"{setting:4s} {name:12s} {bits:6.3f} bits/element  {ppl}")
if not SMALL:
    PAST_ONLY_WINS = {
        (s, c): PPL[("past-only", s, c)] < PPL[("current too", s, c)]
        for s in SETTINGS for c in CORPORA if ("current too", s, c) in PPL
    }  # fmt: skip
    print("past-only below quantizing the current token:", PAST_ONLY_WINS)
