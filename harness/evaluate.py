"""Perplexity and zero-shot accuracy of any ``logits_fn(tokens[B, T]) -> logits[B, T, V]``.

The model enters only through ``logits_fn``, a causal LM's next-token logits (position t
predicts token t+1). Pass ``jax.tree_util.Partial(apply, params)`` so the weights are arguments
of the jitted scorer rather than constants baked into it; a plain function works too.

Scoring engine (``score_rows``): every row (inputs, targets, mask) is right-padded to a bucketed
length (the next power of two, at least ``min_bucket``; perplexity windows use exactly
``seqlen``), rows of one length are batched to ``batch_tokens`` (a multiple of the device
count), and one jitted function per shape returns each row's summed target log-probability over
the mask and whether every masked target is the argmax. The batch axis is sharded over all JAX
devices (``jax.sharding.NamedSharding``, data parallel); the weights are replicated.

Perplexity protocols (``perplexity``), both exp(mean NLL over all scored tokens):

* ``"gptq"`` (default; Frantar et al., arXiv:2210.17323, ``llama_eval`` in IST-DASLab/gptq): the
  text is tokenized once (BOS as the tokenizer adds it), cut into ``len // seqlen``
  non-overlapping windows — the last partial window is dropped, as GPTQ does — and every token of
  a window but its first is predicted (seqlen − 1 per window). When the tokenizer adds BOS
  (Gemma), each window's first token is replaced by BOS, as llama.cpp does: GPTQ's LLaMA
  tokenizer puts BOS only at the start of the stream, but Gemma without BOS is not the model it
  was trained as (SmolLM2 WikiText-2 is unaffected; Gemma-3 at 512, first 16 windows: 70.99
  without, 27.86 with — the windows after the first lose 1–1.5 nats per token).
* ``"llama.cpp"`` (``tools/perplexity/perplexity.cpp``): windows of ``n_ctx = seqlen`` tokens, the
  first token of each window replaced by BOS when the tokenizer adds BOS (``add_bos``), and only
  the second half scored: logits at positions n_ctx/2 … n_ctx−2, i.e. n_ctx − 1 − n_ctx/2 tokens
  per window. Like the tool, it needs at least 2·n_ctx tokens.

Zero-shot (``zero_shot``): lm-eval-harness's log-likelihood protocol for the tasks of
``harness.tasks``: ``_encode_pair`` (trailing context spaces move to the continuation; the
continuation's tokens are those of ``encode(context + continuation)`` after
``len(encode(context))``; BOS as the tokenizer adds it, as lm-eval's HF backend does for Gemma),
inputs left-truncated to ``max_length`` (``(ctx + cont)[-(max_length+1):][:-1]``), acc / acc_norm
as in ``harness.tasks``, standard errors as lm-eval's ``mean_stderr`` (sample std / √n).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial
from jaxtyping import Array, Bool, Float, Int
from tqdm import tqdm

from harness import data as data_lib
from harness.tasks import TASKS, Request

__all__ = [
    "EvalConfig",
    "PerplexityConfig",
    "PerplexityResult",
    "ZeroShotResult",
    "perplexity_windows",
    "score_rows",
    "perplexity",
    "corpus_perplexity",
    "encode_requests",
    "loglikelihoods",
    "zero_shot",
]

LogitsFn = Callable[[Int[Array, "B T"]], Float[Array, "B T V"]]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    batch_tokens: int = 4096  # padded tokens per jitted call (at least one row per device);
    # the logits alone take batch_tokens × vocab × 4 bytes (Gemma-3: 4 GiB at 4096)
    max_length: int = 2048  # lm-eval context limit: longer requests are left-truncated
    min_bucket: int = 32  # shortest padded length of a request row
    progress: bool = True  # tqdm progress bars
    devices: tuple[Any, ...] | None = None  # devices to shard the batch over; None: all


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    protocol: str = "gptq"  # "gptq" or "llama.cpp" (see module docstring)
    seqlen: int = 2048  # window length (n_ctx for llama.cpp)
    limit: int | None = None  # evaluate only the first N windows


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int  # windows evaluated
    protocol: str
    seqlen: int
    seconds: float  # wall time of the scoring loop, compilation included


@dataclass(frozen=True, kw_only=True)
class ZeroShotResult:
    task: str
    n: int  # documents evaluated
    metrics: dict[str, float]  # acc, acc_norm, perplexity and their *_stderr, as lm-eval reports
    tokens: int  # input tokens fed to the model (unpadded)
    seconds: float
    per_doc: list[dict[str, Any]] = field(default_factory=list, repr=False)  # lls, pred, gold


# --- scoring engine -----------------------------------------------------------------------------


def _row_scores(
    fn: Partial, tokens: Int[Array, "B T"], targets: Int[Array, "B T"], mask: Bool[Array, "B T"]
) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    logits = fn(tokens).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, :, None], axis=-1)[:, :, 0]
    logp = target_logit - log_z
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


_score_batch = jax.jit(_row_scores)


def _mesh_and_fn(logits_fn: LogitsFn, cfg: EvalConfig) -> tuple[Mesh, Partial]:
    devices = list(cfg.devices) if cfg.devices is not None else jax.devices()
    mesh = Mesh(np.array(devices), ("batch",))
    fn = logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)
    replicated, on_mesh = NamedSharding(mesh, P()), set(devices)

    def put(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding.device_set == on_mesh:
            return x
        return jax.device_put(x, replicated) if isinstance(x, jax.Array | np.ndarray) else x

    return mesh, jax.tree.map(put, fn)


def _bucket(n: int, cfg: EvalConfig) -> int:
    b = max(cfg.min_bucket, 1 << max(n - 1, 0).bit_length())
    return max(n, min(b, cfg.max_length))


def score_rows(
    logits_fn: LogitsFn,
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cfg: EvalConfig = EvalConfig(),
    *,
    length: int | None = None,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Per row (inputs[n], targets[n], mask[n]): the summed log p(target) over the mask (float64)
    and whether every masked target is the argmax. ``length`` pads every row to exactly that
    length instead of bucketing."""
    if cfg.batch_tokens < 1 or cfg.min_bucket < 1 or cfg.max_length < 1:
        raise ValueError(f"EvalConfig sizes must be positive: {cfg}")
    mesh, fn = _mesh_and_fn(logits_fn, cfg)
    n_dev = mesh.devices.size
    shard = NamedSharding(mesh, P("batch"))
    sums, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
    groups: dict[int, list[int]] = {}
    for i, (x, y, m) in enumerate(rows):
        if not (x.ndim == 1 and x.shape == y.shape == m.shape):
            raise ValueError(f"row {i}: inputs, targets and mask must be 1-D of one length")
        if length is not None and len(x) > length:
            raise ValueError(f"row {i} has {len(x)} tokens, more than length={length}")
        groups.setdefault(length or _bucket(len(x), cfg), []).append(i)
    plan = []
    for L, idx in sorted(groups.items()):
        per_batch = max(n_dev, cfg.batch_tokens // L // n_dev * n_dev)
        # few rows: a smaller batch, n_dev·2^k rows, so short runs neither pad to the full budget
        # nor compile one shape per row count
        per_batch = min(per_batch, n_dev << max(-(-len(idx) // n_dev) - 1, 0).bit_length())
        plan += [(L, per_batch, idx[k : k + per_batch]) for k in range(0, len(idx), per_batch)]
    vocab: dict[int, int] = {}  # bucket length -> V, from an abstract evaluation of logits_fn
    for L, per_batch, idx in tqdm(plan, desc=desc, disable=not cfg.progress, leave=False):
        x = np.zeros((per_batch, L), np.int32)
        y = np.zeros((per_batch, L), np.int32)
        m = np.zeros((per_batch, L), bool)
        for r, i in enumerate(idx):
            n = len(rows[i][0])
            x[r, :n], y[r, :n], m[r, :n] = rows[i]
        if L not in vocab:  # shape check before compiling, with a clear message
            out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, jnp.int32))
            if out.ndim != 3 or out.shape[:2] != x.shape:
                raise ValueError(
                    f"logits_fn returned shape {out.shape} for tokens {x.shape}; expected [B, T, V]"
                )
            vocab[L] = out.shape[2]
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        if lo < 0 or hi >= vocab[L]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab[L]})")
        s, g = _score_batch(fn, *(jax.device_put(a, shard) for a in (x, y, m)))
        sums[idx], greedy[idx] = np.asarray(s)[: len(idx)], np.asarray(g)[: len(idx)]
    if not np.all(np.isfinite(sums)):
        bad = int(np.flatnonzero(~np.isfinite(sums))[0])
        raise ValueError(f"non-finite log-likelihood for row {bad}: logits_fn produced NaN/Inf")
    return sums, greedy


