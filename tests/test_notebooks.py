"""Execute every notebook in ``notebooks/`` at small size and check something real about each.

Notebooks are jupytext percent-format ``.py`` files; every ``notebooks/*.py`` is picked up by
listing. Each runs in-process (``runpy.run_path``) with ``LOWBIT_SMALL=1`` and the Agg backend,
under the suite's strict settings (rank promotion raises, warnings are errors). A small run
must not write figures. The globals a notebook leaves behind are what the checks read: give a
notebook its own checks by adding a function to ``CHECKS`` under the notebook's file stem;
a notebook without one is still executed and must define ``SMALL = True``.
"""

import math
import os
import runpy
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from numerics import scaling_laws as S

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if not p.name.startswith("_"))
FIGURES = ROOT / "notebooks" / "figures"


def _figure_files() -> set[tuple[str, float]]:
    if not FIGURES.exists():
        return set()
    return {(str(p), p.stat().st_mtime) for p in FIGURES.rglob("*") if p.is_file()}


def _run(path: Path) -> dict:
    old = {k: os.environ.get(k) for k in ("LOWBIT_SMALL", "MPLBACKEND")}
    os.environ["LOWBIT_SMALL"] = "1"
    os.environ["MPLBACKEND"] = "Agg"
    matplotlib.use("Agg")
    sys.path.insert(0, str(path.parent))  # the notebooks' shared `_common`, as in Jupyter
    try:
        return runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.path.remove(str(path.parent))
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- per-notebook checks


def check_qlora_datatypes(g: dict) -> None:
    rows = {(r["format"], r["DQ"]): r for r in g["TABLE"]}
    formats = {f for f, dq in rows if not f.startswith("k-means")}
    for f in formats:
        plain, dq = rows[(f, False)], rows[(f, True)]
        # QLoRA §3: DQ saves 0.5 - 0.127 ≈ 0.373 bit/weight ...
        assert 0.36 < plain["bits/weight"] - dq["bits/weight"] < 0.38
        # ... at a negligible cost in error.
        assert 0 <= plain["SQNR dB"] - dq["SQNR dB"] < 0.1
    nf4 = rows[("NF4", False)]["SQNR dB"]
    for f in ("FP4 E2M1 (OCP)", "FP4 E2M1 (bnb table)", "FP4 E3M0", "INT4 sym (absmax)"):
        assert nf4 > rows[(f, False)]["SQNR dB"], f  # NF4 beats every symmetric 4-bit type
    assert rows[("k-means 16 levels (reference)", False)]["SQNR dB"] >= nf4
    smol = {(r["format"], r["DQ"]): r for r in g["SMOLLM2_TABLE"]}
    assert set(smol) == set(rows) - {("k-means 16 levels (reference)", False)}
    for f in formats:
        plain, dq = smol[(f, False)], smol[(f, True)]
        # on real SmolLM2 matrices too (DQ pads each matrix's scales to whole blocks of 256)
        assert 0.36 < plain["bits/weight"] - dq["bits/weight"] < 0.38
        assert 0 <= plain["SmolLM2 SQNR dB"] - dq["SmolLM2 SQNR dB"] < 0.1
        assert math.isfinite(plain["SmolLM2 SQNR dB"]) and plain["SmolLM2 min dB"] > 0
    assert g["SMOL_ORDER"][-1] == "FP4 E3M0"  # real blocks rank E3M0 last, as Gaussian ones
    paper = {r["paper row"]: r["paper mean PPL"] for r in g["RANKING"]}
    table2 = {"Int4": 34.34, "Float4 (E2M1)": 31.07, "Float4 (E3M0)": 29.48, "NFloat4 + DQ": 27.41}
    assert paper == table2
    assert all(math.isfinite(v) for r in g["SWEEP"] for v in r.values())


