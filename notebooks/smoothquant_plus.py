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
# # SmoothQuant+ (arXiv 2312.03788): smoothing before 4-bit g128 weight-only quantization
#
# SmoothQuant's per-channel scales `s_j = max|X_j|^α / max|W_j|^(1−α)` are folded into the
# norms / preceding linears with one α for the whole model, searched on the quantized model's
# output error, then every linear is RTN INT4 g128 (W4A16). The claim checked here (the paper's
# abstract: "lossless" 4-bit Code Llama-34B; its tables compare with RTN and AWQ): SmoothQuant+
# has lower perplexity than RTN at W4 g128. RTN and AWQ at W4 g128 are the committed rows of
# `papers/data/weight_only_rows.json` (same calibration, windows and protocol).
#
# **Sizes.** As `notebooks/dgq.py`: reduced size at full size (`LOWBIT_SMALL=0` or
# `LOWBIT_ROWS=`), a 2-block cut with tiny calibration in CI (numbers there are not results).

# %%
import dataclasses
import os

from _common import ROOT, SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

SETTINGS = ["W4g128"]
if SMALL:
    METHODS = ["rtn", "smoothquant_plus"]
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
    OVERRIDES = {"smoothquant_plus": {"n_grid": 3, "search_seqs": 1}}
else:
    METHODS = ["smoothquant_plus"]
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
    OVERRIDES = {}
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

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
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=METHODS, settings=SETTINGS, cmp=CMP,
        overrides=OVERRIDES, fp=False,
        on_row=lambda r: print(f"  {r.method:16s} {r.bits:26s} {r.dataset:9s} ppl {r.value:9.2f}"),
    )  # fmt: skip
if not SMALL:  # the committed RTN / AWQ / fp rows at W4 g128 (weight_only_rows.json)
    BASE = load_results(ROOT / "papers" / "data" / "weight_only_rows.json")
    ROWS = ROWS + [
        r for r in BASE
        if r.method == "fp" or (r.method in ("rtn", "awq") and r.notes.get("setting") == "W4g128")
    ]  # fmt: skip
ROWS = list({(r.notes["setting"], r.method, r.dataset): r for r in ROWS}.values())
TABLE = pivot(ROWS)
print(TABLE)

# %% [markdown]
# ## The headline shape

# %%
PPL = {(r.method, r.dataset): r.value for r in ROWS}
BPW = {r.method: r.notes.get("bpw") for r in ROWS}
CORPORA = sorted({r.dataset for r in ROWS})
for c in CORPORA:
    line = "  ".join(f"{m} {PPL[(m, c)]:.2f}" for m in ("fp", "rtn", "awq", "smoothquant_plus")
                     if (m, c) in PPL)  # fmt: skip
    print(f"{c}: {line}")
print("bits/weight:", BPW)
if not SMALL:
    SQ_BEATS_RTN = {c: PPL[("smoothquant_plus", c)] < PPL[("rtn", c)] for c in CORPORA}
    print("SmoothQuant+ below RTN:", SQ_BEATS_RTN)
