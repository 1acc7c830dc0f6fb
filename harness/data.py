"""Evaluation and calibration data: local, checksummed copies first, the Hugging Face hub otherwise.

Where the data comes from (first that applies):

1. ``data_dir=`` passed to a loader;
2. the environment variable ``LOWBIT_DATA_DIR``;
3. ``../shared/data`` beside the repository, if that folder exists;
4. otherwise the Hugging Face hub through ``datasets.load_dataset`` (``_load_from_hub``, the only
   function here that can touch the network; it is never called when a directory is set).

Every local file is checked against the sha256 in ``FILES`` (copied from that folder's
``SHA256SUMS``) before it is read. A missing file raises ``DataFileMissingError`` naming the
file, where to put it and where it comes from; a wrong checksum raises ``DataChecksumError``.
Verification is by content on every load, with no cache: a loader reads the file's bytes once
(``data_bytes``), hashes exactly those bytes and parses them, so neither a file changed with its
size and mtime put back nor one changed between the check and the read can slip through. The
cost is one sha256 per load (the largest file is 2.7 MB: a few ms), small next to parsing.

Text preparation for perplexity (GPTQ, arXiv:2210.17323, ``datautils.py`` of IST-DASLab/gptq):

=========== =============================================================================
wikitext2   GPTQ: ``"\\n\\n".join(rows)`` of the HF ``wikitext-2-raw-v1`` test split. The local
            ``wiki.test.raw`` has CRLF line ends and lacks the HF split's empty rows (and the
            rows' trailing "\\n"), so locally the 2,891 non-empty lines (CRLF -> LF, line end
            removed) are joined with "\\n\\n". The hub path joins the HF rows exactly as GPTQ, so
            local and hub WikiText-2 perplexities differ slightly; results say which was used.
ptb         GPTQ's ``ptb-new`` (the test split used by later papers): stripped sentences joined
            with " ". ``ptb_valid``: GPTQ's original ``ptb`` (validation, joined with "\\n\\n").
c4          GPTQ's ``c4-new`` evaluation: documents joined with " " (the caller keeps the first
            256 windows). Locally the 1,000-document sample — also the calibration corpus, so
            C4 perplexity after C4 calibration is not a held-out number; the hub path uses the
            first 1,100 documents of the validation shard 00000, as GPTQ does.
=========== =============================================================================

Zero-shot documents come back in the Hugging Face schema lm-eval-harness reads (ARC:
question / choices{text,label} / answerKey; PIQA: goal / sol1 / sol2 / label; WinoGrande:
sentence / option1 / option2 / answer; BoolQ: passage / question / label; LAMBADA: text). For
HellaSwag the documents are already prepared: ``{"query", "choices", "label"}``. Locally they come
from llama.cpp's HellaSwag file (klosax/hellaswag_text_data), whose preprocessing differs a
little from lm-eval's ``utils.preprocess`` (ctx_b is not capitalized; bracket tags are removed by
a fixed list); from the hub, lm-eval's preprocessing is applied (``hellaswag_preprocess``).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_VAR",
    "FILES",
    "DataFile",
    "DataFileMissingError",
    "DataChecksumError",
    "resolve_data_dir",
    "data_file",
    "data_bytes",
    "wikitext2_text",
    "ptb_text",
    "c4_documents",
    "c4_text",
    "perplexity_text",
    "PERPLEXITY_CORPORA",
    "TASK_NAMES",
    "load_task_docs",
    "hellaswag_preprocess",
]

ENV_VAR = "LOWBIT_DATA_DIR"
_DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True, kw_only=True)
class DataFile:
    sha256: str  # hex digest, from the data folder's SHA256SUMS
    rows: int  # records in the file (lines, documents, or 6-line tasks)
    what: str  # one-line description
    origin: str  # public repository @ commit : path the file was copied from


FILES: dict[str, DataFile] = {
    "wikitext-2-raw/wiki.test.raw": DataFile(
        sha256="4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
        rows=2891,
        what="WikiText-2 raw test split",
        origin="Tylogi/TyloQuant @ 7989d03 : data/wikitext-2-raw/wiki.test.raw",
    ),
    "ptb/ptb.test.txt": DataFile(
        sha256="91a2fa938d84baddaa05a3d67a5698924847eca8a4e7faa1518f3fd11c3d6d73",
        rows=3761,
        what="Penn Treebank (Mikolov) test",
        origin="zivaharoni/gradual-learning-rnn @ 2323a3b5 : data/ptb.test.txt",
    ),
    "ptb/ptb.valid.txt": DataFile(
        sha256="6d1b028ab2267ddceed1ad3cb67d9aadf438b8c7ed74baf5b1182488f6b18231",
        rows=3370,
        what="Penn Treebank (Mikolov) validation",
        origin="zivaharoni/gradual-learning-rnn @ 2323a3b5 : data/ptb.valid.txt",
    ),
    "c4/c4_sample.jsonl": DataFile(
        sha256="cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32",
        rows=1000,
        what="1,000 C4 (en) documents",
        origin=(
            "Diffusion-bachelor/diffusion-data-constraint-rare-events @ 3305ae85 : "
            "data/c4_sample.jsonl"
        ),
    ),
    "lambada/lambada_test.jsonl": DataFile(
        sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        rows=5153,
        what="LAMBADA test, OpenAI version",
        origin="Victorwz/VaLM @ 161accd1 : data/lambada/lambada_test.jsonl",
    ),
    "arc/ARC-Easy-Test.jsonl": DataFile(
        sha256="ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
        rows=2376,
        what="AI2 ARC-Easy test",
        origin="FormulaMonks/llm-benchmarker-suite @ 5d3c8009 : data/ARC/",
    ),
    "arc/ARC-Challenge-Test.jsonl": DataFile(
        sha256="9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
        rows=1172,
        what="AI2 ARC-Challenge test",
        origin="FormulaMonks/llm-benchmarker-suite @ 5d3c8009 : data/ARC/",
    ),
    "boolq/val.jsonl": DataFile(
        sha256="21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989",
        rows=3270,
        what="BoolQ validation",
        origin="FormulaMonks/llm-benchmarker-suite @ 5d3c8009 : data/SuperGLUE/BoolQ/val.jsonl",
    ),
    "piqa/dev.jsonl": DataFile(
        sha256="a73f46cb5d72b2cc399522a79f27728a429d9b89d9a236243fcfda8c02588d54",
        rows=1838,
        what="PIQA validation",
        origin="declare-lab/TEAM @ e43753fd : data/piqa/dev.jsonl",
    ),
    "piqa/dev-labels.lst": DataFile(
        sha256="b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
        rows=1838,
        what="PIQA validation labels",
        origin="declare-lab/TEAM @ e43753fd : data/piqa/dev-labels.lst",
    ),
    "winogrande/winogrande_dev.jsonl": DataFile(
        sha256="78632d8bf355010e2a072449d990cbe159084c1c072b69605b90f4d855ed8989",
        rows=1267,
        what="WinoGrande dev (xl)",
        origin="naiveen/nlp_project @ 42bba907 : data/winogrande/winogrande_dev.jsonl",
    ),
    "hellaswag/hellaswag_val_full.txt.bz2": DataFile(
        sha256="50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
        rows=10042,
        what="HellaSwag validation, 6-line records",
        origin="klosax/hellaswag_text_data @ 1105d370 : hellaswag_val_full.txt.bz2",
    ),
}


class DataFileMissingError(FileNotFoundError):
    """A data file is not in the data directory."""


class DataChecksumError(ValueError):
    """A data file's sha256 is not the expected one (corrupt, truncated or another version)."""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data directory (see the module docstring), or None for the hub."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return _DEFAULT_DIR if _DEFAULT_DIR.is_dir() else None


