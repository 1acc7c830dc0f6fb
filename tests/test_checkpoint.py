"""Quantized checkpoints (methods/checkpoint.py): packed codes, bit-exact round trips, resume."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import capture
from harness.model import Model, ModelConfig, get_param, init_params, linear_names
from methods import checkpoint as ck
from methods.gptq import GPTQConfig
from methods.gptq.core import quantize_layer as gptq_layer
from methods.rtn import RTNConfig
from methods.rtn.core import quantize_layer as rtn_layer
from methods.walk import quantize_sequential
from numerics.config import mx, rtn
from numerics.formats import codebook_format
from numerics.qarray import QArray
from numerics.quantize import quantize
from numerics.scales import double_quantize
from numerics.sparse import DenseSparse, split_outliers


def W(shape=(16, 96), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def static_json(x):
    """Static fields compared through their JSON (a NaN in a format's table is != itself)."""
    return json.dumps(ck.encode(x)[1], sort_keys=True)


def assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))  # bits
    assert static_json(a) == static_json(b)


def qarrays():
    w = W()
    cb = quantize(w, rtn(3, group_size=32, sym=False))
    table = codebook_format([-1.0, -0.3, 0.0, 0.2, 0.7, 1.0])  # 6 levels: 3-bit codes, NaN padding
    rows, cols, vals = split_outliers(w, jnp.abs(w) > 2.0)
    return {
        "int3_asym_g32": cb,
        "int3_asym_g64_ragged": quantize(w, rtn(3, group_size=64, sym=False, ragged=True)),
        "int4_sym_channel_bf16": quantize(w.astype(jnp.bfloat16), rtn(4, sym=True)),
        "codebook": quantize(w, W_cfg(table)),
        "mxfp4_e8m0_scales": quantize(w, mx("mxfp4")),
        "double_quantized": double_quantize(quantize(w, rtn(4, group_size=32, sym=False))),
        "already_packed": cb.pack(axis=-1, word_bits=32),
        "dense_sparse": DenseSparse(cb, rows, cols, vals),
        "dense_sparse_empty": DenseSparse(cb, *split_outliers(w, jnp.zeros(w.shape, bool))),
    }


def W_cfg(fmt):
    from numerics.config import QuantConfig

    return QuantConfig(format=fmt, granularity="group", group_size=32)


@pytest.mark.parametrize("name", list(qarrays()))
def test_round_trip_bit_exact(name, tmp_path):
    x = qarrays()[name]
    tree = {
        "blocks": [{"attn": {"q_proj": x}, "attn_norm": jnp.ones((96,), jnp.float32)}],
        "none": None,
    }
    ck.save_tree(
        tmp_path / "c",
        tree,
        metadata={"report": [{"name": name, "bits": 3.5, "loss": float("nan")}]},
    )
    back, meta = ck.load_tree(tmp_path / "c")
    assert_same(tree, back)
    assert back["none"] is None
    assert meta["report"][0]["name"] == name and np.isnan(meta["report"][0]["loss"])
    np.testing.assert_array_equal(
        np.asarray(back["blocks"][0]["attn"]["q_proj"].dequantize(jnp.float32)),
        np.asarray(x.dequantize(jnp.float32)),
    )


def test_codes_are_stored_packed(tmp_path):
    qa = qarrays()["int3_asym_g32"]  # [16, 96] 3-bit codes: 96 codes = 3 runs of 32 = 9 words
    arrays, spec = ck.encode({"w": qa})
    codes = arrays[spec["dict"]["w"]["data"]["codes"]["array"]]
    assert codes.dtype == np.uint32 and codes.shape == (16, 9)
    assert not any(a.dtype == np.uint8 and a.shape == qa.shape for a in arrays.values())
    assert not any(
        np.issubdtype(a.dtype, np.floating) and a.shape == qa.shape for a in arrays.values()
    )
    ck.save_tree(tmp_path / "c", {"w": qa})
    meta = json.loads((tmp_path / "c" / "meta" / "metadata").read_text())  # plain JSON
    node = meta["tree"]["dict"]["w"]
    assert node["static"]["packing"] == {"tuple": [1, 32]} and node["unpack_on_load"]
    assert node["static"]["format"]["format"] == "numerics.formats:IntFormat"


