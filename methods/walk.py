"""The shared layer walk: quantize a model block by block with a per-layer core.

``quantize_sequential`` drives ``harness.capture.sequential``: calibration inputs go through one
block at a time; inside a block the linears are quantized in GPTQ's "true sequential" order
(q/k/v, then o, then gate/up, then down — each group's inputs re-captured after the previous
groups were quantized), and the *quantized* block's outputs feed the next block. Only the first
group's inputs are captured up front; once q/k/v are quantized the attention output is computed
once and reused for the later groups and the block output (``BlockCalibration.cache_attention``):
the same numbers as GPTQ's reference, which re-runs the whole block per group, with one attention
pass per block instead of five; likewise down_proj's input once gate/up are quantized
(``cache_down_input``), so gate/up run once more for it and not again for the block output.
Each linear is handed to ``layer_fn(W, LayerStats, cfg, key=...)`` (a method's pure core) and
its float weight leaf is replaced by the returned quantized leaf.

Resumable runs: with ``checkpoint_dir`` every finished block is saved (packed codes, orbax;
``methods.checkpoint``); a rerun with the same inputs loads the finished blocks, only runs them
forward (``harness.capture.sequential(done_blocks=...)``) and quantizes the rest.

A data-free core (``needs=()``, RTN) skips the calibration forward altogether: its blocks are
quantized in order without running the model.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness import capture
from harness.model import ModelConfig, get_param, set_param
from methods import checkpoint
from methods.base import LayerResult, LayerStats, QuantizedModel
from numerics.sparse import weight_bits

TRUE_SEQUENTIAL: tuple[tuple[str, ...], ...] = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def row_sample(n_rows: int, seed: int = 0) -> capture.Accumulator:
    """Keep a uniform random subset of at most ``n_rows`` input rows (reservoir by random keys:
    every row gets a seeded random priority; the ``n_rows`` highest are kept)."""

    def init(d: int):
        return {
            "X": jnp.zeros((n_rows, d), jnp.float32),
            "p": jnp.full((n_rows,), -jnp.inf, jnp.float32),
            "n": jnp.zeros((), jnp.int32),
        }

    def update(state, x):
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        key = jax.random.fold_in(jax.random.key(seed), state["n"])
        pri = jax.random.uniform(key, (rows.shape[0],), jnp.float32)
        allp = jnp.concatenate([state["p"], pri])
        allx = jnp.concatenate([state["X"], rows], axis=0)
        top = jax.lax.top_k(allp, n_rows)[1]
        return {"X": allx[top], "p": allp[top], "n": state["n"] + rows.shape[0]}

    return capture.Accumulator(init, update)


def accumulators_for(needs: tuple[str, ...], n_x_rows: int) -> dict[str, capture.Accumulator]:
    """The accumulators a method's ``needs`` call for. The same objects for the same arguments:
    ``harness.capture`` caches its jitted capture steps on their identity."""
    return dict(_accumulators(tuple(needs), n_x_rows))


@functools.lru_cache(maxsize=64)
def _accumulators(
    needs: tuple[str, ...], n_x_rows: int
) -> tuple[tuple[str, capture.Accumulator], ...]:
    accs: dict[str, capture.Accumulator] = {}
    if "H" in needs:
        accs["H"] = capture.hessian()
    if "X" in needs:
        accs["X"] = row_sample(n_x_rows)
    if "act_absmean" in needs:
        accs["absmean"] = capture.absmean()
    if "act_absmax" in needs:
        accs["absmax"] = capture.absmax()
    return tuple(accs.items())


def layer_stats(state: Mapping[str, Any], fisher: Any = None) -> LayerStats:
    """``LayerStats`` from one linear's accumulator states (keys as in ``accumulators_for``)."""
    X = None
    if "X" in state:
        n = min(int(state["X"]["n"]), state["X"]["X"].shape[0])
        X = state["X"]["X"][:n]
    return LayerStats(
        H=state["H"].H if "H" in state else None,  # capture.HessianState
        X=X,
        act_absmean=state["absmean"].mean if "absmean" in state else None,  # capture.MeanState
        act_absmax=state["absmax"] if "absmax" in state else None,  # a float32 [d] array
        fisher=fisher,
    )