def _local_path(name: str, data_dir: str | Path | None) -> Path:
    if name not in FILES:
        raise KeyError(f"unknown data file {name!r}; known: {sorted(FILES)}")
    spec = FILES[name]
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataFileMissingError(
            f"no local data directory: pass data_dir= or set {ENV_VAR} to a folder holding {name}"
        )
    path = root / name
    if not path.is_file():
        raise DataFileMissingError(
            f"{name} not found at {path}. Put the file there (data directory {root}); it is "
            f"{spec.what}, copied byte for byte from {spec.origin} (sha256 {spec.sha256}). "
            f"Or point {ENV_VAR} / data_dir= at a folder that has it."
        )
    return path


def data_bytes(name: str, data_dir: str | Path | None = None) -> bytes:
    """The bytes of the local file ``name`` (a key of ``FILES``), read once and checked against
    its sha256: what is returned is exactly what was hashed."""
    path = _local_path(name, data_dir)
    raw = path.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    spec = FILES[name]
    if got != spec.sha256:
        raise DataChecksumError(
            f"{path}: sha256 {got} does not match the expected {spec.sha256} for {name} "
            f"({spec.what}); the file is corrupt, truncated or another version — copy it "
            f"again from {spec.origin}"
        )
    return raw


def data_file(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of the local file ``name`` (a key of ``FILES``), after checking its sha256 (hashed
    on every call; a caller that reads the file later should use :func:`data_bytes`)."""
    data_bytes(name, data_dir)
    return _local_path(name, data_dir)


def _text(raw: bytes, name: str) -> str:
    """UTF-8 text with universal newlines (CRLF and lone CR -> LF), as text-mode ``open``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataChecksumError(f"{name}: not UTF-8 text ({e})") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl(name: str, root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in _text(data_bytes(name, root), name).split("\n") if line.strip()
    ]


def _lines(name: str, root: Path) -> list[str]:
    return _text(data_bytes(name, root), name).split("\n")


# --- the one function that may use the network ----------------------------------------------

_HUB = {  # name -> (path, config, split, extra load_dataset kwargs)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", {}),
    "ptb": ("ptb_text_only", "penn_treebank", "test", {}),
    "ptb_valid": ("ptb_text_only", "penn_treebank", "validation", {}),
    "c4": (
        "allenai/c4",
        None,
        "validation",
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
    ),
    "c4_train": (
        "allenai/c4",
        None,
        "train",
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
    ),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", {}),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", {}),
    "piqa": ("baber/piqa", None, "validation", {}),
    "hellaswag": ("Rowan/hellaswag", None, "validation", {}),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", {}),
    "boolq": ("aps/super_glue", "boolq", "validation", {}),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test", {}),
}


