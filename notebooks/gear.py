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
# # GEAR (arXiv 2403.05527): quantization + low-rank residual + sparse outliers for the KV cache
#
# Each head's chunk of `n_b = 64` tokens is stored as a b-bit KIVI-style quantization `D̂`, a
# rank-2 approximation `A Bᵀ` of its residual (3 power-iteration steps) and the 2 % largest
# entries in float16 (`methods/gear/core.py`); chunks are compressed once `n_b` tokens and one
# more have arrived (`window=1, flush=n_b`). The shapes checked: GEAR near fp at 4 bits, and
# below the same quantizer alone (rank 0, no outliers) at 2 bits — at the bits each costs.
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`, or `LOWBIT_ROWS=papers/data/gear_rows.json`): the
# project's reduced size, first 16 windows of 512 of WikiText-2 and C4. Small (CI): the first
# 2 blocks of SmolLM2, 2 windows of 128 — it shows the pipeline runs; its numbers are not results.

# %%
import dataclasses
import os

from _common import SMALL

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

QUANT_ONLY = {"gear": {"rank": 0, "outliers": 0.0}}
if SMALL:
    CMP = CompareConfig(n_calib=1, calib_seqlen=64, seqlen=128, windows=2)
    SETTINGS = ["KV2"]
else:
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
    SETTINGS = ["KV2", "KV4"]
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    if not ROWS:
        raise FileNotFoundError(f"LOWBIT_ROWS={ROWS_FROM}: no results there")
else:
    model, params, tok = load("smollm2")
    if SMALL:  # CI: the embedding, the first 2 blocks and the head
        model = Model(dataclasses.replace(model.cfg, n_layers=2))
        params = {**params, "blocks": params["blocks"][:2]}
    show = lambda r: print(f"  {r.method:6s} {r.bits:28s} {r.dataset:9s} ppl {r.value:9.2f}")
    ROWS = run(model, params, tok, model_name="smollm2", methods=["kivi", "gear"],
               settings=SETTINGS, cmp=CMP, on_row=show)  # fmt: skip
    ROWS += run(model, params, tok, model_name="smollm2", methods=["gear"], settings=SETTINGS,
                cmp=CMP, fp=False, overrides=QUANT_ONLY, on_row=show)  # fmt: skip
print(pivot(ROWS))


# %% [markdown]
# ## The headline shape
#
# A row is named by its method and, for GEAR, whether its config has the low-rank and sparse
# parts (`rank=0, outliers=0.0` is the quantizer alone).


# %%
def row_name(r) -> str:
    if r.method != "gear":
        return r.method
    return "quant alone" if "rank=0," in r.notes["config"] else "gear"


PPL = {(row_name(r), r.notes["setting"], r.dataset): r.value for r in ROWS if r.metric == "ppl"}
KV_BITS = {(row_name(r), r.notes["setting"]): r.notes.get("kv_bits", 16.0) for r in ROWS}
CORPORA = sorted({c for *_, c in PPL})
for (name, setting), bits in sorted(KV_BITS.items()):
    ppl = "  ".join(f"{c} {PPL.get((name, setting, c), float('nan')):.2f}" for c in CORPORA)
    print(f"{setting:4s} {name:12s} {bits:6.3f} bits/element  {ppl}")
if not SMALL:
    GEAR_BEATS_QUANT_KV2 = {c: PPL[("gear", "KV2", c)] < PPL[("quant alone", "KV2", c)] for c in CORPORA}  # fmt: skip
    print("GEAR below the quantizer alone at KV2:", GEAR_BEATS_QUANT_KV2)