def quantize_sequential(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Any,
    layer_fn: Callable[..., LayerResult],
    cfg: Any,
    *,
    needs: tuple[str, ...],
    true_sequential: bool = True,
    n_x_rows: int = 4096,
    extra_stats: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    on_block_done: Callable[[int], None] | None = None,
) -> QuantizedModel:
    """Quantize every block linear of ``params`` with ``layer_fn`` (see the module docstring).

    ``extra_stats`` maps full linear names (``blocks.3.mlp.up_proj``) to extra statistics
    computed outside the walk (e.g. SqueezeLLM's Fisher information: ``{"fisher": F}``).
    ``checkpoint_dir``: save each finished block there and resume from the finished ones.
    ``on_block_done(i)`` is called after block ``i`` is quantized (and saved)."""
    t0 = time.perf_counter()
    ckpt, done, report = checkpoint.resume(
        checkpoint_dir,
        params,
        repr(model_cfg),
        calib_tokens,
        repr(cfg),
        _qualname(layer_fn),
        needs,
        true_sequential,
        n_x_rows,
        extra_stats or {},
        seed,
        batch_size,
    )
    accs = accumulators_for(needs, n_x_rows)
    groups = TRUE_SEQUENTIAL if true_sequential else (tuple(n for g in TRUE_SEQUENTIAL for n in g),)
    extra = extra_stats or {}

    def on_block(i: int, bp: Any, calib: capture.BlockCalibration | None) -> Any:
        first = len(report)
        for gi, group in enumerate(groups):
            if gi > 0 and accs:
                if gi == 1:  # q/k/v are final: the attention output is too (see module doc)
                    calib.cache_attention(bp)
                if gi == 3:  # o and gate/up are final: so is down's input
                    calib.cache_down_input(bp)
                calib.recapture(bp, group)
            for rel in group:
                name = f"blocks.{i}.{rel}"
                W = get_param(bp, rel)
                stats = layer_stats(calib[rel] if accs else {}, extra.get(name, {}).get("fisher"))
                key = jax.random.fold_in(jax.random.key(seed), len(report))
                t = time.perf_counter()
                res = layer_fn(jnp.asarray(W, jnp.float32), stats, cfg, key=key)
                jax.block_until_ready(jax.tree_util.tree_leaves(res.weight))
                report.append(
                    {
                        "name": name,
                        "bits": weight_bits(res.weight),
                        "seconds": time.perf_counter() - t,
                    }
                    | {k: _scalar(v) for k, v in res.info.items() if _is_scalar(v)}
                )
                bp = set_param(bp, rel, res.weight)
        if ckpt is not None:
            ckpt.save(i, bp, report[first:])
        if on_block_done is not None:
            on_block_done(i)
        return bp

    if accs:
        new_params = capture.sequential(
            params,
            model_cfg,
            calib_tokens,
            on_block,
            accumulators=accs,
            names=groups[0],  # later groups are captured after the earlier ones
            batch_size=batch_size,
            progress=progress,
            done_blocks=done,
        )
    else:  # data-free (RTN): no statistics, so no calibration forward either
        blocks = list(params["blocks"])
        for i in range(model_cfg.n_layers):
            blocks[i] = done[i] if i in done else on_block(i, blocks[i], None)
        new_params = {**params, "blocks": blocks}
    return quantized_model(params, new_params, report, t0)


def quantized_model(
    params: Any, new_params: Any, report: list[dict[str, Any]], t0: float
) -> QuantizedModel:
    """The walk's result: ``new_params``, the per-linear ``report`` (each row's ``bits`` per
    weight), the seconds since ``t0`` and the bits per weight over all quantized linears,
    weighted by their sizes in ``params``."""
    sizes = {r["name"]: int(np.prod(get_param(params, r["name"]).shape)) for r in report}
    bpw = sum(r["bits"] * sizes[r["name"]] for r in report) / max(sum(sizes.values()), 1)
    return QuantizedModel(new_params, report, time.perf_counter() - t0, bpw)


def _is_scalar(v: Any) -> bool:
    return v is not None and np.ndim(v) == 0


def _scalar(v: Any) -> Any:
    """A report value: Python scalars as they are, 0-d arrays (a jitted core's loss) as float."""
    return v if isinstance(v, str | bool | int | float) else float(v)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
