"""Load a Hugging Face checkpoint (LLaMA / Mistral / Qwen2 layout) into our config and params.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Tensor names map as::

    model.embed_tokens.weight                         -> embed
    model.norm.weight                                 -> final_norm
    lm_head.weight                                    -> lm_head (untied models only)
    model.layers.{i}.input_layernorm.weight           -> blocks[i].attn_norm
    model.layers.{i}.post_attention_layernorm.weight  -> blocks[i].mlp_norm
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  -> blocks[i].attn.{q,k,v,o}_proj
    model.layers.{i}.self_attn.{q,k,v}_proj.bias      -> blocks[i].attn.{q,k,v}_proj_bias (Qwen2)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   -> blocks[i].mlp.{gate,up,down}_proj

HF stores Q/K rows in the half-split RoPE order our model uses, so no permutation is needed.
Tensors of any float dtype (bf16 through ``ml_dtypes``) are read with ``safetensors``' numpy
backend and converted to float32 (then to ``dtype``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from harness.model import ModelConfig, cast_params, param_shapes

SUPPORTED = ("llama", "mistral", "qwen2")


def hf_config(cfg: dict[str, Any], *, dtype: str = "float32") -> ModelConfig:
    """Our :class:`ModelConfig` from a Hugging Face ``config.json`` dict."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"model_type {mt!r} is not supported; expected one of {SUPPORTED}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (LLaMA-family MLPs use silu)")
    if cfg.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    d, L, H = (
        int(cfg["hidden_size"]),
        int(cfg["num_hidden_layers"]),
        int(cfg["num_attention_heads"]),
    )
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "none")) if rs else "none"
    kind = "none" if kind == "default" else kind
    if kind not in ("none", "linear", "llama3"):
        raise ValueError(f"rope_scaling {kind!r} is not supported (none, linear, llama3)")
    window = cfg.get("sliding_window")
    if mt == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if "layer_types" in cfg and cfg["layer_types"]:
        types = tuple("local" if t == "sliding_attention" else "global" for t in cfg["layer_types"])
    elif window and mt == "qwen2":
        first_full = int(cfg.get("max_window_layers", L))
        types = tuple("local" if i >= first_full else "global" for i in range(L))
    elif window:
        types = ("local",) * L  # Mistral: every layer uses the window
    else:
        types = ()
    if "local" not in types:
        types, window = (), None
    return ModelConfig(
        family="llama",
        vocab_size=int(cfg["vocab_size"]),
        d_model=d,
        n_layers=L,
        n_heads=H,
        n_kv_heads=int(cfg.get("num_key_value_heads") or H),
        head_dim=int(cfg.get("head_dim") or d // H),
        d_ff=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=kind,
        rope_factor=float(rs.get("factor", 1.0)),
        rope_low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        rope_original_max_len=int(rs.get("original_max_position_embeddings", 8192)),
        sliding_window=int(window) if window else None,
        layer_types=types,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attn_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        dtype=dtype,
    )


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "attn.q_proj",
    "self_attn.k_proj.weight": "attn.k_proj",
    "self_attn.v_proj.weight": "attn.v_proj",
    "self_attn.o_proj.weight": "attn.o_proj",
    "self_attn.q_proj.bias": "attn.q_proj_bias",
    "self_attn.k_proj.bias": "attn.k_proj_bias",
    "self_attn.v_proj.bias": "attn.v_proj_bias",
    "mlp.gate_proj.weight": "mlp.gate_proj",
    "mlp.up_proj.weight": "mlp.up_proj",
    "mlp.down_proj.weight": "mlp.down_proj",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}


def _shard_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({ckpt / f for f in weight_map.values()})
    elif (ckpt / "model.safetensors").is_file():
        files = [ckpt / "model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{ckpt}: neither model.safetensors nor model.safetensors.index.json"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{ckpt}: shard files missing: {missing}")
    return files


def load_safetensors(path: str | Path, *, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """``(cfg, params)`` from a Hugging Face checkpoint directory (LLaMA / Mistral / Qwen2)."""
    from safetensors import SafetensorError, safe_open

    ckpt = Path(path)
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{ckpt}: no config.json")
    cfg = hf_config(json.loads(cfg_file.read_text()), dtype=dtype)
    top: dict[str, Any] = {}
    blocks: list[dict] = [{"attn": {}, "mlp": {}} for _ in range(cfg.n_layers)]
    for f in _shard_files(ckpt):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    a = np.asarray(st.get_tensor(key)).astype(np.float32)
                    _place(key, a, top, blocks, cfg)
        except SafetensorError as e:
            raise ValueError(f"{f}: corrupt or truncated safetensors file: {e}") from e
    if cfg.tie_embeddings:
        top.pop("lm_head", None)  # some tied checkpoints store a copy
    params = {**top, "blocks": blocks}
    _check(params, cfg, ckpt)
    return cfg, cast_params(params, cfg.compute_dtype)


def _place(key: str, a: np.ndarray, top: dict, blocks: list[dict], cfg: ModelConfig) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"tensor {key} has non-finite values")
    if key in _TOP_MAP:
        top[_TOP_MAP[key]] = a
        return
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2).endswith("rotary_emb.inv_freq"):
        return  # old checkpoints store RoPE buffers; we recompute them
    if not m or m.group(2) not in _LAYER_MAP or int(m.group(1)) >= cfg.n_layers:
        raise ValueError(f"unexpected tensor {key!r} in a {cfg.family}-layout checkpoint")
    node = blocks[int(m.group(1))]
    *parents, leaf = _LAYER_MAP[m.group(2)].split(".")
    for p in parents:
        node = node[p]
    node[leaf] = a


def _check(params: dict, cfg: ModelConfig, ckpt: Path) -> None:
    import jax

    got = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    want = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
    }
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{ckpt}: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if bad:
        raise ValueError(f"{ckpt}: tensor shapes disagree with config.json: {bad[:5]}")