def _load_from_hub(name: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset (needs internet; untested: these machines are offline)."""
    import datasets

    path, config, split, kwargs = _HUB[name]
    try:
        return list(datasets.load_dataset(path, config, split=split, **kwargs))
    except Exception as e:
        raise RuntimeError(
            f"could not load {path} ({config}, {split}) from the Hugging Face hub: {e}. Offline? "
            f"Point {ENV_VAR} or data_dir= at a local copy (see harness/data.py FILES)."
        ) from e


# --- perplexity corpora -----------------------------------------------------------------------


def wikitext2_text(data_dir: str | Path | None = None) -> str:
    """WikiText-2 test text for the GPTQ protocol (see the module docstring for local vs hub)."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return "\n\n".join(r["text"] for r in _load_from_hub("wikitext2"))
    rows = [r for r in _lines("wikitext-2-raw/wiki.test.raw", root) if r]
    return "\n\n".join(rows)


def ptb_text(split: str = "test", data_dir: str | Path | None = None) -> str:
    """PTB text: test sentences joined with " " (GPTQ ptb-new), valid joined with "\\n\\n"."""
    if split not in ("test", "valid"):
        raise ValueError(f"PTB split must be 'test' or 'valid', got {split!r}")
    joiner = " " if split == "test" else "\n\n"
    root = resolve_data_dir(data_dir)
    if root is None:
        rows = [r["sentence"] for r in _load_from_hub("ptb" if split == "test" else "ptb_valid")]
    else:
        rows = [r.strip() for r in _lines(f"ptb/ptb.{split}.txt", root)]
        rows = rows[:-1] if rows and rows[-1] == "" else rows  # the file's final newline
    return joiner.join(rows)


def c4_documents(data_dir: str | Path | None = None, *, split: str = "validation") -> list[str]:
    """C4 documents. Locally: the 1,000-document sample, whatever ``split``. From the hub, as
    GPTQ: "validation" = the first 1,100 documents of validation shard 00000 (evaluation),
    "train" = train shard 00000 (calibration)."""
    if split not in ("validation", "train"):
        raise ValueError(f"C4 split must be 'validation' or 'train', got {split!r}")
    root = resolve_data_dir(data_dir)
    if root is None:
        if split == "train":
            return [r["text"] for r in _load_from_hub("c4_train")]
        return [r["text"] for r in _load_from_hub("c4")[:1100]]
    return [d["text"] for d in _jsonl("c4/c4_sample.jsonl", root)]


def c4_text(data_dir: str | Path | None = None) -> str:
    """C4 perplexity text: documents joined with " " (GPTQ c4-new; keep the first 256 windows)."""
    return " ".join(c4_documents(data_dir))


PERPLEXITY_CORPORA = {  # name -> (text function, maximum windows as GPTQ evaluates it)
    "wikitext2": (wikitext2_text, None),
    "ptb": (lambda data_dir=None: ptb_text("test", data_dir), None),
    "ptb_valid": (lambda data_dir=None: ptb_text("valid", data_dir), None),
    "c4": (c4_text, 256),
}


def perplexity_text(name: str, data_dir: str | Path | None = None) -> str:
    """The prepared text of a perplexity corpus: "wikitext2", "ptb", "ptb_valid" or "c4"."""
    if name not in PERPLEXITY_CORPORA:
        raise ValueError(f"unknown perplexity corpus {name!r}; known: {sorted(PERPLEXITY_CORPORA)}")
    return PERPLEXITY_CORPORA[name][0](data_dir)


# --- zero-shot tasks --------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness ``tasks/hellaswag/utils.py: preprocess`` (WikiHow bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_hub(row: dict[str, Any]) -> dict[str, Any]:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(e) for e in row["endings"]],
        "label": int(row["label"]),
    }


