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
# # Two quantization scaling laws, fitted to what the papers publish
#
# **(a) Quantization-induced degradation** — Ouyang et al., *Low-Bit Quantization Favors
# Undertrained LLMs*, arXiv 2411.17691: ΔqLoss(N, D, P) = k·D^β / (N^α·P^γ), fitted on
# GPTQ-quantized Pythia checkpoints; Figure 6's caption gives k = 0.017, β = 0.5251,
# α = 0.2261, γ = 5.4967.
#
# **(b) Floating-point quantization training** — Sun et al., *Scaling Laws for Floating-Point
# Quantization Training*, arXiv 2501.02423, Eq. 26:
# L = n/N^α + d/D^β + ε + (D^β/N^α)·log2(B) / (γ (E+½)^δ (M+½)^ν), constants in its Table 2.
#
# **What the papers publish as numbers, and what that allows.**
# * 2411.17691 publishes its measured ΔqLoss points only as plots (Figures 2–6). The one table
#   of numbers, Table 1, holds *predictions*: the training tokens at which ΔqLoss reaches
#   0.2 … 0.5 for 1B–405B models at 2/3/4 bits. Fitting the law to Table 1 therefore tests
#   whether Table 1 and the published constants agree — not the law against data.
# * 2501.02423 publishes no loss values in tables at all: Table 3 lists the 367 training
#   configurations without their losses; the losses appear only as plotted points. There is
#   nothing here to fit. What can be done honestly: draw the published law, derive its closed
#   forms (critical data size, best exponent/mantissa split), and check how well the paper's
#   own design identifies the eight constants when the losses are generated from the published
#   law itself (a parameter-recovery experiment, clearly synthetic).
#
# Sources and transcriptions: `papers/data/qid_table1_tokens.json`,
# `papers/data/fp_quant_training_design.json`.

# %%
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from _common import ROOT, SMALL, savefig

from numerics import scaling_laws as S
from numerics.analysis import (
    QID_FIXED_P_LAW,
    fp_best_exponent_split,
    fp_critical_data_size,
    qid_tokens_for_loss,
)
from numerics.zoo import markdown

N_STARTS = 4 if SMALL else 16
N_BOOT = 0 if SMALL else 200
NOISE_SEEDS = (0,) if SMALL else (0, 1, 2, 3, 4)
NOISE = 0.01  # multiplicative noise of the synthetic recovery experiment (1% of the loss)