def test_tree_without_arrays(tmp_path):
    tree = {"empty": jnp.zeros((0, 4), jnp.float16), "none": None, "n": 3, "x": (1.5, float("inf"))}
    ck.save_tree(tmp_path / "e", tree)
    back, meta = ck.load_tree(tmp_path / "e")
    assert back["empty"].shape == (0, 4) and back["empty"].dtype == jnp.float16
    assert back["none"] is None and back["n"] == 3 and back["x"] == (1.5, float("inf"))
    assert meta == {}


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load_tree(tmp_path / "missing")
    with pytest.raises(ValueError, match="refusing"):
        ck.decode({}, {"dataclass": "os:system", "data": {}, "static": {}})
    with pytest.raises(TypeError, match="cannot store"):
        ck.encode({"w": object()})
    with pytest.raises(TypeError, match="keys must be str"):
        ck.encode({1: jnp.ones(3)})


# ------------------------------------------------------------------------------ resuming

TINY = ModelConfig(
    vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
)
CFG = GPTQConfig(bits=3, group_size=32)
CALLS = []


def counted(W, stats, cfg, *, key=None):
    CALLS.append(W.shape)
    return gptq_layer(W, stats, cfg, key=key)


@pytest.fixture(scope="module")
def setup():
    params = init_params(TINY, 1)
    tokens = np.random.default_rng(1).integers(0, 64, size=(2, 8)).astype(np.int32)
    CALLS.clear()
    full = quantize_sequential(params, TINY, tokens, counted, CFG, needs=("H",))
    assert len(CALLS) == 7 * TINY.n_layers
    return params, tokens, full


def test_quantized_model_round_trip_same_logits(setup, tmp_path):
    _, tokens, qm = setup
    ck.save_tree(tmp_path / "m", qm.params, metadata={"report": qm.report})
    back, meta = ck.load_tree(tmp_path / "m")
    assert_same(qm.params, back)
    assert meta["report"] == qm.report
    f = jax.jit(Model(TINY).forward)
    np.testing.assert_array_equal(np.asarray(f(back, tokens)), np.asarray(f(qm.params, tokens)))


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_last_finished_block(setup, tmp_path):
    params, tokens, full = setup
    run = lambda **kw: quantize_sequential(params, TINY, tokens, counted, CFG, needs=("H",), **kw)

    def stop_after_block_1(i):
        if i == 1:
            raise Interrupt

    CALLS.clear()
    with pytest.raises(Interrupt):
        run(checkpoint_dir=tmp_path, on_block_done=stop_after_block_1)
    assert len(CALLS) == 7 * 2  # blocks 0 and 1 were quantized (and saved) before the stop
    assert sorted(p.name for p in tmp_path.glob("block_*")) == ["block_0000", "block_0001"]

    CALLS.clear()
    resumed = run(checkpoint_dir=tmp_path)
    assert len(CALLS) == 7  # only block 2: blocks 0 and 1 were loaded, not re-quantized
    assert_same(full.params, resumed.params)
    assert [r["name"] for r in resumed.report] == [r["name"] for r in full.report]
    assert [r["bits"] for r in resumed.report] == [r["bits"] for r in full.report]

    CALLS.clear()
    again = run(checkpoint_dir=tmp_path)  # everything finished: nothing is quantized
    assert CALLS == [] and again.bits_per_weight == full.bits_per_weight

    with pytest.raises(ValueError, match="different quantization run"):
        quantize_sequential(
            params,
            TINY,
            tokens,
            counted,
            GPTQConfig(bits=4, group_size=32),
            needs=("H",),
            checkpoint_dir=tmp_path,
        )


def test_data_free_walk_runs_no_model_and_equals_the_core(setup, monkeypatch):
    """A core that needs no statistics (RTN) is quantized without the calibration forward: the
    capture driver is never called, and every linear is the core applied to its own weight."""
    params, tokens, _ = setup

    def no_forward(*a, **kw):
        raise AssertionError("a data-free walk ran the calibration forward")

    monkeypatch.setattr(capture, "sequential", no_forward)
    cfg = RTNConfig(bits=3, group_size=32)
    qm = quantize_sequential(params, TINY, tokens, rtn_layer, cfg, needs=())
    for name in linear_names(TINY):
        want = rtn_layer(jnp.asarray(get_param(params, name), jnp.float32), None, cfg).weight
        assert_same(get_param(qm.params, name), want)


