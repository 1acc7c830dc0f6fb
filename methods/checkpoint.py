"""Quantized checkpoints with orbax: packed codes + JSON metadata, bit-exact round trips.

A params pytree whose weight leaves may be quantized objects (``numerics.qarray.QArray``,
``numerics.sparse.DenseSparse``, or any dataclass registered with
``jax.tree_util.register_dataclass`` in ``numerics`` / ``harness`` / ``methods``) is split in two:

* **arrays** — every array leaf, saved by orbax (``StandardSave``) under flat keys ``a0, a1, …``.
  QArray codes are stored *packed*: ``QArray.pack`` along the input (last) axis into ``uint32``
  words (3-bit codes: 32 per three words) — never fake-quantized floats. Zero-size arrays
  (e.g. a DenseSparse with no outliers) are described in the metadata only (orbax refuses them).
* **meta** — JSON (``JsonSave``; never pickle): the tree's structure (dict / list / tuple /
  None), each array's dtype and shape, and each dataclass's class path and static fields
  (formats are encoded as their dataclass fields, dtypes by name, non-finite floats by name).
  Only dataclasses from the packages above are rebuilt on load.

``save_tree`` / ``load_tree`` are the round trip (``load_tree(save_tree(t)) == t`` leaf by leaf,
bit for bit, static fields equal). ``BlockCheckpoints`` stores one finished block per
directory during a run so that ``methods.walk.quantize_sequential(..., checkpoint_dir=…)``
resumes an interrupted quantization from the last finished block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from numerics.formats import Format
from numerics.qarray import QArray

_ALLOWED_MODULES = ("numerics.", "harness.", "methods.")
_WORD_BITS = 32


# ------------------------------------------------------------------ JSON for static fields


def _encode_static(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return _encode_static(float(v))
    if isinstance(v, tuple | list):
        return {"tuple" if isinstance(v, tuple) else "list": [_encode_static(x) for x in v]}
    if isinstance(v, Format) and dataclasses.is_dataclass(v):
        return {
            "format": _class_path(type(v)),
            "fields": {
                f.name: _encode_static(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init
            },
        }
    try:
        return {"dtype": jnp.dtype(v).name}
    except TypeError:
        pass
    raise TypeError(
        f"checkpoint: cannot store static field value {v!r} ({type(v).__name__}) as JSON"
    )


def _decode_static(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    if "float" in v:
        return float(v["float"])
    if "tuple" in v:
        return tuple(_decode_static(x) for x in v["tuple"])
    if "list" in v:
        return [_decode_static(x) for x in v["list"]]
    if "dtype" in v:
        return np.dtype(jnp.dtype(v["dtype"]))
    if "format" in v:
        cls = _load_class(v["format"])
        return cls(**{k: _decode_static(x) for k, x in v["fields"].items()})
    raise ValueError(f"checkpoint: unknown static encoding {v!r}")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str) -> type:
    mod, _, name = path.partition(":")
    if not mod.startswith(_ALLOWED_MODULES) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"checkpoint: refusing to rebuild class {path!r} (not a lowbit dataclass)")
    cls = getattr(importlib.import_module(mod), name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"checkpoint: {path!r} is not a dataclass")
    return cls


# ------------------------------------------------------------------ tree <-> (arrays, spec)


def _is_static(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("static", False))


def encode(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    """``(arrays, spec)``: flat ``{"a<k>": array}`` for orbax and a JSON-able structure spec.
    QArray codes are packed into uint32 words along the last axis first."""
    arrays: dict[str, np.ndarray] = {}

    def rec(x):
        if x is None:
            return {"none": True}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"checkpoint: dict keys must be str, got {list(x)}")
            return {"dict": {k: rec(v) for k, v in x.items()}}
        if isinstance(x, list | tuple):
            return {"tuple" if isinstance(x, tuple) else "list": [rec(v) for v in x]}
        if isinstance(x, QArray) and x.packing is None and x.format.bits <= 8:
            packed = x.pack(axis=-1, word_bits=_WORD_BITS)
            node = rec(packed)
            node["unpack_on_load"] = True
            return node
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = dataclasses.fields(x)
            return {
                "dataclass": _class_path(type(x)),
                "data": {f.name: rec(getattr(x, f.name)) for f in fields if not _is_static(f)},
                "static": {
                    f.name: _encode_static(getattr(x, f.name)) for f in fields if _is_static(f)
                },
            }
        if isinstance(x, bool | int | float):
            return {"py": _encode_static(x)}
        if hasattr(x, "dtype") and hasattr(x, "shape"):
            a = np.asarray(x)
            node = {"array": None, "dtype": a.dtype.name, "shape": list(a.shape)}
            if a.size:
                key = f"a{len(arrays)}"
                arrays[key] = a
                node["array"] = key
            return node
        raise TypeError(f"checkpoint: cannot store a leaf of type {type(x).__name__}")

    return arrays, rec(tree)


def decode(arrays: dict[str, Any], spec: Any) -> Any:
    """Inverse of ``encode``."""

    def rec(n):
        if "none" in n:
            return None
        if "dict" in n:
            return {k: rec(v) for k, v in n["dict"].items()}
        if "list" in n:
            return [rec(v) for v in n["list"]]
        if "tuple" in n:
            return tuple(rec(v) for v in n["tuple"])
        if "py" in n:
            return _decode_static(n["py"])
        if "dataclass" in n:
            cls = _load_class(n["dataclass"])
            kw = {k: rec(v) for k, v in n["data"].items()}
            kw |= {k: _decode_static(v) for k, v in n["static"].items()}
            obj = cls(**kw)
            return obj.unpack() if n.get("unpack_on_load") else obj
        if "array" in n:
            dt = jnp.dtype(n["dtype"])
            if n["array"] is None:
                return jnp.zeros(tuple(n["shape"]), dt)
            a = np.asarray(arrays[n["array"]])
            if a.dtype != dt or list(a.shape) != n["shape"]:
                raise ValueError(
                    f"checkpoint: array {n['array']} is {a.dtype}{a.shape}, "
                    f"expected {dt}{n['shape']}"
                )
            return jnp.asarray(a)
        raise ValueError(f"checkpoint: unknown node {sorted(n)}")

    return rec(spec)


def _to_json(x: Any) -> Any:
    """Metadata (reports: dicts of names and numbers) as strict JSON; see ``_from_json``."""
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_json(v) for v in x]
    if hasattr(x, "shape") and np.ndim(x) == 0:
        x = np.asarray(x).item()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return {"float": repr(x)}
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise TypeError(f"checkpoint: metadata value {x!r} ({type(x).__name__}) is not JSON")


def _from_json(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"float"}:
            return float(x["float"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def save_tree(path: str | Path, tree: Any, *, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``tree`` (params with quantized leaves) to the directory ``path`` (overwritten).
    ``metadata``: extra JSON (reports, configs) returned by ``load_tree``."""
    path = Path(path).resolve()
    arrays, spec = encode(tree)
    meta = {"format": "lowbit-quantized-v1", "tree": spec, "metadata": _to_json(metadata or {})}
    json.dumps(meta, allow_nan=False)  # fail early (and clearly) on anything that is not JSON
    items = {"meta": ocp.args.JsonSave(meta)}
    if arrays:  # orbax refuses an empty tree
        items["arrays"] = ocp.args.StandardSave(arrays)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(path, ocp.args.Composite(**items), force=True)
    return path