def g4(rows):
    """Rows with floats written to 4 significant digits (for tables spanning many scales)."""
    return [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


QID_DATA = json.loads((ROOT / "papers/data/qid_table1_tokens.json").read_text())
FP_DESIGN = json.loads((ROOT / "papers/data/fp_quant_training_design.json").read_text())
print(f"SMALL={SMALL}")

# %% [markdown]
# ## (a) ΔqLoss law vs its own Table 1
#
# First: regenerate Table 1 from the Figure 6 constants, D = (ΔqLoss·N^α·P^γ / k)^(1/β).

# %%
rows = np.array(QID_DATA["rows"], dtype=np.float64)
N, P, DL, D_T = rows.T
D = D_T * 1e12
pub = dict(S.PAPER_QID_PARAMS)
D_pred = qid_tokens_for_loss(DL, N, P, **pub) / 1e12
REGEN = []
for p in (2.0, 3.0, 4.0):
    m = P == p
    rel = D_pred[m] / D_T[m] - 1
    REGEN.append({"bits": int(p), "max |rel. dev.|": float(np.abs(rel).max()),
                  "mean rel. dev.": float(rel.mean())})  # fmt: skip
print("Table 1 regenerated from the Figure 6 unified law, relative deviation per bit width:")
print(markdown(g4(REGEN)))

# %% [markdown]
# Then: fit the unified law to Table 1's 48 rows (log-space least squares,
# `numerics.scaling_laws.fit_qid_law`), and fit each bit width on its own with
# ΔqLoss = k_P·D^β_P / N^α_P (`numerics.analysis.QID_FIXED_P_LAW`).

# %%
unified = S.fit_qid_law(N, D, P, DL, n_starts=N_STARTS, n_boot=N_BOOT, seed=0)
QID_FITS = [
    {"fit": "published (Fig. 6 caption)", **{k: pub[k] for k in ("k", "alpha", "beta", "gamma")},
     "rms log": float("nan"), "R2 log": float("nan")},
    {"fit": "published single-factor (Figs. 3-5)", "k": float("nan"),
     **{k: QID_DATA["published_constants"]["single_factor_exponents"][k] for k in ("alpha", "beta", "gamma")},
     "rms log": float("nan"), "R2 log": float("nan")},
    {"fit": "ours: unified law on Table 1", **dict(unified.params),
     "rms log": unified.rms_log, "R2 log": unified.r2_log},
]  # fmt: skip
PER_BITS = {}
for p in (2.0, 3.0, 4.0):
    m = P == p
    fit = S.fit_law(QID_FIXED_P_LAW, {"N": N[m], "D": D[m]}, DL[m], n_starts=N_STARTS, seed=0)
    PER_BITS[int(p)] = fit
    QID_FITS.append({"fit": f"ours: P = {int(p)} alone", "k": fit.params["k"],
                     "alpha": fit.params["alpha"], "beta": fit.params["beta"], "gamma": float("nan"),
                     "rms log": fit.rms_log, "R2 log": fit.r2_log})  # fmt: skip
print(markdown(g4(QID_FITS)))
if unified.ci:
    print(
        "bootstrap 95% CI of the unified fit:",
        {k: tuple(round(v, 4) for v in ci) for k, ci in unified.ci.items()},
    )

# %% [markdown]
# ## (b) The floating-point quantization-training law
#
# Published constants (Table 2), the losses it predicts, the critical data size
# D_crit = (d·γ·(E+½)^δ·(M+½)^ν·N^α / log2 B)^(1/(2β)) beyond which more data raises the
# predicted loss, and the exponent/mantissa split it prefers at each width.

# %%
fp = dict(S.PAPER_FP_PARAMS)
fpk = {k: fp[k] for k in ("d", "alpha", "beta", "gamma", "delta", "nu")}
models = {r["name"]: r for r in FP_DESIGN["models"]["rows"]}
CRIT = []
for name in ("41M", "154M", "679M", "1.2B"):
    row = {"model": name}
    for E, M in ((1, 1), (2, 1), (3, 2), (4, 3)):
        row[f"E{E}M{M} D_crit (tokens)"] = float(
            fp_critical_data_size(models[name]["N"], E, M, 128, **fpk)
        )
    CRIT.append(row)
print("critical data size at block size B = 128:")
print(markdown(g4(CRIT)))

SPLITS = [{"bits (sign+E+M)": b, "best E": fp_best_exponent_split(b, delta=fp["delta"], nu=fp["nu"])[0],
           "best M": fp_best_exponent_split(b, delta=fp["delta"], nu=fp["nu"])[1]} for b in range(3, 13)]  # fmt: skip
print("exponent/mantissa split minimising the quantization term (published delta, nu):")
print(markdown(SPLITS))

# %% [markdown]
# ### Parameter recovery on the paper's design (synthetic — not the paper's data)
#
# Design: the four fitting model sizes × four token budgets of Table 3 × the 23 (E, M, B)
# configurations of its first block (368 points; the paper's own fitting set has 359 because
# some blocks omit a configuration). The law needs a number for B; for "channel" we take B =
# the model's hidden size and for "tensor" B = hidden² (our assumption; the configurations with
# B = 32 … 512 need none). Losses are generated **from the published law** and multiplied by
# exp(σ·z) with σ = 1%; the law is then refitted from the fitter's generic start.

# %%
design = []
for name in ("41M", "85M", "154M", "679M"):
    mdl = models[name]
    for Dv in FP_DESIGN["token_budgets"]["D"]:
        for E, M, B in FP_DESIGN["config_block"]["rows"]:
            Bn = {"channel": mdl["hidden"], "tensor": mdl["hidden"] ** 2}.get(B, B)
            design.append((mdl["N"], Dv, E, M, Bn))
XD = np.array(design, dtype=np.float64).T
L_true = S.fp_quant_loss(*XD, **fp)
RECOVERY = [{"run": "published (Table 2)", **fp, "rms log": 0.0}]
for seed in NOISE_SEEDS:
    noisy = L_true * np.exp(NOISE * np.random.default_rng(seed).standard_normal(L_true.shape))
    fit = S.fit_fp_quant_law(*XD, noisy, n_starts=N_STARTS, seed=seed,
                             n_boot=N_BOOT if seed == NOISE_SEEDS[0] else 0)  # fmt: skip
    RECOVERY.append(
        {"run": f"refit, noise seed {seed}", **dict(fit.params), "rms log": fit.rms_log}
    )
    if fit.ci:
        FP_CI = dict(fit.ci)
        print(
            "bootstrap 95% CI (seed 0):",
            {k: tuple(float(f"{v:.4g}") for v in ci) for k, ci in fit.ci.items()},
        )
print(f"{L_true.size} synthetic points, losses {L_true.min():.3f} .. {L_true.max():.3f}")
print(markdown(g4(RECOVERY)))

# %% [markdown]
# ## Plots

# %%
fig, axs = plt.subplots(1, 2, figsize=(12, 4.2))
Dgrid = np.geomspace(1e9, 1e14, 200)
for Nm, ls in ((1e9, "--"), (4.05e11, "-")):
    for p, c in ((2, "C3"), (3, "C1"), (4, "C0")):
        axs[0].plot(Dgrid, S.qid_loss(np.full_like(Dgrid, Nm), Dgrid, np.full_like(Dgrid, p), **pub),
                    ls=ls, c=c, lw=1)  # fmt: skip
for p, c in ((2, "C3"), (3, "C1"), (4, "C0")):
    for Nm, mk in ((1e9, "o"), (4.05e11, "s")):
        m = (P == p) & (N == Nm)
        axs[0].scatter(D[m], DL[m], c=c, marker=mk, s=14,
                       label=f"Table 1, {p} bits, N = {Nm:.3g}")  # fmt: skip
axs[0].set(xscale="log", yscale="log", ylim=(1e-3, 10), xlabel="training tokens D", ylabel="ΔqLoss (nats)",
           title="Fig. 6 law (lines: N = 1B dashed, 405B solid) vs Table 1")  # fmt: skip
axs[0].legend(fontsize=7)

N154 = models["154M"]["N"]
for E, M in ((1, 1), (2, 1), (3, 2), (4, 3)):
    Lc = S.fp_quant_loss(np.full_like(Dgrid, N154), Dgrid, np.full_like(Dgrid, E), np.full_like(Dgrid, M),
                         np.full_like(Dgrid, 128.0), **fp)  # fmt: skip
    (line,) = axs[1].plot(Dgrid, Lc, label=f"E{E}M{M}")
    Dc = float(fp_critical_data_size(N154, E, M, 128, **fpk))
    axs[1].plot(Dc, S.fp_quant_loss(N154, Dc, E, M, 128, **fp), "o", c=line.get_color())
axs[1].set(xscale="log", xlabel="training tokens D", ylabel="predicted loss",
           title="Table 2 law, N = 154M, B = 128 (dots: D_crit)", ylim=(2.5, 4.5))  # fmt: skip
axs[1].legend(fontsize=8)
savefig(fig, "scaling_laws")

# %% [markdown]
# ## Reading the result
#
# * **Table 1 of 2411.17691 does not follow from the Figure 6 constants.** Regenerating it from
#   the unified law reproduces the 2-bit column to within its rounding but misses the 3- and
#   4-bit columns by tens of percent, and the unified law fitted to Table 1 leaves large log
#   residuals. Fitted one bit width at a time, ΔqLoss = k_P·D^β_P / N^α_P reproduces every
#   column to its printed precision, with exponents that differ between widths. So Table 1 was
#   evidently computed from separate per-bit-width fits, not from the unified law of Figure 6.
#   Which of the two the paper's headline conclusions rest on is not something this notebook
#   can settle; both say ΔqLoss grows with D and falls with N and P.
# * The measured ΔqLoss points of 2411.17691 and the measured losses of 2501.02423 are
#   published only as plots, so neither law could be refitted to measurements here.
# * For 2501.02423, refitting its law to losses generated from its own constants on its own
#   design shows which constants the design pins down at 1% noise (see the recovery table):
#   compare each refit with the published row; constants that move far between noise seeds
#   (typically γ, δ, ν, which trade off against each other in one product) are weakly
#   identified by such a design.
