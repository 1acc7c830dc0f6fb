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
# # Weight-only PTQ on SmolLM2-135M: RTN, GPTQ, AWQ, OmniQuant, SqueezeLLM, SpQR
#
# One table for the weight-only family: every method quantizes every block linear of
# SmolLM2-135M (the GGUF's Q4_1 weights, dequantized, are the "full precision" baseline) with its
# paper-default configuration, calibrated on the same seeded C4 segments, and is evaluated with
# the GPTQ perplexity protocol on WikiText-2 test (and the C4 sample at full size).
#
# The papers' headline shapes, checked at the end:
#
# * GPTQ (arXiv:2210.17323, Table 3): GPTQ < RTN at 3 bits;
# * AWQ (arXiv:2306.00978, Table 4): AWQ < RTN at INT3-g128;
# * OmniQuant (arXiv:2308.13137, Table 1): OmniQuant < GPTQ at W2A16;
# * SqueezeLLM (arXiv:2306.07629, Table 1): SqueezeLLM 3-bit < GPTQ 3-bit;
# * SpQR (arXiv:2306.03078, Table 1): close to full precision at about 3–4 bits per weight.
#
# **Sizes.** The full run (`LOWBIT_SMALL=0`, what `papers/weight_only/README.md` quotes) is the
# *reduced* size a 2-core CPU allows: 16 × 512 calibration tokens (papers: 128 × 2048) and the
# first 16 windows of 512 tokens. The small run (CI) keeps only the first 2 of the 30 blocks and
# uses 2 × 128 calibration tokens, 2 windows of 128 and cheaper searches: it only shows that the
# pipeline runs end to end — its numbers are not results. **Groups of 128 are ragged:**
# SmolLM2's hidden size 576 = 4.5 × 128, so each 576-wide row gets four groups of 128 and a last
# one of 64 with its own scale (`QuantConfig(ragged=True)`; GPTQ's reference does the same).

# %%
import dataclasses
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import SMALL, savefig

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

METHODS = ["rtn", "gptq", "awq", "omniquant", "squeezellm", "spqr"]
if SMALL:
    SETTINGS = ["W3g128"]
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
    OVERRIDES = {
        "awq": {"n_grid": 4, "clip_grid": 4, "clip_n_tokens": 64},
        "omniquant": {"epochs": 1, "layer_steps": 2},
        "squeezellm": {"kmeans_iters": 5},
    }
else:
    SETTINGS = ["W3g128", "W2g64"]
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
    OVERRIDES = {}


# Full size only: LOWBIT_ROWS=../papers/data/weight_only_rows.json plots and checks rows measured
# earlier (scripts/weight_only_table.py --out appends there) instead of quantizing again; where a
# (setting, method, corpus) was measured more than once, the last row in the file wins.
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %% [markdown]
# ## Quantize and evaluate
#
# Every row is printed as soon as it exists; the pivoted table follows.

# %%
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    if not ROWS:
        raise FileNotFoundError(f"LOWBIT_ROWS={ROWS_FROM}: no results there")
    ROWS = list({(r.notes["setting"], r.method, r.dataset): r for r in ROWS}.values())
    SETTINGS = sorted({r.notes["setting"] for r in ROWS} - {"fp"}, key=lambda s: (s[1], s))
    EVAL_SIZES = {(r.notes["seqlen"], r.notes["windows"]) for r in ROWS}
    CALIBS = {r.notes["calib"] for r in ROWS if "calib" in r.notes}  # the fp rows have none
    if len(EVAL_SIZES) != 1 or len(CALIBS) != 1:  # rows of different sizes: not comparable
        raise ValueError(f"LOWBIT_ROWS={ROWS_FROM} mixes sizes: {EVAL_SIZES} {CALIBS}")
    (CALIB,) = CALIBS
