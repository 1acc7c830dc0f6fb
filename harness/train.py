"""Training tiny LLaMA-style decoders from scratch, for scaling-law experiments on one CPU.

Used by the QiD reproduction (Ouyang et al., "Low-bit quantization favors undertrained LLMs",
arXiv 2411.17691): the paper measures the loss increase caused by low-bit post-training
quantization on checkpoints of one training run at increasing token budgets D (Pythia). Here
the same design at toy scale: one run per size, parameters kept at several steps.

Contents
--------
* ``CorpusConfig`` / ``build_corpus`` — offline text: the local C4 sample (``harness.data``) and
  the Python standard library's own source (files under ``sysconfig.get_paths()["stdlib"]``,
  sorted, tests and site-packages left out), tokenized with SmolLM2's tokenizer
  (``Tokenizer.from_model("smollm2")``), documents joined by its EOS id. Every
  ``val_every``-th document of each source is held out for validation. **Vocabulary remap**:
  SmolLM2's 49,152 ids would make the embedding most of a tiny model, so new id 0 is ``<unk>``
  and ids 1…V−1 are the V−1 most frequent ids of the *training* split (ties by id); the
  rest map to ``<unk>`` (``Corpus.unk_rate`` says how many).
* ``TrainConfig`` — model size + AdamW / cosine schedule + checkpoint steps; ``model_config``
  gives the ``harness.model.ModelConfig`` (LLaMA family: SwiGLU, RoPE, RMSNorm, tied
  embeddings), ``non_embedding_params`` its N.
* ``batch_at(ids, step, cfg)`` — the batch of a step as a pure function of (corpus, seed, step):
  non-overlapping windows of ``seq_len + 1`` tokens, visited in a fresh permutation each epoch.
  Resuming needs no data-loader state.
* ``train(cfg, corpus, ckpt_dir)`` — jitted AdamW steps (optax), tqdm progress, orbax
  ``CheckpointManager``s: ``<dir>/state`` (params + optimizer state, the last one kept, every
  ``save_every`` steps) to resume after an interruption, and ``<dir>/budgets`` (params at every
  step of ``budgets``, all kept). Metadata (config, step, tokens, loss history) is JSON. No pickle.
* ``load_budget``, ``budget_steps`` — read the kept checkpoints back.
* ``eval_loss`` (mean next-token NLL over fixed windows), ``val_windows`` (evenly spaced
  windows of the validation split), ``quantize_block_linears`` (fake-quantize every block
  linear with a ``numerics`` config, e.g. ``numerics.config.rtn``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from harness.model import Model, ModelConfig, get_param, init_params, linear_names, set_param
from numerics.config import QuantConfig
from numerics.quantize import fake_quant

__all__ = [
    "CorpusConfig", "Corpus", "build_corpus", "stdlib_files", "TrainConfig", "TrainResult",
    "budget_schedule", "model_config", "non_embedding_params", "batch_at", "optimizer", "train",
    "budget_steps", "load_budget", "val_windows", "eval_loss", "quantize_block_linears",
    "measure_qid",
]  # fmt: skip

_SOURCES = ("c4", "stdlib")


# ------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Which text, how it is split, and how large the remapped vocabulary is."""

    sources: tuple[str, ...] = _SOURCES  # "c4" (local 1,000-doc sample) and/or "stdlib" (code)
    vocab_size: int = 4096  # <unk> + the vocab_size − 1 most frequent training ids
    val_every: int = 20  # every val_every-th document of each source is validation
    data_dir: str | None = None  # C4 location; None: harness.data's default resolution

    def __post_init__(self):
        if not self.sources or set(self.sources) - set(_SOURCES):
            raise ValueError(
                f"sources must be a non-empty subset of {_SOURCES}, got {self.sources}"
            )
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"duplicate sources {self.sources}")
        if not isinstance(self.vocab_size, int) or not 2 <= self.vocab_size <= 49152:
            raise ValueError(f"vocab_size must be an int in [2, 49152], got {self.vocab_size!r}")
        if not isinstance(self.val_every, int) or self.val_every < 2:
            raise ValueError(f"val_every must be an int >= 2, got {self.val_every!r}")


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """Remapped token streams (int32, documents joined by the remapped EOS id)."""

    train: np.ndarray  # [n_train] ids in [0, vocab_size)
    val: np.ndarray  # [n_val] ids in [0, vocab_size)
    keep: np.ndarray  # [vocab_size − 1] SmolLM2 ids of new ids 1…V−1 (0 is <unk>)
    unk_rate: dict[str, float]  # fraction of <unk> per split
    fingerprint: str  # hash of the config and the source files (cache key)


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without test packages and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def _documents(cfg: CorpusConfig) -> dict[str, list[str]]:
    from harness.data import c4_documents

    docs = {}
    if "c4" in cfg.sources:
        docs["c4"] = c4_documents(cfg.data_dir)
    if "stdlib" in cfg.sources:
        docs["stdlib"] = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    return docs


