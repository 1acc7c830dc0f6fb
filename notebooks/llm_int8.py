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
# # LLM.int8() on SmolLM2-135M: vector-wise absmax and the outlier decomposition
#
# LLM.int8() (arXiv 2208.07339) quantizes each token and each output channel with its own
# absmax scale (vector-wise int8, sec. 3.2) and multiplies in float the feature dimensions that
# hold any `|x| ≥ 6` in the current forward pass (the mixed-precision decomposition, eq. 7).
# Table 1's shape: absmax int8 degrades, int8 with the decomposition matches float (C4).
#
# The figure: per block linear, the fraction of its input features that are outliers
# (`max|X_j| ≥ 6` on the calibration segments).
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`) re-reads `LOWBIT_ROWS` (default
# `papers/data/llm_int8_rows.json`) and `papers/data/llm_int8_outliers.json` (commands in
# `papers/llm_int8/README.md`). The small run (CI) quantizes a 2-block cut of SmolLM2 with
# 2 × 128 calibration tokens and 2 windows of 128: it shows the pipeline runs, its numbers are
# not results.

# %%
import dataclasses
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import ROOT, SMALL, savefig

from harness.calibration import c4_calibration
from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.base import get_method
from methods.compare import CompareConfig, pivot, run
from methods.llm_int8 import LLMInt8Config

if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
    model, params, tok = load("smollm2")
    model = Model(dataclasses.replace(model.cfg, n_layers=2))
    params = {**params, "blocks": params["blocks"][:2]}
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=["llm_int8"], settings=["W8A8"],
        cmp=CMP,
    )  # fmt: skip
    ROWS += run(
        model, params, tok, model_name="smollm2", methods=["llm_int8"], settings=["W8A8"],
        cmp=CMP, fp=False, overrides={"llm_int8": {"threshold": None}},
    )  # fmt: skip
    calib = c4_calibration(tok, n_samples=CMP.n_calib, seqlen=CMP.calib_seqlen, seed=CMP.seed)
    q = get_method("llm_int8").quantize_model(
        params, model.cfg, calib, LLMInt8Config(), outliers=True
    )
    OUTLIERS = [{"name": r["name"], "outlier_frac": r["outlier_frac"]} for r in q.report]
else:
    data = ROOT / "papers" / "data"
    ROWS = load_results(os.environ.get("LOWBIT_ROWS", data / "llm_int8_rows.json"))
    if not ROWS:
        raise FileNotFoundError("no LLM.int8() rows: run the commands in the card first")
    OUTLIERS = json.loads((data / "llm_int8_outliers.json").read_text())["smollm2"]["layers"]


# %% [markdown]
# ## Absmax vs decomposition


# %%
def _variant(r) -> str:
    if r.method == "fp":
        return "fp"
    return "absmax" if "threshold=None" in r.notes.get("config", "") else "int8()"


TABLE = pivot([dataclasses.replace(r, method=_variant(r)) for r in ROWS])  # one line per variant
print(TABLE)
PPL = {(_variant(r), r.dataset): r.value for r in ROWS}
for k, v in sorted(PPL.items()):
    print(f"  {k[0]:8s} {k[1]:9s} {v:10.2f}")
assert all(math.isfinite(v) for v in PPL.values())

# %% [markdown]
# ## Outlier feature dimensions per linear

# %%
KINDS = ["q_proj", "o_proj", "gate_proj", "down_proj"]  # q/k/v and gate/up share their input
frac = {
    (int(o["name"].split(".")[1]), o["name"].split(".")[-1]): o["outlier_frac"] for o in OUTLIERS
}
n_blocks = 1 + max(b for b, _ in frac)
fig, ax = plt.subplots(figsize=(6, 3.2))
for k in KINDS:
    ax.plot(range(n_blocks), [100 * frac[(b, k)] for b in range(n_blocks)], "o-", ms=3, label=k)
ax.set_xlabel("block")
ax.set_ylabel("outlier features (%)")
ax.set_title("features with max|x| ≥ 6 (calibration)")
ax.legend(fontsize=7)
savefig(fig, "llm_int8_outlier_fraction")
MEAN_FRAC = float(np.mean([o["outlier_frac"] for o in OUTLIERS]))
print(f"mean outlier fraction over {len(OUTLIERS)} linears: {MEAN_FRAC:.4f}")