# --- perplexity ---------------------------------------------------------------------------------


def perplexity_windows(
    tokens: Int[np.ndarray, " N"], *, seqlen: int, protocol: str = "gptq", bos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Windows [W, seqlen] and the mask [W, seqlen] of scored positions (position t predicts
    token t+1) of a protocol; ``bos_id`` (pass it when the tokenizer adds BOS) replaces each
    window's first token."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    n_windows = len(tokens) // seqlen
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen).astype(np.int32)
    mask = np.zeros((n_windows, seqlen), bool)
    if bos_id is not None:
        windows[:, 0] = bos_id
    if protocol == "gptq":
        if n_windows == 0:
            raise ValueError(f"{len(tokens)} tokens make no window of seqlen={seqlen}")
        mask[:, : seqlen - 1] = True
    elif protocol == "llama.cpp":
        if len(tokens) < 2 * seqlen:
            raise ValueError(
                f"llama.cpp's protocol needs at least 2*n_ctx = {2 * seqlen} tokens, "
                f"got {len(tokens)}"
            )
        mask[:, seqlen // 2 : seqlen - 1] = True
    else:
        raise ValueError(f"unknown perplexity protocol {protocol!r} (gptq, llama.cpp)")
    return windows, mask


def perplexity(
    logits_fn: LogitsFn,
    tokens: Int[np.ndarray, " N"],
    cfg: PerplexityConfig = PerplexityConfig(),
    *,
    bos_id: int | None = None,
    eval_cfg: EvalConfig = EvalConfig(),
) -> PerplexityResult:
    """Perplexity of a token stream under ``cfg.protocol``; ``bos_id`` is the BOS written at each
    window start (pass it when the tokenizer adds BOS)."""
    windows, mask = perplexity_windows(
        tokens, seqlen=cfg.seqlen, protocol=cfg.protocol, bos_id=bos_id
    )
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ValueError(f"limit must be positive, got {cfg.limit}")
        windows, mask = windows[: cfg.limit], mask[: cfg.limit]
    targets = np.concatenate([windows[:, 1:], np.zeros((len(windows), 1), np.int32)], axis=1)
    rows = [(windows[i], targets[i], mask[i]) for i in range(len(windows))]
    t0 = time.perf_counter()
    sums, _ = score_rows(
        logits_fn,
        rows,
        eval_cfg,
        length=cfg.seqlen,
        desc=f"perplexity ({cfg.protocol}, {cfg.seqlen})",
    )
    n = int(mask.sum())
    nll = float(-sums.sum() / n)
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=n,
        windows=len(windows),
        protocol=cfg.protocol,
        seqlen=cfg.seqlen,
        seconds=time.perf_counter() - t0,
    )