def build_corpus(cfg: CorpusConfig, cache_dir: str | Path | None = None) -> Corpus:
    """Tokenize, split and remap (see the module docstring); cached as ``.npy`` files under
    ``cache_dir`` keyed by a hash of the config and the texts."""
    from harness.tokenizer import Tokenizer

    docs = _documents(cfg)
    h = hashlib.sha256(repr((dataclasses.astuple(cfg), sys.version_info[:3])).encode())
    for name in cfg.sources:
        for d in docs[name]:
            h.update(d.encode("utf-8", "replace"))
    fp = h.hexdigest()[:16]
    cache = Path(cache_dir) / f"corpus-{fp}" if cache_dir is not None else None
    if cache is not None and (cache / "meta.json").exists():
        meta = json.loads((cache / "meta.json").read_text())
        arrays = {
            k: np.load(cache / f"{k}.npy", allow_pickle=False) for k in ("train", "val", "keep")
        }
        return Corpus(**arrays, unk_rate=meta["unk_rate"], fingerprint=fp)

    tok = Tokenizer.from_model("smollm2")
    eos = tok.eos_id
    split: dict[str, list[int]] = {"train": [], "val": []}
    for name in cfg.sources:
        for i, ids in enumerate(tok.encode_batch(docs[name], add_bos=False)):
            part = split["val" if i % cfg.val_every == 0 else "train"]
            part.extend(ids)
            part.append(eos)
    raw = {k: np.asarray(v, dtype=np.int64) for k, v in split.items()}
    if raw["train"].size < 2 or raw["val"].size < 2:
        raise ValueError("corpus too small: a split has fewer than 2 tokens")
    counts = np.bincount(raw["train"], minlength=49152)
    order = np.lexsort((np.arange(counts.size), -counts))  # most frequent first, ties by id
    keep = order[: cfg.vocab_size - 1]
    table = np.zeros(max(counts.size, int(raw["val"].max()) + 1), dtype=np.int32)
    table[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    out = {k: table[v] for k, v in raw.items()}
    unk = {k: float(np.mean(v == 0)) for k, v in out.items()}
    corpus = Corpus(
        train=out["train"], val=out["val"], keep=keep.astype(np.int32), unk_rate=unk, fingerprint=fp
    )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for k in ("train", "val", "keep"):
            np.save(cache / f"{k}.npy", getattr(corpus, k), allow_pickle=False)
        (cache / "meta.json").write_text(json.dumps({"unk_rate": unk, "config": repr(cfg)}))
    return corpus


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A tiny LLaMA-style decoder and its AdamW + cosine training run."""

    d_model: int = 128  # residual width
    n_layers: int = 2  # decoder blocks
    n_heads: int = 4  # attention heads (no GQA: n_kv_heads = n_heads)
    d_ff: int = 352  # SwiGLU hidden width
    vocab_size: int = 4096  # must equal the corpus' remapped vocabulary
    seq_len: int = 128  # tokens per training window (the model sees seq_len, predicts seq_len)
    batch_size: int = 32  # windows per step; tokens per step = batch_size · seq_len
    steps: int = 1000  # optimizer steps; the cosine schedule spans all of them
    warmup_steps: int = 50  # linear warm-up from 0 to peak_lr
    peak_lr: float = 3e-3  # AdamW peak learning rate
    final_lr_frac: float = 0.1  # cosine decays to final_lr_frac · peak_lr (Pythia: 10%)
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms)
    b1: float = 0.9  # Adam β1
    b2: float = 0.95  # Adam β2
    grad_clip: float = 1.0  # global-norm gradient clipping
    seed: int = 0  # init and data order
    save_every: int = 100  # resume checkpoint interval (steps)
    budgets: tuple[int, ...] = ()  # steps whose params are kept (D = step · batch · seq_len)

    def __post_init__(self):
        for f in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "seq_len",
                  "batch_size", "steps", "save_every"):  # fmt: skip
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TrainConfig.{f} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} even-width heads"
            )
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps!r}")
        for f in ("peak_lr", "final_lr_frac", "weight_decay", "b1", "b2", "grad_clip"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{f} must be a finite number >= 0, got {v!r}")
        if not self.peak_lr > 0 or not self.final_lr_frac <= 1 or not (self.b1 < 1 and self.b2 < 1):
            raise ValueError("need peak_lr > 0, final_lr_frac <= 1, b1 < 1 and b2 < 1")
        bad = [b for b in self.budgets if not isinstance(b, int) or not 0 < b <= self.steps]
        if bad or list(self.budgets) != sorted(set(self.budgets)):
            raise ValueError(
                f"budgets must be increasing ints in (0, steps={self.steps}], got {self.budgets}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def budget_schedule(steps: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """Checkpoint steps ``round(f · steps)`` (at least 1, duplicates merged) for ``f`` in (0, 1]."""
    fr = [float(f) for f in fractions]
    if not fr or any(not (0.0 < f <= 1.0) for f in fr):
        raise ValueError(f"budget fractions must be non-empty and in (0, 1], got {fractions}")
    return tuple(sorted({max(1, round(f * steps)) for f in fr}))


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The LLaMA-family ``ModelConfig`` of a training config (tied embeddings, no GQA)."""
    return ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        d_ff=cfg.d_ff,
        max_seq_len=cfg.seq_len,
    )


