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
# # ZeroQuant(4+2) on SmolLM2-135M: FP6 E3M2 weights against full precision and INT6
#
# ZeroQuant(4+2) (arXiv 2312.08583): FP6 (E3M2) weights with one scale per output channel
# (coarse-grained) stay close to full precision (W6A16), and the 6-bit codes are stored as a
# 4-bit and a 2-bit plane so that each packs evenly into words. Here: FP6 against INT6 RTN
# (asymmetric, zero point) at the same granularity, and the 4+2 split checked bit for bit on a
# real weight.
#
# **Sizes** as in `zeroquant_v2.py` (full: 16 windows of 512 on WikiText-2 and C4; small: a
# 2-block cut, a smoke test).

# %%
import os

import jax.numpy as jnp
import numpy as np
from _common import SMALL, plot_variants, variant_rows, variant_table

from harness.model import get_param
from harness.pipeline import load
from methods.base import LayerStats
from methods.compare import CompareConfig
from methods.zeroquant_4p2 import ZeroQuant42Config, quantize_layer
from methods.zeroquant_4p2.core import join_4p2, split_4p2
from numerics.sparse import weight_bits

VARIANTS = {
    "FP6 E3M2 per-channel": ("zeroquant_4p2", "W6gch", {}),
    "INT6 RTN per-channel": ("rtn", "W6gch", {}),
}
if SMALL:
    CMP = CompareConfig(n_calib=2, calib_seqlen=128, seqlen=128, windows=2)
else:  # the measured rows (g128 not measured yet)
    CMP = CompareConfig(corpora=("wikitext2", "c4"))
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %% [markdown]
# ## The 4+2 layout on a real weight
#
# Block 0's `up_proj` (1536 × 576) in FP6: split into a 4-bit plane (8 codes per uint32) and a
# 2-bit plane (16 per uint32), joined back, compared code by code.

# %%
_, PARAMS, _ = load("smollm2")
W = jnp.asarray(get_param(PARAMS["blocks"][0], "mlp.up_proj"), jnp.float32)
QA = quantize_layer(W, LayerStats(), ZeroQuant42Config()).weight
HI, LO = split_4p2(QA)
BACK = join_4p2((HI, LO), QA)
ROUNDTRIP_OK = bool(np.array_equal(np.asarray(BACK.codes), np.asarray(QA.codes)))
PLANE_BITS = (HI.size * 32 + LO.size * 32) / QA.size
print(f"planes {HI.shape} + {LO.shape} words: {PLANE_BITS:.3f} code bits per weight, "
      f"{weight_bits(QA):.4f} bits per weight with the scales; round trip exact: {ROUNDTRIP_OK}")  # fmt: skip
del PARAMS

# %%
ROWS = variant_rows(VARIANTS, cmp=CMP, rows_from=ROWS_FROM, small=SMALL)
TABLE = variant_table(ROWS)
print(TABLE)
plot_variants(ROWS, "ZeroQuant(4+2) on SmolLM2-135M (W6A16)", "zeroquant_4p2")