def check_bipolar_int(g: dict) -> None:
    pairs = {(r["bits a"], r["bits w"]) for r in g["EXACT"]}
    assert {(1, 1), (2, 2), (3, 3), (4, 4)} <= pairs
    assert all(
        r["max |bipolar planes - direct|"] == 0 and r["max |INT planes - direct|"] == 0
        for r in g["EXACT"]
    )
    assert all(g["LOSSLESS"].values()) and set(g["LOSSLESS"]) == set(range(2, 9))
    assert [r["bipolar levels"] for r in g["SETS"]] == [2, 4, 8, 16]
    err = {(r["bits"], r["format"]): r for r in g["DOT_ERR"]}
    col = "XW^T SQNR dB (W only)"
    assert err[(2, "bipolar")][col] > err[(2, "INT sym")][col]  # 4 levels beat {-1, 0, 1}
    for name in {f for _, f in err}:
        assert err[(2, name)][col] < err[(3, name)][col] < err[(4, name)][col]


def check_bitmod(g: dict) -> None:
    rows = {(r["bits"], r["method"]): r for r in g["TABLE"]}
    for bits, basic in ((3, "FP3 (basic)"), (4, "FP4 E2M1 (basic)")):
        sel = rows[(bits, f"BitMoD{bits}")]
        # The candidate set is a superset of the ER-only and EA-only sets, and each ER type
        # contains the basic type's values at the same scale: the selection can only be better.
        for other in (basic, f"FP{bits} ER+/-", f"FP{bits} EA+/-"):
            for d in g["DATA"]:
                assert sel[f"{d} MSE x1e3"] <= rows[(bits, other)][f"{d} MSE x1e3"] * (1 + 1e-6)
        assert sel["bits/weight"] == pytest.approx(bits + 16 / 128 + 2 / 128)
    for shares in g["CHOICES"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0 <= r["side = sign of absmax"] <= 1 for r in g["SIDE"] if r["groups"] > 0)


def check_scaling_laws(g: dict) -> None:
    fits = g["PER_BITS"]
    assert set(fits) == {2, 3, 4}
    assert max(f.rms_log for f in fits.values()) < 0.01  # Table 1 to its printed rounding
    assert g["unified"].rms_log > 10 * max(f.rms_log for f in fits.values())
    assert g["QID_FITS"][0]["k"] == S.PAPER_QID_PARAMS["k"]
    regen = {r["bits"]: r for r in g["REGEN"]}
    assert regen[2]["max |rel. dev.|"] < 0.1
    rec = g["RECOVERY"]
    assert rec[0]["gamma"] == S.PAPER_FP_PARAMS["gamma"]
    assert all(0.5 * g["NOISE"] < r["rms log"] < 1.5 * g["NOISE"] for r in rec[1:])
    assert np.all(np.diff([r["best E"] + r["best M"] for r in g["SPLITS"]]) == 1)


def check_weight_only(g: dict) -> None:
    """Every method ran at every setting; bits per weight are what the formats cost. (The small
    run uses a 2-block cut of SmolLM2, so its perplexities are not compared with anything.)"""
    got = {(r.notes["setting"], r.method) for r in g["ROWS"]}
    assert got == {("fp", "fp")} | {(s, m) for s in g["SETTINGS"] for m in g["METHODS"]}
    for r in g["ROWS"]:
        assert math.isfinite(r.value) and r.value > 1
        if r.method == "fp":
            continue
        bpw = r.notes["bpw"]
        if r.method in ("rtn", "gptq", "awq", "omniquant"):
            # 3-bit codes + per group of 128 an fp16 scale and a 3-bit zero; SmolLM2's 576-wide
            # inputs (4,608 rows per block) have 5 groups (the last one ragged), down_proj's
            # 1536-wide inputs (576 rows) 12; 3,538,944 weights per block
            groups = 5 * 4608 + 12 * 576
            assert bpw == pytest.approx(3 + (16 + 3) * groups / 3538944, abs=1e-9), (r.method, bpw)
        else:  # SpQR / SqueezeLLM: codes + their own statistics and outliers
            assert 3 < bpw < 5, (r.method, bpw)
    assert "| W3g128 | gptq |" in g["TABLE"]


