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
# # RotateKV (arXiv 2501.16383): a 2-bit KV cache with rotated pre-RoPE keys, against KIVI
#
# RotateKV rotates the keys of a group of KV heads by one Hadamard matrix *before* RoPE,
# reorders the rotated channels by their calibration mean so that each per-token quantization
# group holds channels of similar offset, keeps the attention-sink tokens in full precision and
# quantizes every other token per token at 2 bits (values: a per-head Hadamard, the same
# quantizer). The claims checked here: at 2 bits RotateKV beats KIVI-2 (the paper's Table 1
# compares them on LLaMA-2/3 and Mistral), and the rotation is what makes 2 bits work (the
# ablation: the same quantizer, clip ratio and sink without rotation or reordering).
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`): the numbers of the card, read from the committed
# rows file `papers/data/rotatekv_rows.json` (or `LOWBIT_ROWS=` another one) — 16 × 512 C4
# calibration tokens, the first 16 windows of 512. Small (CI): the first 2 blocks of SmolLM2,
# 2 × 128 calibration tokens, 2 windows of 128 — it shows the pipeline runs; its numbers are
# not results.

# %%
import dataclasses
import os

from _common import ROOT, SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

METHODS = ["kivi", "rotatekv", "rotatekv_plain"]
SETTINGS = ["KV2"]
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
ROWS_FROM = None
if not SMALL:
    ROWS_FROM = os.environ.get("LOWBIT_ROWS", str(ROOT / "papers/data/rotatekv_rows.json"))
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
# Bits per cached element at 2048 tokens (`KVQuant.bits_per_element`): codes, the fp16 scales
# and zero points, and the full-precision tokens — KIVI's window of 128 recent tokens,
# RotateKV's one sink token.

# %%
KV2 = [r for r in ROWS if r.notes.get("setting") == "KV2"]
PPL = {(r.method, r.dataset): r.value for r in KV2}
KV_BITS = {r.method: r.notes["kv_bits"] for r in KV2}
FP = {r.dataset: r.value for r in ROWS if r.method == "fp"}
CORPORA = sorted({c for _, c in PPL})
for c in CORPORA:
    line = "  ".join(f"{m} {PPL[(m, c)]:.2f}" for m in METHODS if (m, c) in PPL)
    print(f"{c}: fp {FP.get(c, float('nan')):.2f}  {line}")
print("bits/element:", {m: round(b, 3) for m, b in KV_BITS.items()})
ROTATION_HELPS = {c: PPL[("rotatekv", c)] < PPL[("rotatekv_plain", c)] for c in CORPORA}
BEATS_KIVI = {c: PPL[("rotatekv", c)] < PPL[("kivi", c)] for c in CORPORA}
print("rotation helps:", ROTATION_HELPS, " RotateKV below KIVI-2:", BEATS_KIVI)
