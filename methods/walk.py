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

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harness import capture
from harness import stats as statistics
from harness.model import ModelConfig, get_param, set_param
from methods import checkpoint
from methods.base import LayerResult, LayerStats, QuantizedModel
from methods.hooks import act_hooks
from numerics.sparse import weight_bits

TRUE_SEQUENTIAL: tuple[tuple[str, ...], ...] = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def layer_stats(state: Mapping[str, Any], fisher: Any = None) -> LayerStats:
    """``LayerStats`` from one linear's accumulator states (keyed by ``harness.stats`` names)."""
    return LayerStats(**statistics.values(dict(state)), fisher=fisher)


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
        extra_stats or {},
        seed,
        batch_size,
    )
    accs, _ = statistics.plan(tuple(needs))
    act: dict[str, Any] = {}
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
                if res.act is not None:
                    act[name] = res.act
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
    return quantized_model(params, new_params, report, t0, hooks=act_hooks(act))


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