def non_embedding_params(cfg: TrainConfig) -> int:
    """N of the scaling laws: every parameter but the (tied) embedding — blocks + final norm."""
    c = model_config(cfg)
    per_block = 4 * c.d_model * c.n_heads * c.head_dim + 3 * c.d_model * c.d_ff + 2 * c.d_model
    return c.n_layers * per_block + c.d_model


# ------------------------------------------------------------------------------------ batches


def batch_at(ids: Int[np.ndarray, " n"], step: int, cfg: TrainConfig) -> np.ndarray:
    """``[batch_size, seq_len + 1]`` int32 windows of step ``step`` (0-based): window ``j`` of
    the run (``j = step·B + b``) is window ``perm_e[j mod W]`` of the ``W`` non-overlapping
    windows, with ``perm_e`` a permutation drawn from ``(seed, epoch e = j // W)``."""
    L = cfg.seq_len + 1
    W = ids.size // L
    if W < 1:
        raise ValueError(f"training split ({ids.size} tokens) shorter than one window of {L}")
    j = step * cfg.batch_size + np.arange(cfg.batch_size)
    epochs = j // W
    starts = np.empty(cfg.batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([cfg.seed, int(e)]).permutation(W)
        m = epochs == e
        starts[m] = perm[j[m] % W] * L
    return np.stack([ids[s : s + L] for s in starts]).astype(np.int32)


# ----------------------------------------------------------------------------------- training


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with linear warm-up and cosine decay to
    ``final_lr_frac · peak_lr``; weight decay on matrices only."""
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.final_lr_frac * cfg.peak_lr,
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim == 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def _nll(model: Model, params: Any, batch: Int[Array, "b t1"]) -> Float[Array, ""]:
    logits = model.forward(params, batch[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


@functools.lru_cache(maxsize=8)
def _train_step(cfg: TrainConfig):
    """The jitted step (cached: checkpoint fields are normalised away by the caller)."""
    model, opt = Model(model_config(cfg)), optimizer(cfg)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: _nll(model, p, batch))(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    params: Any  # params after the last step run
    step: int  # steps done (== cfg.steps unless stopped early)
    history: list[tuple[int, float]]  # (step, training loss of that step's batch), every step
    resumed_from: int  # step of the state checkpoint the run continued from (0: fresh)
    seconds: float | None  # wall time of the steps behind these params, summed over calls
    # (None when the resumed checkpoint predates this field)


def _managers(ckpt_dir: Path) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    opts = lambda keep: ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True
    )
    items = ("state", "meta")
    return (
        ocp.CheckpointManager(ckpt_dir / "state", options=opts(1), item_names=items),
        ocp.CheckpointManager(ckpt_dir / "budgets", options=opts(None), item_names=items),
    )


def _meta(cfg: TrainConfig, step: int, history: list, seconds: float | None) -> dict:
    return {
        "train_seconds": seconds,
        "config": dataclasses.asdict(cfg),
        "step": step,
        "tokens": step * cfg.tokens_per_step,
        "non_embedding_params": non_embedding_params(cfg),
        "history": [[s, v] for s, v in history],
    }


def _check_meta(cfg: TrainConfig, meta: dict, where: Path) -> None:
    saved = dict(meta["config"])
    saved["budgets"] = tuple(saved["budgets"])
    if saved != dataclasses.asdict(cfg):
        raise ValueError(f"checkpoint in {where} was written by a different TrainConfig: {saved}")


def _save(mngr: ocp.CheckpointManager, step: int, tree: Any, meta: dict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
    )


def train(
    cfg: TrainConfig,
    corpus: Corpus,
    ckpt_dir: str | Path,
    *,
    stop_after: int | None = None,
    log_every: int = 10,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) the run of ``cfg`` on ``corpus.train``, checkpointing under
    ``ckpt_dir``. A run whose last state is at ``cfg.steps`` returns at once.

    ``stop_after``: stop after that many steps in total *without* saving (simulates an
    interruption; the next call resumes from the last ``save_every`` state)."""
    if not np.issubdtype(corpus.train.dtype, np.integer):
        raise TypeError(f"corpus.train must hold integer token ids, got {corpus.train.dtype}")
    if log_every < 1 or (stop_after is not None and stop_after < 0):
        raise ValueError(f"need log_every >= 1 and stop_after >= 0, got {log_every}, {stop_after}")
    if int(corpus.train.max()) >= cfg.vocab_size:
        raise ValueError(
            f"corpus ids reach {int(corpus.train.max())} >= vocab_size {cfg.vocab_size}"
        )
    ckpt_dir = Path(ckpt_dir).resolve()
    states, budgets = _managers(ckpt_dir)
    opt = optimizer(cfg)
    params = init_params(model_config(cfg), seed=cfg.seed)
    opt_state = opt.init(params)
    start, history, seconds = 0, [], 0.0
    last = states.latest_step()
    if last is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, opt_state))
        got = states.restore(
            last,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        _check_meta(cfg, got["meta"], ckpt_dir)
        params, opt_state = got["state"]
        start, history = last, [tuple(h) for h in got["meta"]["history"]]
        seconds = got["meta"].get("train_seconds")
    step_fn = _train_step(dataclasses.replace(cfg, save_every=1, budgets=()))
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress,
               desc=f"d{cfg.d_model}L{cfg.n_layers}", mininterval=2.0)  # fmt: skip
    t0 = time.perf_counter()
    elapsed = lambda: None if seconds is None else seconds + time.perf_counter() - t0
    for s in bar:
        params, opt_state, loss = step_fn(
            params, opt_state, jnp.asarray(batch_at(corpus.train, s, cfg))
        )
        done = s + 1
        history.append((done, float(loss)))
        if done % log_every == 0:
            recent = [v for _, v in history[-log_every:]]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        if done == end and stop_after is not None and done < cfg.steps:
            break  # interrupted: nothing saved
        if done in cfg.budgets and done not in budgets.all_steps():  # (re-run after a crash)
            _save(budgets, done, params, _meta(cfg, done, history, elapsed()))
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save(states, done, (params, opt_state), _meta(cfg, done, history, elapsed()))
    bar.close()
    for m in (states, budgets):
        m.wait_until_finished()
        m.close()
    return TrainResult(
        params=params, step=max(start, end), history=history, resumed_from=start, seconds=elapsed()
    )


