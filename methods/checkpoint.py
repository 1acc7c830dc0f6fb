"""Quantized checkpoints with orbax: packed codes + JSON metadata, bit-exact, verified on load.

A params pytree whose weight leaves may be quantized objects (the leaf types of
:data:`REBUILDABLE`: ``QArray``, ``DenseSparse``, ``ScaledQArray``, ``LUTWeight``) is split in two:

* **arrays** — every array leaf, saved by orbax (``StandardSave``) under flat keys ``a0, a1, …``.
  QArray codes are stored *packed*: ``QArray.pack`` along the input (last) axis into ``uint32``
  words (3-bit codes: 32 per three words) — never fake-quantized floats. Zero-size arrays
  (e.g. a DenseSparse with no outliers) are described in the metadata only (orbax refuses them).
* **meta** — JSON (``JsonSave``; never pickle): the tree's structure (dict / list / tuple /
  None), each array's dtype and shape, and each dataclass's class path and static fields
  (formats are encoded as their dataclass fields, dtypes by name, non-finite floats by name).

Integrity (what a checkpoint guarantees; WORKSPACE.md repeats it):

* **Digests.** At save, the sha256 of every array's bytes (with its key, dtype and shape) is
  written into the metadata, and the sha256 of the metadata itself (canonical JSON: the tree
  spec, user metadata, the array digests and the ``bind`` record) beside it. ``load_tree``
  recomputes both and raises :class:`CheckpointError` (a ``ValueError``) naming the file on any
  mismatch, on unreadable / truncated JSON, on a missing ``arrays`` folder or metadata file, and
  on arrays orbax cannot read. A digest detects accidental change (bit rot, a truncated copy, an
  edited field, mixed-up folders); it is not a signature — whoever rewrites the digest too can
  forge a checkpoint. Checkpoints are trusted input only up to the allowlist below.
* **Allowlist.** Only the classes of :data:`REBUILDABLE` (one table keyed by class path) are
  ever constructed on load: the quantized leaf types and the element formats. Building them has
  no side effect. Any other class path in the metadata is refused before anything is imported.
* **Binding.** ``save_tree(..., bind=…)`` records a JSON value (for block checkpoints: the
  block index and the run's fingerprint) inside the digested metadata; ``load_tree(...,
  bind=…)`` refuses a checkpoint bound to anything else, so block folders swapped or copied
  between runs are not loaded into the wrong place.
* **Atomic saves.** A checkpoint is written into a hidden temporary folder beside its target and
  renamed into place when complete, so a process killed mid-save leaves either the previous
  state or the whole new checkpoint, never a half-written one under the final name (the rename
  protects against a killed process, not against power loss: nothing is fsync'ed). Leftover
  temporary folders are ignored and removed by the next resume.

``save_tree`` / ``load_tree`` are the round trip (``load_tree(save_tree(t)) == t`` leaf by leaf,
bit for bit, static fields equal). ``BlockCheckpoints`` stores one finished block per
directory during a run so that ``methods.walk.quantize_sequential(..., checkpoint_dir=…)``
resumes an interrupted quantization from the last finished block, verifying every block it
reuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from numerics.formats import Format
from numerics.leaves import LEAF_TYPES
from numerics.qarray import QArray

_WORD_BITS = 32
_FORMAT_TAG = "lowbit-quantized-v2"  # v2: digests + bind; v1 (no digests) is refused

# The only classes a checkpoint may rebuild, by class path ("module:QualName") -> kind.
# "leaf": quantized weight leaves (pytree dataclasses); "format": element formats (static
# fields). ScaledQArray and LUTWeight may move to numerics.leaves: both paths are listed, and a
# path whose module does not import is simply unavailable (refused with a clear error).
REBUILDABLE: dict[str, str] = {
    **{f"{c.__module__}:{c.__qualname__}": "leaf" for c in LEAF_TYPES},  # numerics.leaves
    "numerics.formats:IntFormat": "format",
    "numerics.formats:TableFormat": "format",
    "numerics.minifloat:FloatFormat": "format",
}


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, modified, of another run / block, or names a
    class that may not be rebuilt. The message names the file."""


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
            "format": _allowed_path(type(v), "format"),
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
        cls = _load_class(v["format"], "format")
        return cls(**{k: _decode_static(x) for k, x in v["fields"].items()})
    raise ValueError(f"checkpoint: unknown static encoding {v!r}")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed_path(cls: type, kind: str) -> str:
    path = _class_path(cls)
    if REBUILDABLE.get(path) != kind:
        raise TypeError(
            f"checkpoint: cannot store {path} as a {kind}: not in methods.checkpoint.REBUILDABLE "
            "(add it there if loading it has no side effect)"
        )
    return path


