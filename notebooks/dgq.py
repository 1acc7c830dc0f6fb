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
# # DGQ (arXiv 2310.04836): W4A8 with integer group scales, against plain W4A8
#
# Dual Grained Quantization stores INT4 groups whose group scales are UINT8 integers times one
# float16 scale per output channel, with every `S2·(q − z)` an INT8, so INT8 activations times
# the widened weights are one integer GEMM. Its two-phase grid search picks the group clipping
# and the channel range on the layer's output error; percentile clipping smoothing tames the
# activation outliers. The claim checked here (Table 1 of the paper: DGQ below RTN at W4A8):
# DGQ's perplexity is lower than plain W4A8 (RTN INT4 g128 + per-token INT8 activations), at
# *fewer* bits per weight (8-bit integer group scales instead of float16 ones).
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`, the card's numbers; or `LOWBIT_ROWS=` a rows file):
# the project's reduced size, 16 × 512 C4 calibration tokens, the first 16 windows of 512.
# Small (CI): the first 2 blocks of SmolLM2, 2 × 128 calibration tokens, 2 windows of 128 and
# tiny search grids — it shows the pipeline runs; its numbers are not results.

# %%
import dataclasses
import os

from _common import SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

METHODS = ["rtn_act", "dgq"]
SETTINGS = ["W4A8g128"]
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
    OVERRIDES = {"dgq": {"group_grid": 4, "channel_grid": 4, "search_tokens": 64}}
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
    OVERRIDES = {}
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    if not ROWS:
        raise FileNotFoundError(f"LOWBIT_ROWS={ROWS_FROM}: no results there")
    ROWS = list({(r.notes["setting"], r.method, r.dataset): r for r in ROWS}.values())
else:
    model, params, tok = load("smollm2")
    if SMALL:  # CI: the embedding, the first 2 blocks and the head
        model = Model(dataclasses.replace(model.cfg, n_layers=2))
        params = {**params, "blocks": params["blocks"][:2]}
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=METHODS, settings=SETTINGS, cmp=CMP,
        overrides=OVERRIDES,
        on_row=lambda r: print(f"  {r.method:8s} {r.bits:28s} {r.dataset:9s} ppl {r.value:9.2f}"),
    )  # fmt: skip
TABLE = pivot(ROWS)
print(TABLE)

# %% [markdown]
# ## The headline shape
#
# Bits per weight come from `numerics.packing` (codes, scales, zero points, the second-level
# scales); activations are 8 bits per token for both rows.

# %%
PPL = {(r.method, r.dataset): r.value for r in ROWS if r.method in METHODS}
BPW = {r.method: r.notes["bpw"] for r in ROWS if r.method in METHODS}
BPA = {r.method: r.notes["bpa"] for r in ROWS if r.method in METHODS}
CORPORA = sorted({c for _, c in PPL})
for c in CORPORA:
    print(f"{c}: plain W4A8 {PPL[('rtn_act', c)]:.2f}  DGQ {PPL[('dgq', c)]:.2f}")
print(f"bits/weight: plain {BPW['rtn_act']:.4f}  DGQ {BPW['dgq']:.4f};  bits/activation {BPA}")
if not SMALL:
    DGQ_WINS = {c: PPL[("dgq", c)] < PPL[("rtn_act", c)] for c in CORPORA}
    print("DGQ below plain W4A8:", DGQ_WINS)
