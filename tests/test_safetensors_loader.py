"""Hugging Face safetensors loader on small random checkpoints the tests write themselves
(LLaMA untied, Qwen2 sharded bf16 with biases and tied embeddings, Mistral with a sliding window),
checked against an independent numpy float64 forward written from the transformers LLaMA code."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from harness.model import Model
from harness.safetensors_loader import hf_config, load_safetensors

BASE = dict(
    vocab_size=53,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e4,
    hidden_act="silu",
    max_position_embeddings=64,
)


def random_weights(cfg, seed=0, bias=False, tied=False):
    rng = np.random.default_rng(seed)
    d, ff, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // H
    n = lambda *s: (rng.normal(size=s) * s[-1] ** -0.5).astype(np.float32)
    w = {"model.embed_tokens.weight": n(V, d), "model.norm.weight": 1 + 0.1 * n(d) * d**0.5}
    if not tied:
        w["lm_head.weight"] = n(V, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * n(d) * d**0.5
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * n(d) * d**0.5
        for name, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
            w[p + f"self_attn.{name}_proj.weight"] = n(rows, d)
            if bias:
                w[p + f"self_attn.{name}_proj.bias"] = 0.1 * n(rows) * rows**0.5
        w[p + "self_attn.o_proj.weight"] = n(d, H * hd)
        w[p + "mlp.gate_proj.weight"] = n(ff, d)
        w[p + "mlp.up_proj.weight"] = n(ff, d)
        w[p + "mlp.down_proj.weight"] = n(d, ff)
    return w


def hf_reference(w, cfg, tokens):
    """float64 forward of transformers' LlamaForCausalLM semantics (rotate_half RoPE, repeat_kv,
    causal + optional sliding-window mask, SwiGLU), written independently of harness/."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    d, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, T = cfg.get("head_dim") or d // H, cfg["rms_norm_eps"], len(tokens)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    factor = (cfg.get("rope_scaling") or {}).get("factor", 1.0)
    norm = lambda x, g: g * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(T) / factor, inv)
    cos, sin = (
        np.cos(np.concatenate([ang, ang], -1))[:, None],
        np.sin(np.concatenate([ang, ang], -1))[:, None],
    )
    rot_half = lambda x: np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    x = w["model.embed_tokens.weight"][tokens]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = norm(x, w[p + "input_layernorm.weight"])
        proj = lambda n, h=h, p=p: (
            h @ w[p + f"self_attn.{n}_proj.weight"].T + w.get(p + f"self_attn.{n}_proj.bias", 0.0)
        )
        q, k, v = (
            proj("q").reshape(T, H, hd),
            proj("k").reshape(T, KV, hd),
            proj("v").reshape(T, KV, hd),
        )
        q, k = q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(allowed[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = (
            x
            + np.einsum("hts,shd->thd", a, v).reshape(T, H * hd)
            @ w[p + "self_attn.o_proj.weight"].T
        )
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    head = (
        w.get("lm_head.weight", w["model.embed_tokens.weight"])
        if not cfg.get("tie_word_embeddings")
        else w["model.embed_tokens.weight"]
    )
    return norm(x, w["model.norm.weight"]) @ head.T


def write_ckpt(path, cfg, w, shards=1, dtype=np.float32):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    stored = {k: v.astype(dtype) for k, v in w.items()}
    if shards == 1:
        save_file(stored, str(path / "model.safetensors"))
        return stored
    keys = sorted(stored)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: stored[k] for k in keys[s::shards]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return stored


def check_against_reference(path, cfg, stored, T=9):
    mc, params = load_safetensors(path)
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], T)
    ours = np.asarray(jax.jit(Model(mc).forward)(params, jnp.asarray(tokens[None], jnp.int32)))[0]
    ref = hf_reference({k: np.asarray(v, np.float32) for k, v in stored.items()}, cfg, tokens)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
    return mc, params