def _load_class(path: Any, kind: str) -> type:
    """The class at ``path`` if :data:`REBUILDABLE` lists it as ``kind``; nothing else is
    imported or constructed."""
    if not isinstance(path, str) or REBUILDABLE.get(path) != kind:
        raise CheckpointError(
            f"checkpoint: refusing to rebuild class {path!r}: not an allowed {kind} type "
            f"(allowed: {sorted(p for p, k in REBUILDABLE.items() if k == kind)})"
        )
    mod, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"checkpoint: class {path} is not available here ({e})") from e
    if not dataclasses.is_dataclass(cls) or (kind == "format" and not issubclass(cls, Format)):
        raise CheckpointError(f"checkpoint: {path} is not a {kind} dataclass")
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
                "dataclass": _allowed_path(type(x), "leaf"),
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
            cls = _load_class(n["dataclass"], "leaf")
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


def _canonical(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _array_digest(key: str, a: Any) -> str:
    a = np.asarray(a)
    h = hashlib.sha256(f"{key}|{a.dtype.name}|{list(a.shape)}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "sha256"})).hexdigest()


_META = "meta/metadata"  # the metadata JSON, relative to the checkpoint folder


def _file_digests(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` except the metadata."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel != _META:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _tmp_sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{uuid.uuid4().hex[:12]}")


def _is_leftover(p: Path) -> bool:
    """A temporary folder of an interrupted save (ours, or orbax's own inside it)."""
    return (p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name)) or (
        ".orbax-checkpoint-tmp" in p.name
    )


def save_tree(
    path: str | Path,
    tree: Any,
    *,
    metadata: dict[str, Any] | None = None,
    bind: Any = None,
) -> Path:
    """Save ``tree`` (params with quantized leaves) to the directory ``path`` (replaced if it
    exists), atomically: written to a temporary sibling folder, then renamed into place.
    ``metadata``: extra JSON (reports, configs) returned by ``load_tree``. ``bind``: a JSON
    value the checkpoint is bound to (see the module docstring); ``load_tree(bind=…)`` checks it.
    """
    path = Path(path).resolve()
    arrays, spec = encode(tree)
    meta = {
        "format": _FORMAT_TAG,
        "tree": spec,
        "metadata": _to_json(metadata or {}),
        "bind": _to_json(bind),
        "arrays_sha256": {k: _array_digest(k, a) for k, a in arrays.items()},
    }
    try:
        _canonical(meta)
    except ValueError as e:  # allow_nan=False: fail early (and clearly) on what is not JSON
        raise TypeError(f"checkpoint: metadata is not strict JSON ({e})") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "partial")
    try:
        if arrays:  # orbax refuses an empty tree
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
                ckpt.save(tmp, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays)))
        tmp.mkdir(exist_ok=True)
        # orbax's files as written (checked before orbax ever reads them), then the metadata
        meta["files_sha256"] = _file_digests(tmp)
        meta["sha256"] = _meta_digest(meta)
        (tmp / "meta").mkdir()
        (tmp / _META).write_text(json.dumps(meta, allow_nan=False), encoding="utf-8")
        if path.exists():  # replace: move the old one aside first (a rename cannot overwrite)
            old = _tmp_sibling(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    f = path / _META
    if not f.is_file():
        raise CheckpointError(f"{path}: not a lowbit checkpoint ({f} is missing)")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint metadata ({e}); truncated?") from e
    if not isinstance(meta, dict) or "format" not in meta:
        raise CheckpointError(f"{f}: not lowbit checkpoint metadata")
    if meta["format"] != _FORMAT_TAG:
        raise CheckpointError(
            f"{f}: checkpoint format {meta['format']!r}, expected {_FORMAT_TAG!r} "
            "(v1 checkpoints carry no digests: save them again)"
        )
    want = meta.get("sha256")
    try:
        got = _meta_digest(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: checkpoint metadata is not strict JSON ({e})") from e
    if not isinstance(want, str) or got != want:
        raise CheckpointError(
            f"{f}: checkpoint metadata changed since it was saved (sha256 {got[:16]}… != "
            f"recorded {str(want)[:16]}…)"
        )
    for k in ("tree", "metadata", "arrays_sha256", "files_sha256"):
        if k not in meta:
            raise CheckpointError(f"{f}: checkpoint metadata lacks {k!r}")
    return meta


def load_tree(path: str | Path, *, bind: Any = None) -> tuple[Any, dict[str, Any]]:
    """``(tree, metadata)`` saved by ``save_tree``, after verifying the metadata's and every
    array's sha256 (and, when ``bind`` is given, that the checkpoint is bound to it); any
    problem raises :class:`CheckpointError` naming the file."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = _read_meta(path)
    if bind is not None and meta.get("bind") != _to_json(bind):
        raise CheckpointError(
            f"{path}: checkpoint is bound to {meta.get('bind')!r}, expected {_to_json(bind)!r} "
            "(moved, swapped or from another run)"
        )
    want = meta["arrays_sha256"]
    if want and not (path / "arrays").is_dir():
        raise CheckpointError(f"{path / 'arrays'}: missing ({len(want)} arrays expected)")
    files = meta["files_sha256"]
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise CheckpointError(f"{f}: changed since the checkpoint was saved (sha256 mismatch)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    extra = sorted(present - set(files) - {_META})
    if extra:
        raise CheckpointError(f"{path}: files not in the saved checkpoint: {extra[:5]}")
    arrays: dict[str, Any] = {}
    if want:
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
                args = ocp.args.Composite(arrays=ocp.args.StandardRestore())
                arrays = dict(ckpt.restore(path, args)["arrays"])
        except Exception as e:  # files verified above: only a changed orbax/tensorstore gets here
            raise CheckpointError(f"{path / 'arrays'}: orbax cannot read the arrays ({e})") from e
    if sorted(arrays) != sorted(want):
        raise CheckpointError(
            f"{path / 'arrays'}: holds arrays {sorted(arrays)}, metadata lists {sorted(want)}"
        )
    for k, a in arrays.items():
        if _array_digest(k, a) != want[k]:
            raise CheckpointError(
                f"{path / 'arrays'}: array {k} changed since it was saved (sha256 mismatch)"
            )
    try:
        tree = decode(arrays, meta["tree"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the tree ({type(e).__name__}: {e})") from e
    return tree, _from_json(meta["metadata"])


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_sibling(path, "partial")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclasses.dataclass
class BlockCheckpoints:
    """One directory per finished block (``block_0003``) under ``root``, plus ``run.json``
    holding the run's fingerprint: resuming with different inputs is refused. Each block is
    bound to ``{"block": i, "run_id": run_id}`` and verified when it is reused."""

    root: Path
    run_id: str

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "run.json"
        if info.exists():
            try:
                saved = json.loads(info.read_text())["run_id"]
                if not isinstance(saved, str):
                    raise TypeError(f"run_id is {type(saved).__name__}")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{info}: unreadable ({type(e).__name__}: {e}); truncated? Delete {self.root} "
                    "to start the run again"
                ) from e
            if saved != self.run_id:
                raise CheckpointError(
                    f"{self.root} holds blocks of a different quantization run (fingerprint "
                    f"{saved[:12]}… != {self.run_id[:12]}…); "
                    "use another checkpoint_dir or delete it"
                )
        else:
            _write_atomic(info, json.dumps({"run_id": self.run_id}))
        for p in sorted(self.root.iterdir()):  # temporary folders of interrupted saves
            if not _is_leftover(p):
                continue
            if ".old-" in p.name:  # killed between the two renames of a replacement
                final = self.root / p.name[1:].split(".old-")[0]
                if not final.exists():
                    os.rename(p, final)  # the previous version comes back
                    continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _dir(self, i: int) -> Path:
        return self.root / f"block_{i:04d}"

    def _bind(self, i: int) -> dict[str, Any]:
        return {"block": i, "run_id": self.run_id}

    def save(self, i: int, block_params: Any, report: list[dict[str, Any]]) -> None:
        save_tree(
            self._dir(i), block_params, metadata={"block": i, "report": report}, bind=self._bind(i)
        )

    def finished(self) -> dict[int, tuple[Any, list[dict[str, Any]]]]:
        """Blocks 0..k−1 that were saved (complete: saves are atomic), each verified (digests,
        bound to its index and this run), as ``{i: (block_params, report rows)}``; stops at the
        first gap. A damaged block raises :class:`CheckpointError` naming it."""
        out = {}
        i = 0
        while self._dir(i).is_dir():
            bp, meta = load_tree(self._dir(i), bind=self._bind(i))
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
