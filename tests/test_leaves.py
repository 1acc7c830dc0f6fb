"""The weight-leaf protocol (numerics/leaves.py): every leaf type satisfies it, lives in
numerics, keeps its bit count, and round-trips through a checkpoint bit for bit."""

import ast
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods import checkpoint as ck
from numerics.config import rtn
from numerics.formats import IntFormat
from numerics.leaves import (
    LEAF_TYPES,
    DenseSparse,
    LUTWeight,
    ScaledQArray,
    WeightLeaf,
    is_weight_leaf,
    weight_bits,
)
from numerics.packing import bits_per_weight
from numerics.qarray import QArray
from numerics.quantize import quantize
from numerics.scales import double_quantize
from numerics.sparse import split_outliers

ROOT = Path(__file__).resolve().parents[1]
M, N = 24, 160


def W():
    return jax.random.normal(jax.random.key(0), (M, N), jnp.float32)


def lut_weight():
    codes = jax.random.randint(jax.random.key(1), (M, N), 0, 8).astype(jnp.uint8)
    lut = jnp.sort(jax.random.normal(jax.random.key(2), (M, 8)), axis=1).astype(jnp.float16)
    return LUTWeight(codes, lut, 3, jnp.float32)


def leaves():
    """A real instance of every leaf type (some twice: over another leaf, scales of scales)."""
    w = W()
    qa = quantize(w, rtn(3, group_size=32, sym=False, scale_dtype="float16"))  # + 3-bit zeros
    mask = jnp.abs(w) > 2.5
    s = jnp.linspace(0.5, 2.0, N).astype(jnp.float16)
    return {
        "qarray": qa,
        "qarray_double": double_quantize(quantize(w, rtn(4, group_size=32, sym=False))),
        "dense_sparse": DenseSparse(qa, *split_outliers(w, mask)),
        "scaled": ScaledQArray(qa, s),
        "lut": lut_weight(),
        "dense_sparse_lut": DenseSparse(lut_weight(), *split_outliers(w, mask)),
    }


def _old_storage_bits(qa):
    """numerics.packing.storage_bits before the leaves moved, copied literally."""
    out = {"codes": qa.size * qa.format.bits, "scales": 0, "zeros": 0}
    if isinstance(qa.scale, QArray):
        out["scales"] = sum(_old_storage_bits(qa.scale).values())
    else:
        out["scales"] = int(np.prod(qa.scale.shape)) * jnp.dtype(qa.scale.dtype).itemsize * 8
    if qa.zero is not None:
        zbits = qa.format.bits if isinstance(qa.format, IntFormat) else 16
        out["zeros"] = int(np.prod(qa.zero.shape)) * zbits
    return out


def old_bits(name, leaf):
    """The bit counts as numerics.packing / numerics.sparse / methods.awq / methods.squeezellm
    computed them before the leaves moved (their formulas, copied literally)."""

    def qa_bpw(qa, n_outliers=0):
        return (sum(_old_storage_bits(qa).values()) + n_outliers * 32) / qa.size

    def lut_bpw(lw):
        return (lw.size * lw.bits + lw.lut.size * jnp.dtype(lw.lut.dtype).itemsize * 8) / lw.size

    if name.startswith("qarray"):
        return qa_bpw(leaf)
    if name == "dense_sparse":
        return qa_bpw(leaf.dense, leaf.n_outliers)
    if name == "scaled":
        return qa_bpw(leaf.q) + leaf.s.size * 16 / leaf.q.size
    if name == "lut":
        return lut_bpw(leaf)
    if name == "dense_sparse_lut":
        return lut_bpw(leaf.dense) + leaf.n_outliers * 32 / (M * N)
    raise KeyError(name)


def test_old_formulas_by_hand():
    """The copied formulas themselves, on the hand count of the main instances."""
    ls, n = leaves(), M * N
    k = int(jnp.sum(jnp.abs(W()) > 2.5))
    assert k > 0
    assert old_bits("qarray", ls["qarray"]) == 3 + 16 / 32 + 3 / 32
    assert old_bits("dense_sparse", ls["dense_sparse"]) == (3 * n + 19 * n // 32 + 32 * k) / n
    assert old_bits("lut", ls["lut"]) == 3 + 8 * 16 / N


@pytest.mark.parametrize("name", list(leaves()))
def test_every_leaf_satisfies_the_protocol(name):
    leaf = leaves()[name]
    assert isinstance(leaf, WeightLeaf) and is_weight_leaf(leaf)
    assert isinstance(leaf, LEAF_TYPES)
    w = leaf.dequantize()
    assert tuple(w.shape) == tuple(leaf.shape) == (M, N)
    assert w.dtype == jnp.dtype(leaf.dtype)
    assert leaf.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    assert isinstance(leaf.bits_per_weight(), float)
    # a registered pytree: flattens to arrays only and dequantizes the same under jit
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(leaf))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x.dequantize())(leaf)), w)


def test_leaf_types_are_the_four_and_each_is_covered():
    assert {QArray, DenseSparse, ScaledQArray, LUTWeight} <= set(LEAF_TYPES)
    for cls in LEAF_TYPES:
        assert cls.__module__.startswith("numerics.")
        assert dataclasses.is_dataclass(cls)


