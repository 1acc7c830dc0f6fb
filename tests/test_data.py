"""Data loaders: checksums, clear errors for missing / corrupt files, item counts, no network."""

import shutil
import socket
from pathlib import Path

import pytest

from harness import data

ROOT = data.resolve_data_dir()
needs_data = pytest.mark.skipif(
    ROOT is None or not (ROOT / "SHA256SUMS").exists(), reason="no local data directory"
)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network or the hub fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the local data path tried to use the network")

    monkeypatch.setattr(data, "_load_from_hub", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@needs_data
def test_checksum_table_equals_sha256sums():
    listed = {}
    for line in (ROOT / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    assert listed == {k: v.sha256 for k, v in data.FILES.items()}


@needs_data
@pytest.mark.parametrize(
    "task,count",
    [
        ("arc_easy", 2376),
        ("arc_challenge", 1172),
        ("boolq", 3270),
        ("piqa", 1838),
        ("winogrande", 1267),
        ("hellaswag", 10042),
        ("lambada_openai", 5153),
    ],
)
def test_task_counts_match_readme(offline, task, count):
    docs = data.load_task_docs(task)
    assert len(docs) == count == data.FILES[next(k for k in data.FILES if _file_of(task) in k)].rows


def _file_of(task):
    return {
        "arc_easy": "ARC-Easy",
        "arc_challenge": "ARC-Challenge",
        "boolq": "boolq",
        "piqa": "piqa/dev.jsonl",
        "winogrande": "winogrande",
        "hellaswag": "hellaswag",
        "lambada_openai": "lambada",
    }[task]


@needs_data
def test_task_schemas(offline):
    arc = data.load_task_docs("arc_easy")[0]
    assert arc["answerKey"] in arc["choices"]["label"] and len(arc["choices"]["text"]) == 4
    assert set(data.load_task_docs("boolq")[0]) == {"question", "passage", "label"}
    assert {d["label"] for d in data.load_task_docs("boolq")} == {0, 1}
    assert {d["label"] for d in data.load_task_docs("piqa")} == {0, 1}
    hs = data.load_task_docs("hellaswag")[0]
    assert hs["query"].startswith("Roof shingle removal: ") and len(hs["choices"]) == 4
    assert {d["answer"] for d in data.load_task_docs("winogrande")} == {"1", "2"}


@needs_data
def test_perplexity_texts(offline):
    wiki = data.wikitext2_text()
    assert "\r" not in wiki and wiki.count("\n\n") == 2890  # 2,891 rows joined
    assert wiki.startswith(" = Robert Boulter = \n\n Robert Boulter is")
    ptb = data.ptb_text("test")
    assert "\n" not in ptb and ptb.startswith("no it was n't black monday but while")
    assert data.ptb_text("valid").count("\n\n") == 3369
    assert len(data.c4_documents()) == 1000
    assert data.c4_text() == " ".join(data.c4_documents())


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / name, dest)
    return dest


@needs_data
def test_missing_file_error_says_what_where_and_origin(tmp_path, offline):
    with pytest.raises(data.DataFileMissingError) as e:
        data.load_task_docs("winogrande", data_dir=tmp_path)
    msg = str(e.value)
    assert "winogrande/winogrande_dev.jsonl" in msg and str(tmp_path) in msg
    assert "naiveen/nlp_project" in msg


@needs_data
def test_corrupt_file_is_rejected(tmp_path, offline):
    path = _copy(tmp_path, "lambada/lambada_test.jsonl")
    assert len(data.load_task_docs("lambada_openai", data_dir=tmp_path)) == 5153
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataChecksumError, match="sha256"):
        data.load_task_docs("lambada_openai", data_dir=tmp_path)
    path.write_bytes(bytes(raw[:1000]))  # truncated
    with pytest.raises(data.DataChecksumError, match="lambada/lambada_test.jsonl"):
        data.load_task_docs("lambada_openai", data_dir=tmp_path)


