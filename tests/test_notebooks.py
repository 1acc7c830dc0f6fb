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
    try:
        return runpy.run_path(str(path), run_name="__main__")
    finally:
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
    assert g["SMOLLM2_TABLE"] is None  # placeholder for real weights, never filled with fakes
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


CHECKS = {
    "qlora_datatypes": check_qlora_datatypes,
    "bipolar_int": check_bipolar_int,
    "bitmod": check_bitmod,
    "scaling_laws": check_scaling_laws,
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