@pytest.mark.parametrize("name", list(leaves()))
def test_weight_bits_keeps_the_old_numbers(name):
    leaf = leaves()[name]
    assert weight_bits(leaf) == leaf.bits_per_weight() == old_bits(name, leaf)
    assert bits_per_weight(leaf) == leaf.bits_per_weight()
    assert sum(leaf.storage_bits().values()) / (M * N) == leaf.bits_per_weight()


def test_storage_parts_by_name():
    ls = leaves()
    n = M * N
    assert ls["qarray"].storage_bits() == {"codes": 3 * n, "scales": n // 2, "zeros": 3 * n // 32}
    assert ls["scaled"].storage_bits()["scales"] == n // 2 + 16 * N
    assert ls["lut"].storage_bits() == {"codes": 3 * n, "tables": M * 8 * 16}
    ds = ls["dense_sparse_lut"]
    assert ds.storage_bits() == {
        "codes": 3 * n,
        "tables": M * 8 * 16,
        "outliers": 32 * ds.n_outliers,
    }


def test_float_arrays_and_non_leaves():
    w = W()
    assert weight_bits(w) == 32.0 and weight_bits(w.astype(jnp.bfloat16)) == 16.0
    assert weight_bits(np.zeros((2, 2), np.float16)) == 16.0
    assert not is_weight_leaf(w) and not is_weight_leaf(np.zeros(3))

    @dataclasses.dataclass
    class OnlyDequantize:  # runs through harness.layers.linear, but cannot be counted
        w: jax.Array

        def dequantize(self, dtype=None):
            return self.w

    stand_in = OnlyDequantize(w)
    assert not is_weight_leaf(stand_in)
    with pytest.raises(TypeError, match="not a WeightLeaf"):
        weight_bits(stand_in)
    with pytest.raises(TypeError, match="expected a weight leaf or an array"):
        weight_bits("int4")
    with pytest.raises(TypeError, match="no storage_bits"):
        bits_per_weight(w)


def test_harness_seam_accepts_every_leaf():
    from harness.layers import dense, is_quantized

    for leaf in leaves().values():
        assert is_quantized(leaf)
        np.testing.assert_array_equal(dense(leaf, jnp.float32), leaf.dequantize(jnp.float32))
    assert not is_quantized(W())


def test_old_import_paths_are_the_same_classes():
    from methods.awq import ScaledQArray as awq_scaled
    from methods.awq.core import ScaledQArray as awq_core_scaled
    from methods.squeezellm import LUTWeight as sq_lut
    from methods.squeezellm.core import LUTWeight as sq_core_lut
    from numerics.sparse import DenseSparse as sparse_ds
    from numerics.sparse import weight_bits as sparse_weight_bits

    assert awq_scaled is awq_core_scaled is ScaledQArray
    assert sq_lut is sq_core_lut is LUTWeight
    assert sparse_ds is DenseSparse and sparse_weight_bits is weight_bits


def _bit_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb and len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("name", list(leaves()))
def test_checkpoint_round_trip_bit_exact(name, tmp_path):
    leaf = leaves()[name]
    ck.save_tree(tmp_path / "c", {"q_proj": leaf})
    back, _ = ck.load_tree(tmp_path / "c")
    assert type(back["q_proj"]) is type(leaf)
    _bit_equal(back["q_proj"], leaf)
    assert weight_bits(back["q_proj"]) == weight_bits(leaf)


@pytest.mark.parametrize(
    "name, old_path",
    [
        ("scaled", "methods.awq.core:ScaledQArray"),
        ("lut", "methods.squeezellm.core:LUTWeight"),
        ("dense_sparse", "numerics.sparse:DenseSparse"),
    ],
)
def test_class_paths_from_before_the_move_are_not_rebuilt(name, old_path):
    """Checkpoints name their leaf classes by their numerics.leaves paths; the old paths are
    not on the allowlist (checkpoints of that time are format v1, refused as a whole)."""
    leaf = leaves()[name]
    arrays, spec = ck.encode({"w": leaf})
    node = spec["dict"]["w"]
    assert node["dataclass"] == f"numerics.leaves:{type(leaf).__name__}"
    node["dataclass"] = old_path  # the class path such a checkpoint recorded
    spec = json.loads(json.dumps(spec))
    with pytest.raises(ck.CheckpointError, match="REBUILDABLE|rebuil|allow"):
        ck.decode(arrays, spec)


def _classes_defining(name: str, package: str) -> list[str]:
    """Classes under ``package`` whose body defines method ``name`` (parsed, not imported)."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.FunctionDef) and b.name == name for b in node.body
            ):
                out.append(f"{path.relative_to(ROOT)}:{node.name}")
    return out


def test_every_leaf_type_lives_in_numerics_and_is_listed():
    for package in ("kernels", "harness", "methods"):
        assert _classes_defining("dequantize", package) == []
    in_numerics = {s.rsplit(":", 1)[1] for s in _classes_defining("dequantize", "numerics")}
    assert in_numerics - {"WeightLeaf"} == {cls.__name__ for cls in LEAF_TYPES}