else:
    CALIB = f"{CMP.n_calib}x{CMP.calib_seqlen} C4 (seed {CMP.seed})"
    model, params, tok = load("smollm2")
    if SMALL:  # CI: a 2-block model (the embedding, the first 2 blocks and the head)
        model = Model(dataclasses.replace(model.cfg, n_layers=2))
        params = {**params, "blocks": params["blocks"][:2]}
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=METHODS, settings=SETTINGS, cmp=CMP,
        overrides=OVERRIDES,
        on_row=lambda r: print(
            f"  {r.method:10s} {r.bits:32s} {r.dataset:9s} ppl {r.value:9.2f}  "
            f"({60 * r.notes.get('quant_minutes', 0):.0f} s to quantize, {r.seconds:.0f} s to eval)"
        ),
    )  # fmt: skip
TABLE = pivot(ROWS)
print(TABLE)

# %% [markdown]
# ## Perplexity against bits per weight

# %%
PPL = {
    (r.notes["setting"], r.method): (r.notes.get("bpw", 16.0), r.value)
    for r in ROWS
    if r.dataset == "wikitext2"
}
if ("fp", "fp") not in PPL:
    raise KeyError("no full-precision WikiText-2 row: add one with weight_only_table.py --fp")
FP_PPL = PPL[("fp", "fp")][1]
fig, ax = plt.subplots(figsize=(6.5, 4.2))
COLOR = {m: f"C{i}" for i, m in enumerate(METHODS)}  # colour = method, marker = setting
MARKER = dict(zip(SETTINGS, "os^vDP", strict=False))
for setting in SETTINGS:
    for m in METHODS:
        if (setting, m) not in PPL:  # not measured (rows loaded from an earlier run)
            continue
        bpw, ppl = PPL[(setting, m)]
        ax.scatter(bpw, ppl, marker=MARKER[setting], color=COLOR[m])
for m in METHODS:
    ax.scatter([], [], marker="s", color=COLOR[m], label=m)
for setting in SETTINGS:
    ax.scatter([], [], marker=MARKER[setting], color="grey", label=setting)
ax.axhline(FP_PPL, color="k", lw=0.8, ls="--", label=f"fp (Q4_1 GGUF) {FP_PPL:.1f}")
ax.set_xlabel("bits per weight (codes + scales + zeros + outliers)")
ax.set_ylabel("WikiText-2 perplexity")
ax.set_yscale("log")
ax.set_title(f"SmolLM2-135M, {CALIB} calibration")
ax.legend(fontsize=6, ncol=2)
savefig(fig, "weight_only_ppl_vs_bpw")

# %% [markdown]
# ## The headline shapes
#
# Each shape is a comparison of two measured perplexities (WikiText-2); `True` means the paper's
# ordering appears here, `None` that a row was not measured. At the small (CI) size these
# booleans mean nothing.

# %%
W3, W2 = "W3g128", "W2g64"


def ppl(setting, method):
    return PPL.get((setting, method), (None, math.nan))[1]


def below(a, b):
    return None if math.isnan(a) or math.isnan(b) else bool(a < b)


SHAPES = {"GPTQ < RTN (W3)": below(ppl(W3, "gptq"), ppl(W3, "rtn"))}
SHAPES["AWQ < RTN (W3)"] = below(ppl(W3, "awq"), ppl(W3, "rtn"))
SHAPES["SqueezeLLM < GPTQ (3-bit)"] = below(ppl(W3, "squeezellm"), ppl(W3, "gptq"))
SPQR_GAP = ppl(W3, "spqr") / FP_PPL - 1  # the paper: "near-lossless", within ~1% of fp
SHAPES[f"SpQR within 1% of fp (here {100 * SPQR_GAP:+.1f}%)"] = below(SPQR_GAP, 0.01)
SHAPES["OmniQuant < GPTQ (W2)"] = below(ppl(W2, "omniquant"), ppl(W2, "gptq"))
for k, v in SHAPES.items():
    print(f"  {k:38s} {v}")
