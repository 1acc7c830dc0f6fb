"""The one block-walk driver, and the per-linear walk built on it.

:func:`walk_blocks` drives every block-wise method (the per-linear walk below for GPTQ / RTN /
SpQR / SqueezeLLM, AWQ, OmniQuant). A method supplies only a *block step*
``step(i, block_params, calib) -> (quantized block params, report rows)``; the driver owns the
rest: the calibration forward (``harness.capture.sequential``, or none for a data-free method),
checkpoint resume (``methods.checkpoint.resume`` / ``ckpt.save``), the report, the timing,
``on_block_done``, and which block feeds the next one (the quantized block, or the
full-precision one: AWQ's ``propagate="fp"``).

:func:`quantize_sequential` is the per-linear walk: inside a block the linears are quantized in
the adapter table's group order (``harness.structure``; GPTQ's "true sequential" order: q/k/v,
then o, then gate/up, then down — each group's inputs re-captured after the earlier groups were
quantized), and the *quantized* block's outputs feed the next block. Only the first group's
inputs are captured up front; once a group the table marks with ``then_cache`` is final, its
cache is computed once and reused (``BlockCalibration.cache``): after q/k/v the attention output
(``cache_attention``), after gate/up down_proj's input (``cache_down_input``) — the same numbers
as GPTQ's reference, which re-runs the whole block per group, with one attention pass per block
instead of five. Each linear is handed to ``layer_fn(W, LayerStats, cfg, key=...)`` (a method's
pure core) and its float weight leaf is replaced by the returned quantized leaf.

Resumable runs: with ``checkpoint_dir`` every finished block is saved (packed codes, orbax;
``methods.checkpoint``); a rerun with the same inputs loads the finished blocks, only runs them
forward (``harness.capture.sequential(done_blocks=...)``) and quantizes the rest.

A data-free core (``needs=()``, RTN) skips the calibration forward altogether: its blocks are
quantized in order without running the model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness import capture, structure
from harness import stats as statistics
from harness.model import ModelConfig, get_param, set_param
from methods import checkpoint
from methods.base import LayerResult, LayerStats, QuantizedModel
from methods.hooks import act_hooks
from numerics.sparse import weight_bits

BlockStep = Callable[[int, Any, "capture.BlockCalibration | None"], tuple[Any, list[dict]]]
_PROPAGATE = ("quantized", "fp")


def walk_blocks(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Any,
    step: BlockStep,
    *,
    run_parts: tuple[Any, ...],
    accumulators: Mapping[str, capture.Accumulator] | None,
    names: tuple[str, ...] | None = None,
    sites: Mapping[str, Mapping[str, capture.Accumulator]] | None = None,
    propagate: str = "quantized",
    batch_size: int = 8,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    on_block_done: Callable[[int], None] | None = None,
) -> QuantizedModel:
    """Quantize ``params`` block by block with ``step`` (see the module docstring).

    ``step(i, block_params, calib)`` gets block ``i``'s float params and its
    ``harness.capture.BlockCalibration`` (statistics of the linears ``names``, default all,
    under ``accumulators``; ``calib.inputs`` are the block's input hidden states) and returns
    ``(quantized block params, report rows)``, one row per linear with at least ``name`` and
    ``bits``. ``accumulators=None``: data-free, no calibration forward at all (``calib`` is
    None); ``{}``: the forward runs (``calib.inputs``) but collects no statistics. ``sites``:
    statistics of the keys / values / block output (``harness.stats.plan``).

    ``propagate``: what the next block's inputs come from — ``"quantized"`` (the returned
    block) or ``"fp"`` (the block's own float params). ``run_parts``: the method's part of the
    run's identity (its config, its name, …); with ``params``, the model config, the tokens and
    ``batch_size`` it names the checkpoints in ``checkpoint_dir`` (``methods.checkpoint``),
    from which a rerun resumes after the last saved block. ``on_block_done(i)`` is called once
    block ``i`` is saved. A row's ``seconds``: the step's own measurement where it gives one,
    else an even share of the step's wall time; ``QuantizedModel.seconds`` is the whole run."""
    if propagate not in _PROPAGATE:
        raise ValueError(f"propagate must be one of {_PROPAGATE}, got {propagate!r}")
    t0 = time.perf_counter()
    ckpt, done, report = checkpoint.resume(
        checkpoint_dir, params, repr(model_cfg), calib_tokens, *run_parts, batch_size
    )
    quantized = dict(done)

    def forward(i: int, bq: Any) -> Any:
        return params["blocks"][i] if propagate == "fp" else bq

    def on_block(i: int, bp: Any, calib: capture.BlockCalibration | None) -> Any:
        t = time.perf_counter()
        bq, rows = step(i, bp, calib)
        jax.block_until_ready(jax.tree_util.tree_leaves(bq))
        share = (time.perf_counter() - t) / max(len(rows), 1)
        rows = [r if "seconds" in r else {**r, "seconds": share} for r in rows]
        quantized[i] = bq
        report.extend(rows)
        if ckpt is not None:
            ckpt.save(i, bq, rows)
        if on_block_done is not None:
            on_block_done(i)
        return forward(i, bq)

    if accumulators is None:  # data-free: no statistics, so no calibration forward either
        for i in range(model_cfg.n_layers):
            if i not in done:
                on_block(i, params["blocks"][i], None)
    else:
        capture.sequential(
            params,
            model_cfg,
            calib_tokens,
            on_block,
            accumulators=accumulators,
            names=names,
            sites=sites,
            batch_size=batch_size,
            progress=progress,
            done_blocks={i: forward(i, bq) for i, bq in done.items()},
        )
    blocks = [quantized[i] for i in range(model_cfg.n_layers)]
    return quantized_model(params, {**params, "blocks": blocks}, report, t0)


def layer_stats(state: Mapping[str, Any], **extra: Any) -> LayerStats:
    """``LayerStats`` from one linear's accumulator states (keyed by ``harness.stats`` names)
    and ``extra`` statistics given by value (``fisher=F``)."""
    return LayerStats(**statistics.values(dict(state)), **extra)


def quantize_sequential(
    params: Any,
    model_cfg: ModelConfig,
    calib_tokens: Any,
    layer_fn: Callable[..., LayerResult],
    cfg: Any,
    *,
    needs: tuple[str, ...],
    true_sequential: bool = True,
    extra_stats: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    on_block_done: Callable[[int], None] | None = None,
) -> QuantizedModel:
    """Quantize every block linear of ``params`` with ``layer_fn`` (see the module docstring).

    ``extra_stats`` maps full linear names (``blocks.3.mlp.up_proj``) to extra statistics
    computed outside the walk, by ``harness.stats`` name (SqueezeLLM's Fisher information
    ``{"fisher": F}``, SmoothQuant's smoothed ``{"act_absmax": m}``). A result whose cores
    returned activation quantizers gets them as its hooks and ``cfg.act_bits`` as its bits per
    activation. ``checkpoint_dir``: save each finished block there and resume from the finished
    ones. ``on_block_done(i)`` is called after block ``i`` is quantized (and saved)."""
    accs, _ = statistics.plan(tuple(needs))
    act: dict[str, Any] = {}
    table = structure.groups(model_cfg.family)
    if true_sequential:
        order = [(g.names, g.then_cache) for g in table]
    else:  # every linear from the float block's inputs
        order = [(structure.block_linears(model_cfg.family), None)]
    per_block = sum(len(names) for names, _ in order)
    extra = extra_stats or {}

    def step(i: int, bp: Any, calib: capture.BlockCalibration | None) -> tuple[Any, list[dict]]:
        rows: list[dict[str, Any]] = []
        for gi, (names, _) in enumerate(order):
            if gi > 0 and accs:
                cache = order[gi - 1][1]
                if cache is not None:  # the earlier groups are final: so is this cache
                    calib.cache(cache, bp)
                calib.recapture(bp, names)
            for rel in names:
                name = f"blocks.{i}.{rel}"
                W = get_param(bp, rel)
                stats = layer_stats(calib[rel] if accs else {}, **extra.get(name, {}))
                # the linear's place in the whole walk: resumed blocks hold per_block rows each
                key = jax.random.fold_in(jax.random.key(seed), i * per_block + len(rows))
                t = time.perf_counter()
                res = layer_fn(jnp.asarray(W, jnp.float32), stats, cfg, key=key)
                jax.block_until_ready(jax.tree_util.tree_leaves(res.weight))
                rows.append(
                    {
                        "name": name,
                        "bits": weight_bits(res.weight),
                        "seconds": time.perf_counter() - t,  # the core alone
                    }
                    | {k: _scalar(v) for k, v in res.info.items() if _is_scalar(v)}
                )
                bp = set_param(bp, rel, res.weight)
                if res.act is not None:
                    act[name] = res.act
        return bp, rows

    result = walk_blocks(
        params,
        model_cfg,
        calib_tokens,
        step,
        run_parts=(
            repr(cfg),
            _qualname(layer_fn),
            needs,
            true_sequential,
            extra,
            seed,
        ),
        accumulators=accs if accs else None,
        names=order[0][0],  # later groups are captured after the earlier ones
        batch_size=batch_size,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        on_block_done=on_block_done,
    )
    if act and len(act) != len(result.report):
        raise ValueError(
            "resumed blocks carry no activation quantizers (checkpoints hold weights only): "
            "a weight+activation method cannot resume from checkpoint_dir; start a new one"
        )
    if not act:
        return result
    bpa = min(float(getattr(cfg, "act_bits", 16)), 16.0)
    return dataclasses.replace(result, hooks=act_hooks(act), bits_per_activation=bpa)


def quantized_model(
    params: Any, new_params: Any, report: list[dict[str, Any]], t0: float, **extra: Any
) -> QuantizedModel:
    """The walk's result: ``new_params``, the per-linear ``report`` (each row's ``bits`` per
    weight), the seconds since ``t0`` and the bits per weight over all quantized linears,
    weighted by their sizes in ``params``; ``extra``: the result's other fields (``hooks``,
    ``bits_per_activation``, ``kv_bits``)."""
    sizes = {r["name"]: int(np.prod(get_param(params, r["name"]).shape)) for r in report}
    bpw = sum(r["bits"] * sizes[r["name"]] for r in report) / max(sum(sizes.values()), 1)
    return QuantizedModel(new_params, report, time.perf_counter() - t0, bpw, **extra)


def _is_scalar(v: Any) -> bool:
    return v is not None and np.ndim(v) == 0


def _scalar(v: Any) -> Any:
    """A report value: Python scalars as they are, 0-d arrays (a jitted core's loss) as float."""
    return v if isinstance(v, str | bool | int | float) else float(v)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
