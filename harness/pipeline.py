"""Glue for scripts and notebooks: load a named model with its tokenizer, evaluate it, write rows.

model, params, tok = load("smollm2")
res, row = eval_perplexity(model, params, tok, model_name="smollm2", corpus="wikitext2",
                           seqlen=512, limit=8)
"""

from __future__ import annotations

from typing import Any

from jax.tree_util import Partial

from harness import gguf_loader
from harness.evaluate import (
    EvalConfig,
    PerplexityConfig,
    PerplexityResult,
    ZeroShotResult,
    corpus_perplexity,
    zero_shot,
)
from harness.layers import NO_HOOKS, Hooks
from harness.model import Model
from harness.results import ResultRow, perplexity_row, zero_shot_rows
from harness.tokenizer import Tokenizer

MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct (Q4_1 GGUF)", gguf_loader.load_smollm2),
    "gemma3": ("Gemma-3-270M (Q4_K_M GGUF)", gguf_loader.load_gemma3_270m),
}


def load(name: str = "smollm2", *, dtype: str = "float32", hooks: Hooks = NO_HOOKS):
    """``(Model, params, Tokenizer)`` of a named model (weights dequantized from its GGUF)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    cfg, params = MODELS[name][1](dtype=dtype)
    return Model(cfg, hooks), params, Tokenizer.from_model(name)


def logits_fn(model: Model, params: Any) -> Partial:
    """The evaluation callable with the weights as arguments (not baked-in constants)."""
    return Partial(model.forward, params)


def eval_perplexity(
    model: Model,
    params: Any,
    tok: Tokenizer,
    *,
    model_name: str,
    corpus: str = "wikitext2",
    seqlen: int = 2048,
    limit: int | None = None,
    protocol: str = "gptq",
    method: str = "fp",
    bits: str = "W16A16",
    data_dir: Any = None,
    eval_cfg: EvalConfig | None = None,
) -> tuple[PerplexityResult, ResultRow]:
    cfg = PerplexityConfig(protocol=protocol, seqlen=seqlen, limit=limit)
    res = corpus_perplexity(
        logits_fn(model, params),
        tok,
        corpus,
        cfg,
        data_dir=data_dir,
        eval_cfg=eval_cfg or EvalConfig(),
    )
    label = MODELS[model_name][0] if model_name in MODELS else model_name
    return res, perplexity_row(res, model=label, method=method, bits=bits, dataset=corpus)


def eval_zero_shot(
    model: Model,
    params: Any,
    tok: Tokenizer,
    task: str,
    *,
    model_name: str,
    limit: int | None = None,
    method: str = "fp",
    bits: str = "W16A16",
    data_dir: Any = None,
    eval_cfg: EvalConfig | None = None,
) -> tuple[ZeroShotResult, list[ResultRow]]:
    res = zero_shot(
        logits_fn(model, params),
        tok,
        task,
        limit=limit,
        data_dir=data_dir,
        cfg=eval_cfg or EvalConfig(),
    )
    label = MODELS[model_name][0] if model_name in MODELS else model_name
    return res, zero_shot_rows(res, model=label, method=method, bits=bits)
