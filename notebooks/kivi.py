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
# # KIVI (arXiv 2402.02750): a 2-bit KV cache, keys per channel, values per token
#
# KIVI quantizes keys per **channel** (a min / scale per channel for each group of 32 tokens —
# key outliers sit in fixed channels) and values per **token** (groups of 32 channels), and
# keeps the most recent tokens in full precision (a residual of 128). It needs no calibration.
# It is the baseline of every other KV-cache method here.
#
# Two views of the same cache (`harness.kvcache`): perplexity, where each query sees the cache
# as decoding would have stored it, and decoding itself (`harness.decode`), which stores packed
# 2-bit codes with fp16 scales and zero points. The bits per element count codes, scales, zero
# points and the full-precision window (at 16 bits) at 2048 tokens.
#
# **Sizes.** Full size (`LOWBIT_SMALL=0` with `LOWBIT_ROWS=papers/data/kivi_rows.json`: the
# card's numbers): 16 windows of 512 of WikiText-2 and C4. Small (CI): the first 2 blocks of
# SmolLM2, 1 window of 256 (the residual of 128 leaves half of it quantized) — it shows the
# pipeline runs; its numbers are not results.

# %%
import dataclasses
import os

import numpy as np
from _common import SMALL

from harness import kvcache
from harness.decode import Decoder
from harness.model import Model
from harness.pipeline import load
from harness.results import load_results
from methods.compare import CompareConfig, pivot, run
from methods.kivi import KIVIConfig, kv_quant

SETTINGS = ["KV2", "KV3", "KV4"]
CMP = (
    CompareConfig(n_calib=2, calib_seqlen=128, seqlen=256, windows=1)
    if SMALL
    else CompareConfig(corpora=("wikitext2", "c4"))
)
ROWS_FROM = None if SMALL else os.environ.get("LOWBIT_ROWS")
print(f"SMALL={SMALL}  {CMP}  rows from: {ROWS_FROM or 'this run'}")

# %%
model, params, tok = load("smollm2")
if SMALL:  # CI: the embedding, the first 2 blocks and the head
    model = Model(dataclasses.replace(model.cfg, n_layers=2))
    params = {**params, "blocks": params["blocks"][:2]}
if ROWS_FROM:
    ROWS = load_results(ROWS_FROM)
    if not ROWS:
        raise FileNotFoundError(f"LOWBIT_ROWS={ROWS_FROM}: no results there")
    ROWS = list({(r.notes["setting"], r.method, r.dataset): r for r in ROWS}.values())
else:
    ROWS = run(
        model, params, tok, model_name="smollm2", methods=["kivi"], settings=SETTINGS, cmp=CMP,
        on_row=lambda r: print(f"  {r.method:5s} {r.bits:32s} {r.dataset:9s} ppl {r.value:9.2f}"),
    )  # fmt: skip
print(pivot(ROWS))

# %% [markdown]
# ## The headline shape
#
# KIVI's claim (abstract): "2bit KIVI … brings 2.6× less peak memory … while almost keeping the
# same quality". On perplexity: KV4 should be within noise of full precision, KV2 close.

# %%
PPL = {(r.notes["setting"], r.dataset): r.value for r in ROWS if r.metric == "ppl"}
KV_BITS = {r.notes["setting"]: r.notes["kv_bits"] for r in ROWS if r.method == "kivi"}
CORPORA = sorted({c for _, c in PPL})
for c in CORPORA:
    fp = PPL[("fp", c)]
    print(c, f"fp {fp:.2f}", *(f"{s} {PPL[(s, c)]:.2f} ({PPL[(s, c)] / fp - 1:+.1%})"
                                 for s in SETTINGS))  # fmt: skip
print("bits per cached element at 2048 tokens:", {s: round(b, 3) for s, b in KV_BITS.items()})

# %% [markdown]
# ## Decoding from the stored cache
#
# Greedy generation with the full-precision and the 2-bit cache; the bytes the cache arrays
# hold after the same number of tokens (the 2-bit store holds packed codes; the rings hold the
# full-precision window in float32, the model's compute dtype).

# %%
CAPACITY = 1024
prompt = np.asarray(tok.encode("The capital of France is"), np.int32)[None]
GEN = {}
for label, hooks in (("fp", model.hooks), ("KIVI-2", dataclasses.replace(
        model.hooks, kv_quant=kv_quant(KIVIConfig(bits=2))))):  # fmt: skip
    dec = Decoder(Model(model.cfg, hooks), capacity=CAPACITY)
    g = dec.generate(params, prompt, max_new_tokens=4 if SMALL else 24)
    GEN[label] = g
    print(f"{label:7s} {g.cache_bytes / 2**20:6.2f} MiB  {tok.decode(g.tokens[0].tolist())!r}")
FULL_MIB = kvcache.cache_mib(kvcache.FULL, n_tokens=2048, n_layers=model.cfg.n_layers,
                             kv_heads=model.cfg.n_kv_heads, head_dim=model.cfg.head_dim)  # fmt: skip
KIVI_MIB = kvcache.cache_mib(kv_quant(KIVIConfig(bits=2)), n_tokens=2048,
                             n_layers=model.cfg.n_layers, kv_heads=model.cfg.n_kv_heads,
                             head_dim=model.cfg.head_dim)  # fmt: skip
print(f"at 2048 tokens (fp16 counting): fp {FULL_MIB:.1f} MiB, KIVI-2 {KIVI_MIB:.1f} MiB")
