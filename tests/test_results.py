"""Result rows: JSON + markdown, appended without ever losing earlier results."""

import json
import math

import pytest

from harness import results
from harness.evaluate import PerplexityResult, ZeroShotResult


def _row(**kw):
    base = dict(
        model="SmolLM2-135M",
        method="rtn",
        bits="W3A16 g128",
        dataset="wikitext2",
        metric="ppl",
        value=21.5,
        tokens=1000,
        seconds=1.5,
    )
    return results.ResultRow(**{**base, **kw})


def test_append_keeps_earlier_rows(tmp_path):
    js, md = tmp_path / "r" / "results.json", tmp_path / "r" / "results.md"
    results.append_results([_row()], json_path=js, markdown_path=md)
    more = [_row(value=30.25, notes={"seqlen": 512}), _row(metric="acc", value=0.5)]
    results.append_results(more, json_path=js, markdown_path=md)
    rows = results.load_results(js)
    assert [r.value for r in rows] == [21.5, 30.25, 0.5] and rows[1].notes == {"seqlen": 512}
    lines = md.read_text().splitlines()
    assert lines[0] == "| model | method | bits | dataset | metric | value | tokens | seconds |"
    assert len(lines) == 5 and lines[3] == (
        "| SmolLM2-135M | rtn | W3A16 g128 | wikitext2 | ppl | 30.2500 | 1000 | 1.5 |"
    )
    assert not list(tmp_path.glob("r/*.tmp"))  # temporary files renamed away


def test_unreadable_results_file_is_never_overwritten(tmp_path):
    js = tmp_path / "results.json"
    js.write_text("my notes, not JSON")
    with pytest.raises(ValueError, match="will not be overwritten"):
        results.append_results([_row()], json_path=js)
    assert js.read_text() == "my notes, not JSON"


def test_bad_rows():
    with pytest.raises(ValueError, match="finite"):
        _row(value=math.nan)
    with pytest.raises(TypeError):
        _row(model="")
    with pytest.raises(ValueError):
        _row(tokens=-1)
    with pytest.raises(TypeError):
        results.append_results([{"model": "x"}], json_path="unused.json")


def test_rows_from_evaluation_results(tmp_path):
    ppl = PerplexityResult(
        ppl=12.0,
        nll=math.log(12.0),
        tokens=2047,
        windows=1,
        protocol="gptq",
        seqlen=2048,
        seconds=3.0,
    )
    row = results.perplexity_row(ppl, model="m", method="fp", bits="16", dataset="wikitext2")
    assert row.metric == "ppl" and row.notes == {"protocol": "gptq", "seqlen": 2048, "windows": 1}
    metrics = {"acc": 0.6, "acc_stderr": 0.1, "acc_norm": 0.7, "acc_norm_stderr": 0.1}
    zs = ZeroShotResult(task="piqa", n=10, metrics=metrics, tokens=500, seconds=2.0)
    rows = results.zero_shot_rows(zs, model="m", method="fp", bits="16")
    assert [(r.metric, r.value, r.notes["stderr"]) for r in rows] == [
        ("acc", 0.6, 0.1),
        ("acc_norm", 0.7, 0.1),
    ]
    js = tmp_path / "x.json"
    results.append_results([row, *rows], json_path=js)
    assert len(json.loads(js.read_text())) == 3
