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
# # MixLLM (arXiv 2412.14590): the globally most salient output features at 8 bits
#
# Every output row of every block linear gets a salience — the loss increase a second-order
# (Fisher) estimate predicts if the row is quantized to 4 bits — and the rows are ranked over
# the **whole model**: the top ones, until 10 % of all weights, stay at 8 bits (symmetric, per
# channel), the rest are INT4 g128; activations are INT8 per token. Bits per weight count every
# 8-bit row at 8 bits (plus its scale and a 16-bit row index). The claim checked here (the
# paper's abstract: "with only 10% more bits" the perplexity increase shrinks from ≈ 0.5 to
# within 0.2): MixLLM beats plain W4A8 (RTN INT4 + INT8 per token) at equal bits per weight —
# we compare with plain W4A8 in groups of 64 and 32, which bracket MixLLM's bits.
#
# **Sizes.** As `notebooks/dgq.py` (reduced size at full size; a 2-block cut in CI, whose
# numbers are not results).

# %%
import dataclasses
import os
import re

from _common import ROOT, SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, run

if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
FRACS = [0.10, 0.05]  # the paper's default budget and one smaller one
PLAIN = ["W4A8g128", "W4A8g64", "W4A8g32"]
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    ROWS += load_results(ROOT / "papers" / "data" / "dgq_rows.json")  # fp, plain W4A8 g128
    if not ROWS:
        raise FileNotFoundError(f"LOWBIT_ROWS={ROWS_FROM}: no results there")
else:
    model, params, tok = load("smollm2")
    if SMALL:
        model = Model(dataclasses.replace(model.cfg, n_layers=2))
        params = {**params, "blocks": params["blocks"][:2]}
    ROWS = []
    for frac in FRACS:
        ROWS += run(
            model, params, tok, model_name="smollm2", methods=["mixllm"],
            settings=["W4A8g128"], cmp=CMP, fp=frac == FRACS[0],
            overrides={"mixllm": {"high_frac": frac}},
        )  # fmt: skip
    ROWS += run(
        model, params, tok, model_name="smollm2", methods=["rtn_act"], settings=PLAIN, cmp=CMP,
        fp=False,
    )  # fmt: skip


def label(r) -> str:
    if r.method == "mixllm":
        return f"MixLLM {float(re.search(r'high_frac=([0-9.]+)', r.notes['config'])[1]):.0%}"
    if r.method == "rtn_act":
        return f"plain {r.notes['setting']}"
    return r.method


TABLE = {}
for r in ROWS:
    if r.method in ("fp", "mixllm", "rtn_act"):
        TABLE.setdefault(label(r), {"bpw": r.notes.get("bpw", 16.0)})[r.dataset] = r.value
CORPORA = sorted({r.dataset for r in ROWS})
print("| row | bits/weight | " + " | ".join(f"{c} ppl" for c in CORPORA) + " |")
print("|---|---:|" + "---:|" * len(CORPORA))
for name, line in sorted(TABLE.items(), key=lambda kv: kv[1]["bpw"]):
    vals = " | ".join(f"{line[c]:.2f}" if c in line else "" for c in CORPORA)
    print(f"| {name} | {line['bpw']:.4f} | {vals} |")