def load_tree(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(tree, metadata)`` saved by ``save_tree``."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        # Metadata first: a tree without (non-empty) arrays has no "arrays" item.
        meta = ckpt.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format") != "lowbit-quantized-v1":
            raise ValueError(f"{path} is not a lowbit quantized checkpoint")
        arrays = {}
        if (path / "arrays").is_dir():
            args = ocp.args.Composite(arrays=ocp.args.StandardRestore())
            arrays = ckpt.restore(path, args)["arrays"]
    return decode(arrays, meta["tree"]), _from_json(meta["metadata"])


# ------------------------------------------------------------------ resumable runs


def fingerprint(*parts: Any) -> str:
    """sha256 of the run's identity: arrays by their bytes (and dtype/shape), the rest by repr."""
    h = hashlib.sha256()
    for p in parts:
        for leaf in jax.tree_util.tree_leaves(p):
            if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
                a = np.asarray(leaf)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
            else:
                h.update(repr(leaf).encode())
        h.update(b"|")
    return h.hexdigest()


@dataclasses.dataclass
class BlockCheckpoints:
    """One directory per finished block (``block_0003``) under ``root``, plus ``run.json``
    holding the run's fingerprint: resuming with different inputs is refused."""

    root: Path
    run_id: str

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "run.json"
        if info.exists():
            saved = json.loads(info.read_text())["run_id"]
            if saved != self.run_id:
                raise ValueError(
                    f"{self.root} holds blocks of a different quantization run (fingerprint "
                    f"{saved[:12]}… != {self.run_id[:12]}…); "
                    "use another checkpoint_dir or delete it"
                )
        else:
            info.write_text(json.dumps({"run_id": self.run_id}))

    def _dir(self, i: int) -> Path:
        return self.root / f"block_{i:04d}"

    def save(self, i: int, block_params: Any, report: list[dict[str, Any]]) -> None:
        save_tree(self._dir(i), block_params, metadata={"block": i, "report": report})

    def finished(self) -> dict[int, tuple[Any, list[dict[str, Any]]]]:
        """Blocks 0..k−1 that were saved completely (orbax renames a directory only once it
        is whole), as ``{i: (block_params, report rows)}``; stops at the first gap."""
        out = {}
        i = 0
        while self._dir(i).is_dir():
            bp, meta = load_tree(self._dir(i))
            out[i] = (bp, meta["report"])
            i += 1
        return out


def resume(
    checkpoint_dir: str | Path | None, *run_parts: Any
) -> tuple[BlockCheckpoints | None, dict[int, Any], list[dict[str, Any]]]:
    """Open the block checkpoints of the run identified by ``run_parts`` (see
    :func:`fingerprint`): ``(checkpoints, {i: finished block params}, report rows of the
    finished blocks)``; ``(None, {}, [])`` without a ``checkpoint_dir``."""
    if checkpoint_dir is None:
        return None, {}, []
    ckpt = BlockCheckpoints(Path(checkpoint_dir), fingerprint(*run_parts))
    done, report = {}, []
    for i, (bp, rows) in ckpt.finished().items():
        done[i] = bp
        report.extend(rows)
    return ckpt, done, report