def check_fp_vs_int(g: dict) -> None:
    assert g["Q41_MAX_DISTINCT"] <= 16  # the GGUF's Q4_1 grid: 16 levels per group of 32
    for r in g["W_ROWS"]:
        # E4M3 has 3 mantissa bits: |error| <= 2^-4 |w| in its normal range, so a per-tensor
        # SQNR can't fall below 10·log10(2^8); its relative error doesn't depend on the scale,
        # so per-tensor and per-channel scaling differ only through the top binade / subnormals.
        assert r["FP8 E4M3 | tensor"] >= 10 * math.log10(2**8)
        assert abs(r["FP8 E4M3 | tensor"] - r["FP8 E4M3 | channel"]) < 1.0
    for rows in (g["W_ROWS"], g["A_ROWS"]):
        for r in rows:
            for gran in {k.split(" | ")[1] for k in r if " | " in k}:
                assert r[f"INT8 sym | {gran}"] > r[f"INT4 sym | {gran}"]
                assert r[f"FP8 E4M3 | {gran}"] > r[f"FP4 E2M1 | {gran}"]
    # The search space holds the fixed format at clipping ratio 1: never worse (float32 sums).
    assert g["SEARCH_MIN_GAIN"] > -1e-4
    for bits in (4, 8):
        for res in (g["SEARCH_W"][bits], g["SEARCH_A"][bits]):
            assert all(r["best"] in g["SPACES"][bits] for r in res.values())
    # Data property of SmolLM2's last block: its down_proj input has massive channels, which
    # set a per-tensor INT8 step far too coarse for the rest; E4M3's range absorbs them.
    a29 = next(r for r in g["A_ROWS"] if r["tensor"] == "blocks.29.down_in")
    assert a29["FP8 E4M3 | tensor"] > a29["INT8 sym | tensor"]


def check_block_formats(g: dict) -> None:
    assert g["MXINT8_IS_BFP16"]
    for (name, b), bpw in g["BPW"].items():
        cfg = g["FORMATS"][name][1](b)
        scale_bits = 8 if cfg.scale_kind == "pow2" else 16  # E8M0 or float16 per block
        assert bpw == pytest.approx(cfg.fmt.bits + scale_bits / b)
    w = {r["format"]: r for r in g["W_TABLE"]}
    for name in ("BFP12 (INT4 mant.)", "BFP14 (INT6 mant.)", "MXINT8 (= BFP16)"):
        # integer mantissas: a smaller block's shared exponent is never larger
        assert w[name]["SQNR b=16"] > w[name]["SQNR b=32"] > w[name]["SQNR b=64"]
    clip = {r["format"]: r for r in g["CLIP"]}
    for r in clip.values():  # more blocks, more block maxima above the element's largest value
        assert r["clamped b=16"] >= r["clamped b=64"]
    assert g["ATTN_REL_ERR"] < 1e-5  # recomputed post-RoPE q, k reproduce the model's attention
    assert g["PERM_RATIO"] <= 1.0  # q[π]·k[π] = q·k within the float32 reordering bound
    assert g["B64_MAX_DIFF"] == 0.0  # one block per head: sorting within it changes nothing
    K = g["K_SQNR"]
    for name in g["K_FORMATS"]:
        for s in g["SORTS"]:
            np.testing.assert_allclose(K[(name, 64, s)], K[(name, 64, "none")], atol=1e-4)
    for b in (16, 32):  # K-sort by calibration RMS lowers the BFP12 key-cache error
        assert (
            K[("BFP12 (INT4 mant.)", b, "calib. RMS")].mean()
            > K[("BFP12 (INT4 mant.)", b, "none")].mean()
        )


def check_qid_training(g: dict) -> None:
    rows = g["ROWS"]
    by_ckpt: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        by_ckpt.setdefault((r["run"], r["step"]), {})[r["P"]] = r["dloss"]
    assert len(by_ckpt) == len(g["CFGS"]) * 2  # 2 sizes x 2 budgets at small size
    for key, d in by_ckpt.items():  # fewer bits, more degradation; 4 bits costs ~nothing
        assert d[2] > d[3] > d[4] > -0.005, (key, d)
    for run in g["RUNS"]:  # training worked: the loss fell well below its start
        assert run["train loss last 10"] < run["train loss first 10"] - 1.0, run["run"]
    for run_name in g["CFGS"]:  # held-out float loss falls along each run
        lf = [r["loss_float"] for r in sorted(rows, key=lambda r: r["D"]) if r["run"] == run_name]
        assert lf[-1] < lf[0], run_name
    fit = g["FIT"]
    assert fit.n_points >= 8 and all(math.isfinite(v) for v in fit.params.values())
    assert g["FITS"][0]["beta"] == S.PAPER_QID_PARAMS["beta"]


