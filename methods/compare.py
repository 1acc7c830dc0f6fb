"""Compare weight-only methods on one model: calibrate, quantize, evaluate, tabulate.

The engine behind the weight-only reproductions (``scripts/weight_only_table.py``, the README's
main job ``scripts/main.py`` and ``notebooks/weight_only.py``): every method runs with its
paper-default config at a setting such as ``W3g64`` (3-bit weights, groups of 64 input
channels), on the same seeded C4 calibration segments, and is evaluated with the GPTQ
perplexity protocol on the same windows. Each evaluation is one :class:`~harness.results.ResultRow`
whose ``notes`` carry the bits per weight (codes + scales + zeros + outliers) and the minutes
the quantization took; :func:`pivot` turns the rows into the table the cards quote.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from harness import kvcache
from harness.calibration import c4_calibration
from harness.evaluate import EvalConfig
from harness.layers import Hooks
from harness.model import Model
from harness.pipeline import eval_perplexity, eval_zero_shot
from harness.results import ResultRow
from harness.tokenizer import Tokenizer
from methods.base import REPORT_TOKENS, Method, QuantizedModel, get_method

FP_SETTING = "fp"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Calibration and evaluation sizes shared by every method of one table."""

    n_calib: int = 16  # calibration segments drawn from the C4 sample (papers: 128)
    calib_seqlen: int = 512  # tokens per segment (papers: 2048)
    seqlen: int = 512  # evaluation window (GPTQ protocol; papers: 2048)
    windows: int | None = 16  # first windows of each corpus; None: all
    corpora: tuple[str, ...] = ("wikitext2",)  # evaluation texts (wikitext2, ptb, c4)
    seed: int = 0  # calibration draw
    tasks: tuple[str, ...] = ()  # zero-shot tasks (harness.tasks.TASKS) scored for every row
    task_limit: int | None = 200  # first items of each task; None: all

    def __post_init__(self) -> None:
        for f in ("n_calib", "calib_seqlen", "seqlen"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.windows is not None and self.windows <= 0:
            raise ValueError(f"windows must be positive or None, got {self.windows}")
        if not self.corpora and not self.tasks:
            raise ValueError("corpora and tasks are empty: name at least one evaluation")
        if self.task_limit is not None and self.task_limit <= 0:
            raise ValueError(f"task_limit must be positive or None, got {self.task_limit}")


_SETTING = re.compile(r"W(\d)(?:A(\d+))?(?:g(\d+|ch))?")
_KV_SETTING = re.compile(r"KV(\d+)")


def is_kv_setting(s: str) -> bool:
    """``"KV2"``: a KV-cache method at 2 bits per cached element (codes; scales, outliers and
    the full-precision window are the method's own and counted in ``kv_bits``)."""
    return _KV_SETTING.fullmatch(s) is not None


def parse_setting(s: str) -> tuple[int, int | None]:
    """``"W3g64"`` → ``(3, 64)``; ``"W4gch"`` → ``(4, None)`` (one scale per output channel);
    an activation part (``"W4A8g128"``, ``"W8A8"``: no group means per channel) is read by
    :func:`act_bits`; ``"KV3"`` → ``(3, None)``, the cache bits of a KV-cache method."""
    if (kv := _KV_SETTING.fullmatch(s)) is not None:
        return int(kv.group(1)), None
    m = _SETTING.fullmatch(s)
    if not m or (m.group(2) is None and m.group(3) is None):
        raise ValueError(
            f"setting {s!r} must look like W3g64, W4gch (per output channel), W4A8g128, W8A8 "
            "or KV2 (a KV-cache method's bits)"
        )
    g = m.group(3)
    return int(m.group(1)), None if g in (None, "ch") else int(g)


def act_bits(s: str) -> int | None:
    """The activation bits of a setting (``"W4A8g128"`` → 8), ``None`` for weight-only ones."""
    parse_setting(s)
    if is_kv_setting(s):
        return None
    a = _SETTING.fullmatch(s).group(2)
    return None if a is None else int(a)


def config_for(method: Method, bits: int, group: int | None, **overrides: Any) -> Any:
    """``method``'s paper-default config at ``bits`` (and ``group`` where the method has groups:
    SpQR keeps its own β₁ = 16 groups, SqueezeLLM its per-channel levels — the bits-per-weight
    column says what each costs). ``overrides`` replace further fields (e.g. ``epochs``);
    ``act_bits`` (from a setting's A part) needs a method whose config has that field.
    Groups are ragged where the method allows it: a group size that leaves a remainder (g128 on
    SmolLM2's 576 features) gives a shorter last group, as GPTQ's reference does."""
    cls = method.config
    fields = {f.name for f in dataclasses.fields(cls)}
    act = overrides.pop("act_bits", None)
    if act is not None and "act_bits" not in fields:
        raise ValueError(f"{method.name} quantizes no activations: drop the A part of the setting")
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{method.name} has no config field(s) {sorted(unknown)}; has {fields}")
    if "ragged" in fields and group is not None:
        overrides = {"ragged": True} | overrides
    if act is not None:
        overrides = {"act_bits": act} | overrides
    if hasattr(cls, "for_format"):
        return cls.for_format(bits, group, **overrides)
    kw = {"bits": bits} | ({"group_size": group} if "group_size" in fields else {})
    return cls(**kw, **overrides)


def _kv_notes(q: QuantizedModel, cfg: Any) -> dict[str, float]:
    """A KV-cache result's cache size at ``methods.base.REPORT_TOKENS`` tokens, in MiB."""
    if q.hooks.kv_quant is None:
        return {}
    n = min(REPORT_TOKENS, cfg.max_seq_len)
    mib = kvcache.cache_mib(q.hooks.kv_quant, n_tokens=n, n_layers=cfg.n_layers,
                            kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)  # fmt: skip
    return {f"kv_mib_{n}": mib}


def _label(bits: int, group: int | None, cfg: Any, q: QuantizedModel) -> str:
    if q.kv_bits < 16:
        return f"KV{bits} ({q.kv_bits:.3f} bits/element)"
    grouping = f"g{group or 'ch'}" if hasattr(cfg, "group_size") else "own groups"
    act = f"{q.bits_per_activation:g}"
    return f"W{bits}A{act} {grouping} ({q.bits_per_weight:.3f} bpw)"


def run(
    model: Model,
    params: Any,
    tok: Tokenizer,
    *,
    model_name: str,
    methods: Sequence[str],
    settings: Sequence[str],
    cmp: CompareConfig = CompareConfig(),
    fp: bool = True,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    on_row: Callable[[ResultRow], None] | None = None,
    data_dir: Any = None,
) -> list[ResultRow]:
    """Quantize ``params`` with each method at each setting and evaluate each result as it
    stands — its params under its own hooks (activation / KV / matmul numerics) — plus the
    unquantized model (under ``model``'s hooks) when ``fp``. ``overrides``: per-method config
    fields (``{"omniquant": {"epochs": 5}}``). ``on_row`` sees every row as soon as it exists
    (print / save it)."""
    overrides = dict(overrides or {})
    for name in methods:
        get_method(name)  # unknown names fail before any work
    parsed = [(s, *parse_setting(s)) for s in settings]
    for setting in settings:  # a mismatch fails before any work too
        for name in methods:
            kind = get_method(name).kind
            if is_kv_setting(setting) != (kind == "kv_cache"):
                raise ValueError(
                    f"{name} is a {kind} method; setting {setting!r} is for "
                    + ("KV-cache methods" if is_kv_setting(setting) else "weight methods")
                )
    calib = c4_calibration(
        tok, n_samples=cmp.n_calib, seqlen=cmp.calib_seqlen, seed=cmp.seed, data_dir=data_dir
    )
    ecfg = EvalConfig(progress=False)
    rows: list[ResultRow] = []

    def evaluate(p: Any, hooks: Hooks, method: str, bits: str, notes: dict[str, Any]) -> None:
        rows_here: list[ResultRow] = []
        for task in cmp.tasks:
            _, zs = eval_zero_shot(
                Model(model.cfg, hooks), p, tok, task, model_name=model_name,
                limit=cmp.task_limit, method=method, bits=bits, data_dir=data_dir, eval_cfg=ecfg,
            )  # fmt: skip
            rows_here += zs
        for corpus in cmp.corpora:
            _, row = eval_perplexity(
                Model(model.cfg, hooks), p, tok, model_name=model_name, corpus=corpus,
                seqlen=cmp.seqlen, limit=cmp.windows, method=method, bits=bits,
                data_dir=data_dir, eval_cfg=ecfg,
            )  # fmt: skip
            rows_here.append(row)
        for row in rows_here:
            row = dataclasses.replace(row, notes={**row.notes, **notes})
            rows.append(row)
            if on_row is not None:
                on_row(row)

    if fp:
        evaluate(params, model.hooks, "fp", "W16A16", {"setting": FP_SETTING})
    calib_note = f"{cmp.n_calib}x{cmp.calib_seqlen} C4 (seed {cmp.seed})"
    for setting, bits, group in parsed:
        for name in methods:
            m = get_method(name)
            a = {} if act_bits(setting) is None else {"act_bits": act_bits(setting)}
            q_cfg = config_for(m, bits, group, **a, **overrides.get(name, {}))
            t0 = time.perf_counter()
            q = m.quantize_model(params, model.cfg, calib, q_cfg)
            minutes = (time.perf_counter() - t0) / 60
            notes = {
                "setting": setting,
                "bpw": q.bits_per_weight,
                "bpa": q.bits_per_activation,
                "kv_bits": q.kv_bits,
                **_kv_notes(q, model.cfg),
                "quant_minutes": minutes,
                "calib": calib_note,
                "config": repr(q_cfg),
            }
            evaluate(q.params, q.hooks, name, _label(bits, group, q_cfg, q), notes)
    return rows


def pivot(rows: Sequence[ResultRow]) -> str:
    """Markdown table, one line per (setting, method): bits per weight (and per cached key /
    value element when a row quantizes the cache), perplexity on each corpus, minutes to
    quantize."""
    rows = [r for r in rows if r.metric == "ppl"]
    corpora = list(dict.fromkeys(r.dataset for r in rows))
    kv = any(r.notes.get("kv_bits", 16) < 16 for r in rows)
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r.notes.get("setting", r.bits), r.method)
        first = {"bpw": r.notes.get("bpw"), "min": r.notes.get("quant_minutes"),
                 "kv": r.notes.get("kv_bits")}  # fmt: skip
        line = lines.setdefault(key, first)
        line[r.dataset] = r.value
    head = ["setting", "method", "bits/weight", *(["bits/KV element"] if kv else []),
            *(f"{c} ppl" for c in corpora), "minutes"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for (setting, method), line in lines.items():
        bpw = "16" if line["bpw"] is None else f"{line['bpw']:.3f}"
        kvb = [] if not kv else ["16" if line["kv"] in (None, 16) else f"{line['kv']:.3f}"]
        ppl = [f"{line[c]:.2f}" if c in line else "" for c in corpora]
        mins = "" if line["min"] is None else f"{line['min']:.1f}"
        out.append("| " + " | ".join([setting, method, bpw, *kvb, *ppl, mins]) + " |")
    return "\n".join(out) + "\n"
