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
# # KVQuant (arXiv 2401.18079): a 3-bit KV cache near full precision, and what each piece buys
#
# KVQuant stores keys per channel **before RoPE** with offline-calibrated ranges, values per
# token with online ranges, both on a per-layer **non-uniform** datatype (Fisher-weighted
# k-means, nuqX), keeps **1 % outliers** per vector in fp16 and the **first token** (the
# attention sink) in fp16. The claim checked here (Table 1 / Table 18 of the paper: LLaMA-7B
# WikiText-2 5.68 → 5.75 at 3 bits with 1 % outliers): KVQuant at 3 bits stays within a few
# percent of full precision, below KIVI at every bit width, and each piece helps (the ablation
# at 3 bits turns one piece off at a time).
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`, or `LOWBIT_ROWS=` a rows file, e.g.
# `papers/data/kvquant_rows.json`): the project's reduced size, 16 × 512 C4 calibration tokens,
# the first 16 windows of 512 of WikiText-2 and C4. Small (CI): the first 2 blocks of SmolLM2,
# 2 × 64 calibration tokens, 2 windows of 64 — it shows the pipeline runs; its numbers are not
# results.

# %%
import dataclasses
import os

from _common import SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

METHODS = ["kivi", "kvquant"]
SETTINGS = ["KV4", "KV3", "KV2"]
ABLATIONS = {  # scripts/kvquant_ablation.py: one piece off at a time, at 3 bits
    "pre_rope": {"pre_rope": False},
    "outliers": {"outliers": 0.0},
    "sink": {"sink": 0},
    "nuq": {"nuq": False},
}
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=64, seqlen=64, windows=2)
    SETTINGS, ABLATIONS = ["KV3"], {"outliers": {"outliers": 0.0}}
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
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
    show = lambda r: print(f"  {r.method:18s} {r.bits:30s} {r.dataset:9s} ppl {r.value:9.2f}")
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=METHODS, settings=SETTINGS, cmp=CMP,
        on_row=show,
    )  # fmt: skip
    for piece, change in ABLATIONS.items():
        for r in run(
            model, params, tok, model_name="smollm2", methods=["kvquant"], settings=["KV3"],
            cmp=CMP, fp=False, overrides={"kvquant": change},
        ):  # fmt: skip
            ROWS.append(dataclasses.replace(r, method=f"kvquant-{piece}"))
            show(ROWS[-1])
TABLE = pivot(ROWS)
print(TABLE)

# %% [markdown]
# ## The headline shape
#
# Bits per cached element at 2048 tokens (`methods.base.REPORT_TOKENS`): codes, the 1 %
# outliers (16-bit value + 16-bit index each), one 32-bit sparse pointer per token, the values'
# fp16 zero point and scale per token, the fp16 sink token; KIVI's include its 128-token
# full-precision window.

# %%
PPL = {(r.notes["setting"], r.method, r.dataset): r.value for r in ROWS}
KV_BITS = {(r.notes["setting"], r.method): r.notes.get("kv_bits", 16.0) for r in ROWS}
CORPORA = sorted({c for _, _, c in PPL})
for c in CORPORA:
    fp = PPL[("fp", "fp", c)]
    for s in SETTINGS:
        line = "  ".join(f"{m} {PPL[(s, m, c)]:.2f} ({KV_BITS[(s, m)]:.2f} b)" for m in METHODS)
        print(f"{c} {s}: fp {fp:.2f}  {line}")
    for piece in ABLATIONS:
        key = ("KV3", f"kvquant-{piece}", c)
        print(
            f"{c} KV3 without {piece}: {PPL[key]:.2f}  (KVQuant {PPL[('KV3', 'kvquant', c)]:.2f})"
        )
if not SMALL:
    GAP3 = {c: PPL[("KV3", "kvquant", c)] / PPL[("fp", "fp", c)] - 1 for c in CORPORA}
    BEATS_KIVI = {
        (s, c): PPL[(s, "kvquant", c)] < PPL[(s, "kivi", c)] for s in SETTINGS for c in CORPORA
    }
    EACH_HELPS = {
        (p, c): PPL[("KV3", f"kvquant-{p}", c)] > PPL[("KV3", "kvquant", c)]
        for p in ABLATIONS
        for c in CORPORA
    }
    print("KVQuant-3bit over fp:", {c: f"{g:+.1%}" for c, g in GAP3.items()})
    print("KVQuant below KIVI:", BEATS_KIVI)
    print("turning a piece off hurts:", EACH_HELPS)
