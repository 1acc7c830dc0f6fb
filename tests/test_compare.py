"""methods.compare: settings parse, every registered method gets its paper-default config at a
setting, bad settings/overrides are rejected, and the pivot table has one line per method."""

import dataclasses

import pytest

from harness.results import ResultRow
from methods import REGISTRY, get_method
from methods.compare import CompareConfig, act_bits, config_for, parse_setting, pivot


def test_parse_setting():
    assert parse_setting("W3g64") == (3, 64)
    assert parse_setting("W2g128") == (2, 128)
    assert parse_setting("W4gch") == (4, None)
    assert parse_setting("W4A8g128") == (4, 128) and act_bits("W4A8g128") == 8
    assert parse_setting("W8A8") == (8, None) and act_bits("W8A8") == 8
    assert act_bits("W3g64") is None
    with pytest.raises(ValueError, match="quantizes no activations"):
        config_for(get_method("gptq"), 4, 128, act_bits=8)
    for bad in ("W3", "3g64", "W3g", "w3g64", "W10g64"):
        with pytest.raises(ValueError, match="must look like"):
            parse_setting(bad)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_for_every_method(name):
    m = get_method(name)
    cfg = config_for(m, 3, 64)
    default = m.config()
    try:
        m.config(bits=3)
        bits = 3
    except ValueError:  # a fixed element format (FP6, 4-bit FP): its closest, the paper's bits
        bits = default.bits
    assert isinstance(cfg, m.config) and cfg.bits == bits
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "group_size" in fields:
        assert cfg.group_size == 64
    if "ragged" in fields:  # a shorter last group where g leaves a remainder (g128 on 576)
        assert cfg.ragged
        try:
            assert not config_for(m, 3, None).ragged
        except ValueError as e:  # a method that needs groups refuses per-channel, naming it
            assert "group_size" in str(e)
    # everything but bits / group_size / ragged stays at the paper default
    for f in fields - {"bits", "group_size", "ragged"}:
        assert getattr(cfg, f) == getattr(default, f), f
    with pytest.raises(ValueError, match="no config field"):
        config_for(m, 3, 64, not_a_field=1)


def test_config_for_overrides():
    cfg = config_for(get_method("omniquant"), 2, 64, epochs=3)
    assert (cfg.bits, cfg.group_size, cfg.epochs) == (2, 64, 3)


def test_compare_config_rejects_bad_sizes():
    bad = ({"n_calib": 0}, {"calib_seqlen": -1}, {"seqlen": 0}, {"windows": 0}, {"corpora": ()})
    for kw in bad:
        with pytest.raises(ValueError):
            CompareConfig(**kw)


def _row(method, setting, dataset, value, bpw=None, minutes=None):
    notes = {"setting": setting}
    if bpw is not None:
        notes |= {"bpw": bpw, "quant_minutes": minutes}
    return ResultRow(model="m", method=method, bits="b", dataset=dataset, metric="ppl",
                     value=value, tokens=10, seconds=1.0, notes=notes)  # fmt: skip


def test_pivot():
    rows = [
        _row("fp", "fp", "wikitext2", 20.0),
        _row("fp", "fp", "c4", 30.0),
        _row("rtn", "W3g64", "wikitext2", 100.0, 3.297, 0.5),
        _row("rtn", "W3g64", "c4", 120.0, 3.297, 0.5),
        _row("gptq", "W3g64", "wikitext2", 50.0, 3.297, 2.25),
    ]
    lines = pivot(rows).splitlines()
    assert lines[0] == "| setting | method | bits/weight | wikitext2 ppl | c4 ppl | minutes |"
    assert lines[2] == "| fp | fp | 16 | 20.00 | 30.00 |  |"
    assert lines[3] == "| W3g64 | rtn | 3.297 | 100.00 | 120.00 | 0.5 |"
    assert lines[4] == "| W3g64 | gptq | 3.297 | 50.00 |  | 2.2 |"
    assert len(lines) == 5
