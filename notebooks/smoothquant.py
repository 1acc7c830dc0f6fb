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
# # SmoothQuant on SmolLM2-135M: naive W8A8 vs smoothing, and the migration strength α
#
# SmoothQuant (arXiv 2211.10438) divides each input channel of q/k/v and gate/up by
# `s_j = max|X_j|^α / max|W_j|^(1−α)` (eq. 4), folded into the preceding RMSNorm, so that int8
# activations no longer waste their range on a few huge channels. Levels (Table 2): O1 per-token
# dynamic, O2 per-tensor dynamic, O3 per-tensor static activations; weights per tensor.
#
# The headline shape: naive W8A8 (same quantization, no smoothing) degrades, SmoothQuant at
# α ≈ 0.5 comes back near full precision. The figure is the α sweep at O3.
#
# **Sizes.** Full size (`LOWBIT_SMALL=0`) re-reads the committed rows
# (`LOWBIT_ROWS`, default `papers/data/smoothquant_rows.json`, and
# `LOWBIT_SWEEP_ROWS`, default `papers/data/smoothquant_sweep_rows.json`; commands in
# `papers/smoothquant/README.md`). The small run (CI) quantizes a 2-block cut of SmolLM2 with
# 2 × 128 calibration tokens and 2 windows of 128: it shows the pipeline runs, its numbers are
# not results.

# %%
import dataclasses
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import ROOT, SMALL, savefig

from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
if SMALL:
    ALPHAS = [0.0, 0.5, 1.0]
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
    model, params, tok = load("smollm2")
    model = Model(dataclasses.replace(model.cfg, n_layers=2))
    params = {**params, "blocks": params["blocks"][:2]}
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=["w8a8", "smoothquant"],
        settings=["W8A8"], cmp=CMP,
    )  # fmt: skip
    SWEEP_ROWS = [r for r in ROWS if r.method != "smoothquant"]
    for a in ALPHAS:
        SWEEP_ROWS += run(
            model, params, tok, model_name="smollm2", methods=["smoothquant"], settings=["W8A8"],
            cmp=CMP, fp=False, overrides={"smoothquant": {"alpha": a}},
        )  # fmt: skip
else:
    data = ROOT / "papers" / "data"
    ROWS = load_results(os.environ.get("LOWBIT_ROWS", data / "smoothquant_rows.json"))
    SWEEP_ROWS = load_results(
        os.environ.get("LOWBIT_SWEEP_ROWS", data / "smoothquant_sweep_rows.json")
    )
    if not ROWS or not SWEEP_ROWS:
        raise FileNotFoundError("no SmoothQuant rows: run the commands in the card first")
TABLE = pivot(ROWS)
print(TABLE)


# %% [markdown]
# ## The α sweep (O3: per-tensor static activations)


# %%
def _cfg_alpha(r) -> float | None:
    """α from a SmoothQuant row's config repr (``SmoothQuantConfig(..., alpha=0.5)``)."""
    cfg = r.notes.get("config", "")
    return float(cfg.split("alpha=")[1].split(")")[0].split(",")[0]) if "alpha=" in cfg else None


def _level(r) -> str:
    cfg = r.notes.get("config", "")
    return cfg.split("level='")[1].split("'")[0] if "level='" in cfg else "-"


corpus = "wikitext2"
SWEEP = {
    _cfg_alpha(r): r.value
    for r in SWEEP_ROWS
    if r.method == "smoothquant" and r.dataset == corpus and _level(r) == "O3"
}
FP_PPL = next(r.value for r in SWEEP_ROWS if r.method == "fp" and r.dataset == corpus)
NAIVE_PPL = next(
    r.value for r in SWEEP_ROWS if r.method == "w8a8" and r.dataset == corpus and _level(r) == "O3"
)
print(f"fp {FP_PPL:.2f}   naive W8A8 O3 {NAIVE_PPL:.2f}")
for a in sorted(SWEEP):
    print(f"  alpha {a:4.2f}: {SWEEP[a]:10.2f}")
assert all(math.isfinite(v) for v in SWEEP.values())

fig, ax = plt.subplots(figsize=(5, 3.2))
xs = sorted(SWEEP)
ax.plot(xs, [SWEEP[a] for a in xs], "o-", label="SmoothQuant O3")
ax.axhline(NAIVE_PPL, color="C3", ls="--", label="naive W8A8 O3")
ax.axhline(FP_PPL, color="k", ls=":", label="float")
ax.set_yscale("log")
ax.set_xlabel("migration strength α")
ax.set_ylabel(f"{corpus} perplexity")
ax.legend()
savefig(fig, "smoothquant_alpha_sweep")