def test_llama_untied_linear_rope_scaling(tmp_path):
    cfg = dict(
        BASE,
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    w = random_weights(cfg)
    stored = write_ckpt(tmp_path / "llama", cfg, w)
    mc, params = check_against_reference(tmp_path / "llama", cfg, stored)
    assert (mc.tie_embeddings, mc.attn_bias, mc.rope_scaling, mc.rope_factor, mc.layer_types) == (
        False,
        False,
        "linear",
        2.0,
        (),
    )
    np.testing.assert_array_equal(
        np.asarray(params["blocks"][1]["attn"]["k_proj"]),
        w["model.layers.1.self_attn.k_proj.weight"],
    )
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), w["lm_head.weight"])


def test_qwen2_sharded_bf16_tied_with_biases(tmp_path):
    cfg = dict(
        BASE,
        model_type="qwen2",
        tie_word_embeddings=True,
        rope_theta=1e6,
        use_sliding_window=False,
        sliding_window=4,
    )
    w = random_weights(cfg, seed=1, bias=True, tied=True)
    w["lm_head.weight"] = w["model.embed_tokens.weight"].copy()  # some tied checkpoints keep a copy
    stored = write_ckpt(tmp_path / "qwen", cfg, w, shards=3, dtype=ml_dtypes.bfloat16)
    mc, params = check_against_reference(tmp_path / "qwen", cfg, stored)
    assert (
        mc.attn_bias and mc.tie_embeddings and "lm_head" not in params and mc.sliding_window is None
    )
    assert params["blocks"][0]["attn"]["q_proj_bias"].shape == (32,)
    _, p16 = load_safetensors(tmp_path / "qwen", dtype="bfloat16")
    assert p16["embed"].dtype == jnp.bfloat16


def test_mistral_sliding_window(tmp_path):
    cfg = dict(BASE, model_type="mistral", sliding_window=3, head_dim=12)
    w = random_weights(cfg, seed=2)
    stored = write_ckpt(tmp_path / "mistral", cfg, w)
    mc, _ = check_against_reference(tmp_path / "mistral", cfg, stored, T=10)
    assert mc.layer_types == ("local", "local") and mc.sliding_window == 3 and mc.head_dim == 12


def test_qwen2_window_layers_from_max_window_layers():
    mc = hf_config(
        dict(
            BASE, model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1
        )
    )
    assert mc.layer_types == ("global", "local") and mc.sliding_window == 8


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    ],
)
def test_unsupported_configs(change, match):
    with pytest.raises(ValueError, match=match):
        hf_config({**BASE, "model_type": "llama", **change})


def test_broken_checkpoints(tmp_path):
    cfg = dict(BASE, model_type="llama")
    w = random_weights(cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_safetensors(tmp_path)
    # a tensor missing
    w_missing = {k: v for k, v in w.items() if k != "model.layers.1.mlp.up_proj.weight"}
    write_ckpt(tmp_path / "a", cfg, w_missing)
    with pytest.raises(ValueError, match="missing"):
        load_safetensors(tmp_path / "a")
    # an unexpected tensor
    write_ckpt(
        tmp_path / "b",
        cfg,
        dict(w, **{"model.layers.0.self_attn.rel_bias": np.zeros(3, np.float32)}),
    )
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_safetensors(tmp_path / "b")
    # a wrong shape
    write_ckpt(tmp_path / "c", cfg, dict(w, **{"model.norm.weight": np.ones(7, np.float32)}))
    with pytest.raises(ValueError, match="shapes"):
        load_safetensors(tmp_path / "c")
    # a truncated file
    write_ckpt(tmp_path / "d", cfg, w)
    f = tmp_path / "d" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_safetensors(tmp_path / "d")
    # a shard listed in the index but absent
    write_ckpt(tmp_path / "e", cfg, w, shards=2)
    (tmp_path / "e" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        load_safetensors(tmp_path / "e")
    # NaN weights
    write_ckpt(
        tmp_path / "f", cfg, dict(w, **{"model.norm.weight": np.full(32, np.nan, np.float32)})
    )
    with pytest.raises(ValueError, match="non-finite"):
        load_safetensors(tmp_path / "f")