@needs_data
def test_environment_variable_selects_directory(tmp_path, monkeypatch, offline):
    _copy(tmp_path, "boolq/val.jsonl")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    assert len(data.load_task_docs("boolq")) == 3270
    with pytest.raises(data.DataFileMissingError, match=str(tmp_path)):
        data.load_task_docs("piqa")
    # an explicit argument wins over the variable
    assert data.resolve_data_dir(ROOT) == ROOT


def test_hub_path_used_only_without_directory(monkeypatch):
    calls = []
    monkeypatch.setattr(data, "resolve_data_dir", lambda data_dir=None: None)
    monkeypatch.setattr(
        data,
        "_load_from_hub",
        lambda name: calls.append(name) or [{"text": "a"}, {"text": ""}, {"text": "b"}],
    )
    assert data.wikitext2_text() == "a\n\n\n\nb"  # GPTQ's exact join of the HF rows
    assert data.load_task_docs("lambada_openai") == [{"text": "a"}, {"text": ""}, {"text": "b"}]
    assert calls == ["wikitext2", "lambada_openai"]


def test_hellaswag_preprocess_is_lm_evals():
    assert data.hellaswag_preprocess(" Wash [title] Rinse [step] well  ") == "Wash. Rinse well"
    row = {
        "activity_label": "Cooking",
        "ctx_a": "A man cuts.",
        "ctx_b": "the man",
        "endings": [" [substeps] stirs", "eats"],
        "label": "1",
    }
    assert data._hellaswag_hub(row) == {
        "query": "Cooking: A man cuts. The man",
        "choices": [" stirs", "eats"],
        "label": 1,
    }


def test_bad_names():
    with pytest.raises(ValueError, match="unknown task"):
        data.load_task_docs("mmlu")
    with pytest.raises(ValueError, match="unknown perplexity corpus"):
        data.perplexity_text("pile")
    with pytest.raises(ValueError, match="split"):
        data.ptb_text("train")
    with pytest.raises(KeyError):
        data.data_file("nope.txt")


@needs_data
def test_changed_byte_with_mtime_restored_is_rejected(tmp_path, offline):
    """No cache trusts (size, mtime): a byte changed in place and the mtime put back is caught
    in the same process, by data_file and by every loader."""
    import os

    path = _copy(tmp_path, "ptb/ptb.valid.txt")
    good = data.ptb_text("valid", data_dir=tmp_path)
    assert data.data_file("ptb/ptb.valid.txt", tmp_path) == path
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0x20  # same size
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(data.DataChecksumError, match="ptb/ptb.valid.txt"):
        data.data_file("ptb/ptb.valid.txt", tmp_path)
    with pytest.raises(data.DataChecksumError, match="ptb/ptb.valid.txt"):
        data.ptb_text("valid", data_dir=tmp_path)
    raw[5000] ^= 0x20
    path.write_bytes(bytes(raw))
    assert data.ptb_text("valid", data_dir=tmp_path) == good


@needs_data
def test_loaders_parse_the_bytes_they_hashed(tmp_path, offline, monkeypatch):
    """The loaders read a file once: the bytes whose sha256 was checked are the bytes parsed
    (no second read that a concurrent writer could change)."""
    _copy(tmp_path, "lambada/lambada_test.jsonl")
    opened = []
    for owner, attr in ((Path, "open"),):  # Path.read_bytes / read_text go through Path.open
        real = getattr(owner, attr)
        spy = lambda self, *a, _real=real, **kw: opened.append(str(self)) or _real(self, *a, **kw)
        monkeypatch.setattr(owner, attr, spy)
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda f, *a, **kw: opened.append(str(f)) or real_open(f, *a, **kw)
    )
    assert len(data.load_task_docs("lambada_openai", data_dir=tmp_path)) == 5153
    assert sum("lambada_test.jsonl" in p for p in opened) == 1