CHECKS = {
    "qlora_datatypes": check_qlora_datatypes,
    "bipolar_int": check_bipolar_int,
    "bitmod": check_bitmod,
    "scaling_laws": check_scaling_laws,
    "weight_only": check_weight_only,
    "fp_vs_int": check_fp_vs_int,
    "block_formats": check_block_formats,
    "qid_training": check_qid_training,
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_small_and_checks(path):
    before = _figure_files()
    g = _run(path)
    assert g.get("SMALL") is True, "a notebook must define SMALL from LOWBIT_SMALL"
    assert _figure_files() == before, "a small run must not write figures"
    check = CHECKS.get(path.stem)
    if check is not None:
        check(g)


def test_every_check_has_a_notebook():
    assert set(CHECKS) <= {p.stem for p in NOTEBOOKS}


def check_smoothquant(g: dict) -> None:
    """Every α of the sweep ran at O3 with 8-bit activations; the naive and fp rows exist."""
    assert sorted(g["SWEEP"]) == sorted(g["ALPHAS"])
    assert all(math.isfinite(v) and v > 1 for v in g["SWEEP"].values())
    assert math.isfinite(g["NAIVE_PPL"]) and g["FP_PPL"] > 1
    quantized = [r for r in g["ROWS"] + g["SWEEP_ROWS"] if r.method != "fp"]
    assert quantized and all(r.notes["bpa"] == 8.0 for r in quantized)
    assert "| W8A8 | smoothquant |" in g["TABLE"] and "| W8A8 | w8a8 |" in g["TABLE"]


def check_llm_int8(g: dict) -> None:
    """Both variants and fp evaluated; one outlier fraction in [0, 1] per block linear."""
    assert {v for v, _ in g["PPL"]} == {"fp", "absmax", "int8()"}
    names = [o["name"] for o in g["OUTLIERS"]]
    assert len(names) == len(set(names)) and len(names) % 7 == 0
    assert all(0.0 <= o["outlier_frac"] <= 1.0 for o in g["OUTLIERS"])


CHECKS["smoothquant"] = check_smoothquant
CHECKS["llm_int8"] = check_llm_int8


# SmolLM2 block: 4,608 rows of 576 inputs (q, k, v, o, gate, up) and 576 rows of 1,536 (down),
# 3,538,944 weights; groups of 128: 5 per 576-wide row (the last ragged), 12 per 1,536-wide row.
_SMOL_ROWS, _SMOL_SIZE = 4608 + 576, 3538944


def _smol_groups(g: int) -> int:
    return -(-576 // g) * 4608 + -(-1536 // g) * 576


def check_dgq(g: dict) -> None:
    """Both rows ran on every corpus at 8-bit activations; DGQ's integer group scales cost
    exactly 8 bits (plain W4A8: float16) plus one float16 scale per output channel."""
    for m in g["METHODS"]:
        for c in g["CORPORA"]:
            assert math.isfinite(g["PPL"][(m, c)]) and g["PPL"][(m, c)] > 1
        assert g["BPA"][m] == 8.0
    groups = _smol_groups(128)
    assert g["BPW"]["rtn_act"] == pytest.approx(4 + (16 + 4) * groups / _SMOL_SIZE, abs=1e-9)
    dgq = 4 + (8 + 4) * groups / _SMOL_SIZE + 16 * _SMOL_ROWS / _SMOL_SIZE
    assert g["BPW"]["dgq"] == pytest.approx(dgq, abs=1e-9)


def check_mixllm(g: dict) -> None:
    """Plain W4A8 costs what its groups cost; MixLLM's 8-bit rows cost 8 bits each, within the
    budget: its bits lie between plain g128 and g128 with a full ``frac`` of rows at 8 bits."""
    t = g["TABLE"]
    for s, gs in (("W4A8g128", 128), ("W4A8g64", 64), ("W4A8g32", 32)):
        expect = 4 + (16 + 4) * _smol_groups(gs) / _SMOL_SIZE
        assert t[f"plain {s}"]["bpw"] == pytest.approx(expect, abs=1e-9)
    b4 = t["plain W4A8g128"]["bpw"]
    for frac in g["FRACS"]:
        b = t[f"MixLLM {frac:.0%}"]["bpw"]
        # a promoted row trades ≈ 4.17 bits for 8 + its fp16 scale + its 16-bit index
        assert b4 + 0.9 * frac * (8 - 4.2) < b <= b4 + frac * (8 + 32 / 576 - 4.15) + 1e-9
    assert t["MixLLM 10%"]["bpw"] > t["MixLLM 5%"]["bpw"]
    for line in t.values():
        assert all(math.isfinite(line[c]) for c in g["CORPORA"])


def check_smoothquant_plus(g: dict) -> None:
    """Folded smoothing scales cost no bits: SmoothQuant+ stores exactly RTN's INT4 g128."""
    expect = 4 + (16 + 4) * _smol_groups(128) / _SMOL_SIZE
    for m in ("rtn", "smoothquant_plus"):
        assert g["BPW"][m] == pytest.approx(expect, abs=1e-9)
        for c in g["CORPORA"]:
            assert math.isfinite(g["PPL"][(m, c)])


CHECKS |= {"dgq": check_dgq, "mixllm": check_mixllm, "smoothquant_plus": check_smoothquant_plus}


# SmolLM2's seven linears per block: outputs and inputs, 3,538,944 weights (the 2-block cut: x2).
_SMOL_OUT = (576, 192, 192, 576, 1536, 1536, 576)
_SMOL_IN = (576, 576, 576, 576, 576, 576, 1536)
_SMOL_W = sum(o * i for o, i in zip(_SMOL_OUT, _SMOL_IN, strict=True))
_SMOL_G128 = 5 * 4608 + 12 * 576  # g128 groups per block (576 = 4 x 128 + a ragged 64)


def _variant_bpw(g: dict) -> dict[str, float]:
    got = {r.notes["variant"] for r in g["ROWS"]}
    assert got == {"fp"} | set(g["VARIANTS"]), got
    for r in g["ROWS"]:
        assert math.isfinite(r.value) and r.value > 1
    return {r.notes["variant"]: r.notes["bpw"] for r in g["ROWS"] if r.method != "fp"}


def check_zeroquant_v2(g: dict) -> None:
    """LoRC's extra bits are exactly its factors: per linear Û (out x 8 codes of 8 bits + an
    fp16 scale a row) and V̂ (8 x in codes + 8 fp16 scales); the dense part is INT4 g128 with
    4-bit zero points; activations are 8-bit."""
    bpw = _variant_bpw(g)
    lorc = sum(
        o * (8 * 8 + 16) + 8 * (8 * i + 16) for o, i in zip(_SMOL_OUT, _SMOL_IN, strict=True)
    )
    plain = 4 + (16 + 4) * _SMOL_G128 / _SMOL_W
    assert bpw["W4A8 g128"] == pytest.approx(plain, abs=1e-9)
    assert bpw["W4A8 g128 + LoRC"] == pytest.approx(plain + lorc / _SMOL_W, abs=1e-9)
    assert all(r.notes["bpa"] == 8 for r in g["ROWS"] if r.method != "fp")


def check_zeroquant_fp(g: dict) -> None:
    """INT4 weights carry 4-bit zero points, FP4 ones only fp16 scales, whatever the scale
    constraint; every variant quantizes activations to 8 bits."""
    bpw = _variant_bpw(g)
    for v, b in bpw.items():
        zero = 4 if v.startswith("INT4") else 0
        assert b == pytest.approx(4 + (16 + zero) * _SMOL_G128 / _SMOL_W, abs=1e-9), (v, b)
    assert all(r.notes["bpa"] == 8 for r in g["ROWS"] if r.method != "fp")


def check_zeroquant_4p2(g: dict) -> None:
    """The 4+2 planes of a real FP6 weight round-trip bit for bit and hold exactly 6 code bits
    per weight (576 inputs = 72 words of 4 bits + 36 of 2 bits per row); per channel, FP6
    costs 6 bits + one fp16 scale per row, INT6 RTN also a 6-bit zero point."""
    assert g["ROUNDTRIP_OK"] is True and g["PLANE_BITS"] == 6.0
    bpw = _variant_bpw(g)
    rows = sum(_SMOL_OUT)
    assert bpw["FP6 E3M2 per-channel"] == pytest.approx(6 + 16 * rows / _SMOL_W, abs=1e-9)
    assert bpw["INT6 RTN per-channel"] == pytest.approx(6 + 22 * rows / _SMOL_W, abs=1e-9)


CHECKS |= {
    "zeroquant_v2": check_zeroquant_v2,
    "zeroquant_fp": check_zeroquant_fp,
    "zeroquant_4p2": check_zeroquant_4p2,
}


def check_kivi(g: dict) -> None:
    """Every setting ran; the bits per element are KIVI's own count at 2048 tokens (keys: 1920
    quantized after the last flush of 128 and 128 in fp16; values: all but the last 129), and
    the stored 2-bit cache is smaller than the full-precision one after the same tokens."""
    for s in g["SETTINGS"]:
        for c in g["CORPORA"]:
            assert math.isfinite(g["PPL"][(s, c)]) and g["PPL"][(s, c)] > 1
        b = int(s[2:])
        q = b + 2 * 16 / 32  # codes + fp16 scale and zero per group of 32
        assert g["KV_BITS"][s] == pytest.approx((1920 * q + 128 * 16 + 1919 * q + 129 * 16) / 4096)
    fp, kivi = g["GEN"]["fp"], g["GEN"]["KIVI-2"]
    assert fp.tokens.shape == kivi.tokens.shape and kivi.cache_bytes < fp.cache_bytes / 2
    assert g["KIVI_MIB"] < g["FULL_MIB"] / 3


CHECKS["kivi"] = check_kivi


def _gear_bits(bits: float, extra: float, n: int = 2048, n_b: int = 64) -> float:
    """Mean bits of a GEAR-style cache at ``n`` tokens: ``n_b·⌊(n − 1)/n_b⌋`` stored at
    ``bits + extra`` per element, the rest 16-bit."""
    q = n_b * ((n - 1) // n_b)
    return (q * (bits + extra) + (n - q) * 16) / n


def check_gear(g: dict) -> None:
    """Every row ran; GEAR's bits are the quantizer's plus exactly its rank-2 factors and its
    81 outliers (value + 16-bit index) per head-chunk of 64 × 64; the quantizer alone costs
    only codes and float16 scale / zero per group of 64."""
    for (name, setting, c), v in g["PPL"].items():
        assert math.isfinite(v) and v > 1, (name, setting, c)
    low_rank, sparse = 16 * 2 * 128 / 4096, 32 * 81 / 4096
    for setting, b in (("KV2", 2), ("KV4", 4)):
        if ("gear", setting) in g["KV_BITS"]:
            want = _gear_bits(b, 0.5 + low_rank + sparse)
            assert g["KV_BITS"][("gear", setting)] == pytest.approx(want, abs=1e-9)
            alone = g["KV_BITS"][("quant alone", setting)]
            assert alone == pytest.approx(_gear_bits(b, 0.5), abs=1e-9)


def check_wkvquant(g: dict) -> None:
    """Both rows ran; past-only keeps one 16-bit token per side, the other quantizes all, both
    at code bits + float16 scale and zero per token and head of 64."""
    for (name, setting, c), v in g["PPL"].items():
        assert math.isfinite(v) and v > 1, (name, setting, c)
    for setting, b in (("KV4", 4), ("KV2", 2)):
        if ("past-only", setting) in g["KV_BITS"]:
            e = b + 32 / 64
            po = g["KV_BITS"][("past-only", setting)]
            assert po == pytest.approx((2047 * e + 16) / 2048, abs=1e-9)
            assert g["KV_BITS"][("current too", setting)] == pytest.approx(e, abs=1e-9)


CHECKS |= {"gear": check_gear, "wkvquant": check_wkvquant}


def check_bfp_kv(g: dict) -> None:
    """Every variant ran on every corpus; a key element costs its mantissa bits plus one 8-bit
    exponent per block of 32, and a row's mean KV bits are the mean of keys and BFP16 values."""
    got = {r.notes["variant"] for r in g["ROWS"]}
    assert got == {"fp"} | set(g["VARIANTS"]), got
    for r in g["ROWS"]:
        assert math.isfinite(r.value) and r.value > 1
    for m, b in g["KEY_BITS"].items():
        assert b == pytest.approx(m + 8 / 32, abs=1e-12)
    value_bits = 8 + 8 / 32
    for label, (_, setting, _) in g["VARIANTS"].items():
        if label.startswith("BFP"):
            m = int(setting[2:])
            assert g["KV_BITS"][label] == pytest.approx((m + 8 / 32 + value_bits) / 2)
    for c, h in g["HEADLINE"].items():
        assert h["K-sort BFP12"] == g["PPL"][("BFP12 K-sort", c)]


CHECKS |= {"bfp_kv": check_bfp_kv}


def _kv_bits(codes: float, group: int, n_quantized: int, n: int = 2048) -> float:
    """Bits per cached element at ``n`` tokens: ``n_quantized`` tokens of ``codes`` bits plus an
    fp16 scale and zero per ``group`` elements, the rest at 16 bits (both sides alike)."""
    return (n_quantized * (codes + 32 / group) + (n - n_quantized) * 16) / n


def check_rotatekv(g: dict) -> None:
    """Every KV2 row ran on every corpus; RotateKV and its ablation store 2-bit codes with one
    fp16 scale and zero per token and head of 64, every token but the sink; KIVI-2 its groups of
    32 and its full-precision residual (1920 keys and 1919 values of 2048 quantized)."""
    for m in g["METHODS"]:
        for c in g["CORPORA"]:
            assert math.isfinite(g["PPL"][(m, c)]) and g["PPL"][(m, c)] > 1
    for m in ("rotatekv", "rotatekv_plain"):
        assert g["KV_BITS"][m] == pytest.approx(_kv_bits(2, 64, 2047), abs=1e-9)
    kivi = (_kv_bits(2, 32, 1920) + _kv_bits(2, 32, 1919)) / 2  # keys 1920, values all but 129
    assert g["KV_BITS"]["kivi"] == pytest.approx(kivi, abs=1e-9)


def check_qserve_kv(g: dict) -> None:
    """Every KV4 row ran on every corpus; QServe's KV4 (with or without SmoothAttention: λ costs
    no bits) is 4 bits + an fp16 scale and zero per token and head of 64 on every token; KIVI-4
    its groups of 32 and its full-precision residual (1920 keys, 1919 values quantized)."""
    for m in g["METHODS"]:
        for c in g["CORPORA"]:
            assert math.isfinite(g["PPL"][(m, c)]) and g["PPL"][(m, c)] > 1
    for m in ("qserve_kv", "qserve_kv_plain"):
        assert g["KV_BITS"][m] == pytest.approx(_kv_bits(4, 64, 2048), abs=1e-9)
    kivi = (_kv_bits(4, 32, 1920) + _kv_bits(4, 32, 1919)) / 2  # keys 1920, values all but 129
    assert g["KV_BITS"]["kivi"] == pytest.approx(kivi, abs=1e-9)


CHECKS |= {"rotatekv": check_rotatekv, "qserve_kv": check_qserve_kv}


def check_kvquant(g: dict) -> None:
    """Every row ran; the bits per cached element at 2048 tokens are the hand count: b-bit
    codes, 32 bits per outlier (1 % of the keys on calibration, 2 of a token's 192 values),
    a 32-bit sparse pointer per token, fp16 zero point and scale per value token, and the fp16
    sink token; without outliers only the codes, the values' scales and the sink remain."""
    assert all(math.isfinite(v) and v > 1 for v in g["PPL"].values())
    n, C = 2048, 3 * 64

    def mean(key_bits, value_bits):
        side = lambda b: ((n - 1) * b + 16) / n
        return (side(key_bits) + side(value_bits)) / 2

    values = 3 + 32 / C + (2 * 32 + 32) / C
    lo, hi = mean(3 + 32 / C, values), mean(3 + 0.03 * 32 + 32 / C, values)
    assert lo < g["KV_BITS"][("KV3", "kvquant")] < hi
    dense = g["KV_BITS"][("KV3", "kvquant-outliers")]
    assert dense == pytest.approx(mean(3, 3 + 32 / C), abs=1e-9)


CHECKS |= {"kvquant": check_kvquant}