def corpus_perplexity(
    logits_fn: LogitsFn,
    tokenizer: Any,
    corpus: str = "wikitext2",
    cfg: PerplexityConfig = PerplexityConfig(),
    *,
    data_dir: Any = None,
    eval_cfg: EvalConfig = EvalConfig(),
) -> PerplexityResult:
    """Perplexity on a corpus of ``harness.data`` ("wikitext2", "ptb", "ptb_valid", "c4"),
    tokenized once with the tokenizer's own BOS rule. C4 keeps GPTQ's 256 windows unless
    ``cfg.limit`` is set."""
    text = data_lib.perplexity_text(corpus, data_dir)
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    max_windows = data_lib.PERPLEXITY_CORPORA[corpus][1]
    if cfg.limit is None and max_windows is not None:
        cfg = PerplexityConfig(protocol=cfg.protocol, seqlen=cfg.seqlen, limit=max_windows)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return perplexity(logits_fn, tokens, cfg, bos_id=bos, eval_cfg=eval_cfg)


# --- log-likelihood requests (lm-eval) ----------------------------------------------------------


def encode_requests(
    tokenizer: Any, requests: Sequence[Request], max_length: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows (inputs, targets, mask) of lm-eval ``loglikelihood`` requests (``_encode_pair``)."""
    ctxs, conts = [], []
    for r in requests:
        ctx, cont = r.context, r.continuation
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces:
            ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
        ctxs.append(ctx)
        conts.append(cont)
    whole = tokenizer.encode_batch([c + k for c, k in zip(ctxs, conts, strict=True)])
    ctx_enc = tokenizer.encode_batch(ctxs)
    rows = []
    for c, k, w, ce in zip(ctxs, conts, whole, ctx_enc, strict=True):
        if c == "":  # lm-eval: the prefix token (BOS) as the whole context
            ce, ke = [tokenizer.bos_id], tokenizer.encode(k, add_bos=False)
        else:
            ke = w[len(ce) :]
        if len(ke) > max_length:
            raise ValueError(f"continuation of {len(ke)} tokens exceeds max_length={max_length}")
        full = np.asarray((ce + ke)[-(max_length + 1) :], np.int32)
        mask = np.zeros(len(full) - 1, bool)
        mask[len(mask) - len(ke) :] = True
        rows.append((full[:-1], full[1:], mask))
    return rows


def loglikelihoods(
    logits_fn: LogitsFn,
    tokenizer: Any,
    requests: Sequence[Request],
    cfg: EvalConfig = EvalConfig(),
    *,
    desc: str = "loglikelihood",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed log-likelihood and greedy flag of each request's continuation, and the number of
    input tokens fed to the model."""
    rows = encode_requests(tokenizer, requests, cfg.max_length)
    sums, greedy = score_rows(logits_fn, rows, cfg, desc=desc)
    return sums, greedy, sum(len(r[0]) for r in rows)


def _mean_stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def zero_shot(
    logits_fn: LogitsFn,
    tokenizer: Any,
    task: str,
    *,
    limit: int | None = None,
    data_dir: Any = None,
    docs: Sequence[dict[str, Any]] | None = None,
    cfg: EvalConfig = EvalConfig(),
) -> ZeroShotResult:
    """lm-eval zero-shot metrics of ``task`` on its first ``limit`` documents (all if None);
    ``docs`` overrides the documents ``harness.data.load_task_docs`` would load."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    spec = TASKS[task]
    docs = list(docs) if docs is not None else data_lib.load_task_docs(task, data_dir)
    items = [spec.to_item(d) for d in docs[:limit]]
    if not items:
        raise ValueError(f"{task}: no documents to evaluate")
    requests = [r for it in items for r in it.requests]
    t0 = time.perf_counter()
    sums, greedy, n_tokens = loglikelihoods(logits_fn, tokenizer, requests, cfg, desc=task)
    seconds = time.perf_counter() - t0
    per_doc, k = [], 0
    for it in items:
        n = len(it.requests)
        lls, gr = sums[k : k + n], greedy[k : k + n]
        k += n
        lengths = np.array([float(len(c)) for c in it.choices])
        per_doc.append(
            {
                "lls": lls.tolist(),
                "greedy": gr.tolist(),
                "gold": it.gold,
                "pred": int(np.argmax(lls)),
                "pred_norm": int(np.argmax(lls / lengths)),
            }
        )
    metrics: dict[str, float] = {}
    if spec.kind == "loglikelihood":
        ll = np.array([d["lls"][0] for d in per_doc])
        acc = np.array([float(d["greedy"][0]) for d in per_doc])
        metrics["acc"], metrics["acc_stderr"] = float(acc.mean()), _mean_stderr(acc)
        metrics["perplexity"] = math.exp(-float(ll.mean()))
    else:
        for name, key in (("acc", "pred"), ("acc_norm", "pred_norm")):
            if name in spec.metrics:
                hits = np.array([float(d[key] == d["gold"]) for d in per_doc])
                metrics[name], metrics[f"{name}_stderr"] = float(hits.mean()), _mean_stderr(hits)
    return ZeroShotResult(
        task=task, n=len(items), metrics=metrics, tokens=n_tokens, seconds=seconds, per_doc=per_doc
    )