# ------------------------------------------------------------------------------ integrity


def _saved(tmp_path, name="c"):
    """A checkpoint of a 3-bit QArray [16, 256] and a norm vector, and its tree."""
    tree = {"w": quantize(W((16, 256)), rtn(3, group_size=32, sym=False)), "n": W((256,), 1)}
    return ck.save_tree(tmp_path / name, tree, metadata={"report": [{"name": "w"}]}), tree


def _rewrite_meta(path, edit):
    """Edit a checkpoint's metadata JSON in place; ``edit(meta)`` changes it."""
    f = path / "meta" / "metadata"
    meta = json.loads(f.read_text())
    edit(meta)
    f.write_text(json.dumps(meta))


def _bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return static_json(a) == static_json(b) and all(
        x.dtype == y.dtype
        and x.shape == y.shape
        and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
        for x, y in zip(la, lb, strict=True)
    )


def test_every_flipped_byte_is_refused(tmp_path):
    """One flipped byte anywhere in a checkpoint (array data, orbax's bookkeeping, the
    metadata): load_tree raises CheckpointError naming that file — orbax never reads a changed
    file, the loaded tree is never silently different."""
    path, tree = _saved(tmp_path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert any(f.parent.name == "d" for f in files)  # orbax's data files are among them
    for f in files:
        raw = f.read_bytes()
        for pos in sorted({0, len(raw) // 3, len(raw) // 2, len(raw) - 1}):
            bad = bytearray(raw)
            bad[pos] ^= 0x04
            f.write_bytes(bytes(bad))
            with pytest.raises(ck.CheckpointError, match=re.escape(str(f))):
                ck.load_tree(path)
            f.write_bytes(raw)
    assert _bitwise_equal(ck.load_tree(path)[0], tree)  # every file restored: loads again


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["tree"]["dict"]["w"]["static"].update(shape={"tuple": [16, 128]}),
        lambda m: m["tree"]["dict"]["w"]["static"]["format"]["fields"].update(bits=2),
        lambda m: m["tree"]["dict"]["n"].update(shape=[128]),
        lambda m: m["metadata"]["report"][0].update(name="v"),
    ],
    ids=["qarray_shape", "format_bits", "array_shape", "report"],
)
def test_edited_metadata_is_refused_naming_the_file(tmp_path, edit):
    path, _ = _saved(tmp_path)
    _rewrite_meta(path, edit)
    with pytest.raises(ck.CheckpointError, match=r"meta/metadata.*changed"):
        ck.load_tree(path)


def test_damaged_files_raise_checkpoint_error_naming_them(tmp_path):
    path, _ = _saved(tmp_path)
    meta = path / "meta" / "metadata"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # truncated JSON
    with pytest.raises(ck.CheckpointError, match=r"meta/metadata.*unreadable"):
        ck.load_tree(path)
    meta.write_text(text)
    import shutil

    shutil.rmtree(path / "arrays")
    with pytest.raises(ck.CheckpointError, match=r"/c/arrays: missing"):
        ck.load_tree(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointError, match=r"empty.*not a lowbit checkpoint"):
        ck.load_tree(tmp_path / "empty")


def test_only_allowlisted_classes_are_rebuilt(tmp_path):
    """Metadata naming any other class — here one whose constructor writes a file — is refused
    before the class is built, even with a valid digest (a digest is not a signature)."""
    path, _ = _saved(tmp_path)
    evil = tmp_path / "written_by_the_constructor"

    def forge(meta):
        meta["tree"]["dict"]["w"] = {
            "dataclass": "methods.checkpoint:BlockCheckpoints",
            "data": {},
            "static": {"root": str(evil), "run_id": "x"},
        }
        if "sha256" in meta:
            meta["sha256"] = ck._meta_digest(meta)

    _rewrite_meta(path, forge)
    with pytest.raises(ValueError, match="refusing to rebuild class 'methods.checkpoint:Block"):
        ck.load_tree(path)
    assert not evil.exists()
    for bad in ("numerics.qarray:check", "builtins:dict", "numerics.formats:Format"):
        with pytest.raises(ValueError, match="refusing"):
            ck.decode({}, {"dataclass": bad, "data": {}, "static": {}})
    with pytest.raises(TypeError, match="REBUILDABLE"):
        ck.encode({"w": ck.BlockCheckpoints(tmp_path / "b", "id")})


def test_allowlist_covers_every_leaf_and_format():
    import importlib

    from methods.awq.core import ScaledQArray
    from methods.squeezellm.core import LUTWeight
    from numerics.formats import Format

    leaves = {ck._class_path(c) for c in (QArray, DenseSparse, ScaledQArray, LUTWeight)}
    assert leaves <= {p for p, k in ck.REBUILDABLE.items() if k == "leaf"}
    fmts = set()
    for mod in ("numerics.formats", "numerics.minifloat"):
        for obj in vars(importlib.import_module(mod)).values():
            if isinstance(obj, type) and issubclass(obj, Format) and obj is not Format:
                fmts.add(ck._class_path(obj))
    assert fmts == {p for p, k in ck.REBUILDABLE.items() if k == "format"}


def test_atomic_save_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    """A save that dies after orbax wrote its files but before the rename leaves no folder
    under the final name; the leftover is removed by the next resume."""
    import orbax.checkpoint as ocp

    real = ocp.Checkpointer.save

    def dies_after_writing(self, *a, **kw):
        real(self, *a, **kw)
        raise Interrupt

    ckpt = ck.BlockCheckpoints(tmp_path, "run")
    monkeypatch.setattr(ocp.Checkpointer, "save", dies_after_writing)
    with pytest.raises(Interrupt):
        ckpt.save(0, {"w": W()}, [])
    monkeypatch.undo()
    assert not (tmp_path / "block_0000").exists()
    assert ck.BlockCheckpoints(tmp_path, "run").finished() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_resume_verifies_every_block_it_reuses(setup, tmp_path):
    params, tokens, full = setup
    run = lambda **kw: quantize_sequential(params, TINY, tokens, counted, CFG, needs=("H",), **kw)
    run(checkpoint_dir=tmp_path)
    b0, b1 = tmp_path / "block_0000", tmp_path / "block_0001"
    b0.rename(tmp_path / "x")
    b1.rename(b0)
    (tmp_path / "x").rename(b1)
    with pytest.raises(ck.CheckpointError, match=r"block_0000: checkpoint is bound to"):
        run(checkpoint_dir=tmp_path)
    b0.rename(tmp_path / "x")
    b1.rename(b0)
    (tmp_path / "x").rename(b1)
    assert_same(run(checkpoint_dir=tmp_path).params, full.params)

    other = tmp_path / "other"  # a block of another run copied in
    run(checkpoint_dir=other, seed=1)
    import shutil

    shutil.rmtree(b1)
    shutil.copytree(other / "block_0001", b1)
    with pytest.raises(ck.CheckpointError, match=r"block_0001: checkpoint is bound to"):
        run(checkpoint_dir=tmp_path)

    info = tmp_path / "run.json"
    info.write_text(info.read_text()[:20])  # truncated
    with pytest.raises(ck.CheckpointError, match=r"run.json: unreadable"):
        run(checkpoint_dir=tmp_path)


def test_resume_cleans_leftovers_and_restores_a_block_moved_aside(tmp_path):
    """A kill between the two renames of a replacement leaves the previous block aside under a
    temporary name: reopening puts it back; a half-written temporary folder is removed."""
    ckpt = ck.BlockCheckpoints(tmp_path, "run")
    ckpt.save(0, {"w": W()}, [{"name": "w"}])
    (tmp_path / "block_0000").rename(tmp_path / ".block_0000.old-0123456789ab")
    (tmp_path / ".block_0001.partial-0123456789ab" / "arrays").mkdir(parents=True)
    done = ck.BlockCheckpoints(tmp_path, "run").finished()
    assert list(done) == [0] and np.array_equal(done[0][0]["w"], W())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0000", "run.json"]
