"""Evaluation results: one JSON list per results file plus a markdown table, appended safely.

A result is a ``ResultRow`` (model, method, bits, dataset, metric, value, tokens, seconds, and
free-form ``notes`` such as the perplexity protocol, seqlen, ``limit`` and the data source).
``append_results`` adds rows to a JSON file (a list of objects) and, optionally, to a markdown
table (header written once). Earlier results are never lost: the file is re-read under an
exclusive lock, the new content is written to a temporary file in the same folder and renamed
over the old one (``os.replace`` is atomic), and a results file that does not parse is left
alone with an error instead of being overwritten.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ResultRow",
    "MARKDOWN_HEADER",
    "markdown_row",
    "append_results",
    "load_results",
    "perplexity_row",
    "zero_shot_rows",
]

_COLUMNS = ("model", "method", "bits", "dataset", "metric", "value", "tokens", "seconds")
MARKDOWN_HEADER = (
    "| " + " | ".join(_COLUMNS) + " |\n" + "|" + "|".join(["---"] * 5 + ["---:"] * 3) + "|\n"
)


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    model: str  # e.g. "SmolLM2-135M-Instruct"
    method: str  # "fp" for the dequantized-GGUF baseline, else the method's name
    bits: str  # weight/activation/KV bits and grouping, e.g. "W3A16 g128" ("16" for fp)
    dataset: str  # "wikitext2", "ptb", "c4", "arc_easy", ...
    metric: str  # "ppl", "acc", "acc_norm", ...
    value: float
    tokens: int  # tokens scored (perplexity) or fed to the model (zero-shot)
    seconds: float  # wall time of the evaluation
    notes: dict[str, Any] = field(default_factory=dict)  # protocol, seqlen, limit, data source…

    def __post_init__(self) -> None:
        for name in ("model", "method", "bits", "dataset", "metric"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"ResultRow.{name} must be a non-empty str")
        if not math.isfinite(self.value):
            raise ValueError(f"ResultRow.value must be finite, got {self.value}")
        if self.tokens < 0 or not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(
                f"tokens and seconds must be non-negative: {self.tokens}, {self.seconds}"
            )


def markdown_row(row: ResultRow) -> str:
    """The row as a line of the markdown table under ``MARKDOWN_HEADER``."""
    cells = [
        row.model,
        row.method,
        row.bits,
        row.dataset,
        row.metric,
        f"{row.value:.4f}",
        str(row.tokens),
        f"{row.seconds:.1f}",
    ]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(json_path: str | Path) -> list[ResultRow]:
    """Rows of a results JSON file ([] if it does not exist)."""
    path = Path(json_path)
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError("top level is not a list")
        return [ResultRow(**r) for r in records]
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{path} is not a results file this code wrote ({e}); "
            "move it aside — it will not be overwritten"
        ) from e


def append_results(
    rows: Iterable[ResultRow], *, json_path: str | Path, markdown_path: str | Path | None = None
) -> None:
    """Append rows to the JSON results file and (optionally) the markdown table."""
    rows = list(rows)
    for r in rows:
        if not isinstance(r, ResultRow):
            raise TypeError(f"expected ResultRow, got {type(r).__name__}")
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        records = [asdict(r) for r in load_results(path)] + [asdict(r) for r in rows]
        _replace(path, json.dumps(records, indent=1, allow_nan=False) + "\n")
    if markdown_path is not None:
        md = Path(markdown_path)
        md.parent.mkdir(parents=True, exist_ok=True)
        with _locked(md):
            old = md.read_text(encoding="utf-8") if md.exists() else ""
            if old and not old.endswith("\n"):
                old += "\n"
            _replace(md, (old or MARKDOWN_HEADER) + "".join(markdown_row(r) for r in rows))


def perplexity_row(
    result: Any,
    *,
    model: str,
    method: str,
    bits: str,
    dataset: str,
    notes: dict[str, Any] | None = None,
) -> ResultRow:
    """A ``ResultRow`` of a ``harness.evaluate.PerplexityResult`` (protocol and seqlen noted)."""
    meta = {"protocol": result.protocol, "seqlen": result.seqlen, "windows": result.windows}
    return ResultRow(
        model=model,
        method=method,
        bits=bits,
        dataset=dataset,
        metric="ppl",
        value=result.ppl,
        tokens=result.tokens,
        seconds=result.seconds,
        notes={**meta, **(notes or {})},
    )


def zero_shot_rows(
    result: Any, *, model: str, method: str, bits: str, notes: dict[str, Any] | None = None
) -> list[ResultRow]:
    """One ``ResultRow`` per metric of a ``harness.evaluate.ZeroShotResult`` (stderr in notes)."""
    out = []
    for name, value in result.metrics.items():
        if name.endswith("_stderr"):
            continue
        stderr = result.metrics.get(f"{name}_stderr")
        meta = {
            "n": result.n,
            **({"stderr": stderr} if stderr is not None and math.isfinite(stderr) else {}),
        }
        out.append(
            ResultRow(
                model=model,
                method=method,
                bits=bits,
                dataset=result.task,
                metric=name,
                value=value,
                tokens=result.tokens,
                seconds=result.seconds,
                notes={**meta, **(notes or {})},
            )
        )
    return out