def budget_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps with kept params under ``ckpt_dir/budgets``."""
    d = Path(ckpt_dir).resolve() / "budgets"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def load_budget(cfg: TrainConfig, ckpt_dir: str | Path, step: int) -> tuple[Any, dict]:
    """``(params, meta)`` kept at ``step`` of the run of ``cfg``."""
    ckpt_dir = Path(ckpt_dir).resolve()
    if step not in budget_steps(ckpt_dir):
        raise FileNotFoundError(f"no budget checkpoint at step {step} in {ckpt_dir}/budgets")
    abstract = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, init_params(model_config(cfg), seed=cfg.seed)
    )
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=False)
    with ocp.CheckpointManager(
        ckpt_dir / "budgets", item_names=("state", "meta"), options=opts
    ) as m:
        got = m.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    _check_meta(cfg, got["meta"], ckpt_dir)
    return got["state"], got["meta"]


# --------------------------------------------------------------------------------- evaluation


def val_windows(ids: Int[np.ndarray, " n"], seq_len: int, n: int) -> np.ndarray:
    """``[n, seq_len + 1]`` int32: ``n`` windows evenly spaced over the whole split (so every
    source in it is represented), overlapping only if the split is shorter than ``n`` windows."""
    L = seq_len + 1
    if n < 1 or ids.size < L:
        raise ValueError(f"need n >= 1 and at least {L} tokens, got n={n}, {ids.size} tokens")
    starts = np.linspace(0, ids.size - L, n).round().astype(np.int64)
    return np.stack([ids[s : s + L] for s in starts]).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _summed_nll(cfg: TrainConfig):
    model = Model(model_config(cfg))
    return jax.jit(lambda p, b: _nll(model, p, b) * jnp.float32(b.shape[0] * (b.shape[1] - 1)))


def eval_loss(
    cfg: TrainConfig, params: Any, windows: Int[np.ndarray, "n t1"], *, batch_size: int = 32
) -> float:
    """Mean next-token NLL (nats) over every predicted token of ``windows``."""
    f = _summed_nll(cfg)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        b = jnp.asarray(windows[i : i + batch_size])
        total += float(f(params, b))
        count += b.shape[0] * (b.shape[1] - 1)
    return total / count


@functools.lru_cache(maxsize=16)
def _quantizer(cfg: TrainConfig, how: QuantConfig):
    names = linear_names(model_config(cfg))

    @jax.jit
    def q(params):
        for name in names:
            params = set_param(params, name, fake_quant(get_param(params, name), how))
        return params

    return q


def quantize_block_linears(params: Any, cfg: TrainConfig, how: QuantConfig) -> Any:
    """Params with every block linear (q/k/v/o/gate/up/down of every block) replaced by
    ``fake_quant(W, how)`` in float32; embedding, norms and the tied head stay float."""
    return _quantizer(cfg, how)(params)


def measure_qid(
    cfg: TrainConfig,
    ckpt_dir: str | Path,
    windows: Int[np.ndarray, "n t1"],
    quant: dict[int, QuantConfig],
    *,
    steps: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Quantization-induced degradation of every kept checkpoint (arXiv 2411.17691, Eq. 8's
    ΔqLoss): one row per (step, bits) with N, D, the float and quantized validation losses
    and ``dloss = loss_q − loss_float``. ``quant`` maps a bit-width P to the weight config
    applied to every block linear (``quantize_block_linears``)."""
    rows = []
    for step in budget_steps(ckpt_dir) if steps is None else steps:
        params, meta = load_budget(cfg, ckpt_dir, step)
        base = eval_loss(cfg, params, windows)
        for bits, how in sorted(quant.items()):
            lq = eval_loss(cfg, quantize_block_linears(params, cfg, how), windows)
            rows.append({
                "N": non_embedding_params(cfg), "D": meta["tokens"], "step": step, "P": bits,
                "loss_float": base, "loss_quant": lq, "dloss": lq - base,
            })  # fmt: skip
    return rows