def _hellaswag_local(root: Path) -> list[dict[str, Any]]:
    name = "hellaswag/hellaswag_val_full.txt.bz2"
    lines = _text(bz2.decompress(data_bytes(name, root)), name).split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    if len(lines) % 6:
        raise ValueError(f"{name}: {len(lines)} lines is not a whole number of 6-line records")
    return [
        {"query": lines[i], "choices": lines[i + 2 : i + 6], "label": int(lines[i + 1])}
        for i in range(0, len(lines), 6)
    ]


def _arc_local(name: str, root: Path) -> list[dict[str, Any]]:
    return [
        {
            "question": d["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in d["question"]["choices"]],
                "label": [c["label"] for c in d["question"]["choices"]],
            },
            "answerKey": d["answerKey"],
        }
        for d in _jsonl(name, root)
    ]


def _piqa_local(root: Path) -> list[dict[str, Any]]:
    docs = _jsonl("piqa/dev.jsonl", root)
    labels = [int(x) for x in _lines("piqa/dev-labels.lst", root) if x.strip()]
    if len(docs) != len(labels):
        raise ValueError(f"PIQA: {len(docs)} questions but {len(labels)} labels")
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}
        for d, y in zip(docs, labels, strict=True)
    ]


def _boolq_label(label: Any) -> int:
    """SuperGLUE's jsonl has true/false (JSON booleans or the strings); the HF split has 0/1."""
    if isinstance(label, str) and label.lower() in ("true", "false"):
        return int(label.lower() == "true")
    if isinstance(label, bool | int) and int(label) in (0, 1):
        return int(label)
    raise ValueError(f"BoolQ label {label!r} is not true/false")


_LOCAL = {  # task -> function(root) -> docs in the schema described in the module docstring
    "arc_easy": lambda root: _arc_local("arc/ARC-Easy-Test.jsonl", root),
    "arc_challenge": lambda root: _arc_local("arc/ARC-Challenge-Test.jsonl", root),
    "piqa": _piqa_local,
    "hellaswag": _hellaswag_local,
    "winogrande": lambda root: [
        {k: d[k] for k in ("sentence", "option1", "option2", "answer")}
        for d in _jsonl("winogrande/winogrande_dev.jsonl", root)
    ],
    "boolq": lambda root: [
        {"question": d["question"], "passage": d["passage"], "label": _boolq_label(d["label"])}
        for d in _jsonl("boolq/val.jsonl", root)
    ],
    "lambada_openai": lambda root: [
        {"text": d["text"]} for d in _jsonl("lambada/lambada_test.jsonl", root)
    ],
}
TASK_NAMES = tuple(_LOCAL)


def load_task_docs(task: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Documents of a zero-shot task (one of ``TASK_NAMES``), local or from the hub."""
    if task not in _LOCAL:
        raise ValueError(f"unknown task {task!r}; known: {list(TASK_NAMES)}")
    root = resolve_data_dir(data_dir)
    if root is not None:
        return _LOCAL[task](root)
    rows = _load_from_hub(task)
    if task == "hellaswag":
        return [_hellaswag_hub(r) for r in rows]
    if task == "arc_easy" or task == "arc_challenge":
        return [
            {"question": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]}
            for r in rows
        ]
    if task == "piqa":
        return [{**r, "label": int(r["label"])} for r in rows]
    return rows
