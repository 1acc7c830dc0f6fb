"""AWQ model walk (arXiv 2306.00978; mit-han-lab/llm-awq ``pre_quant.run_awq``).

Block by block (``harness.capture.sequential``), following the repo's LLaMA branch:

1. the inputs of every linear of the full-precision block are captured once;
2. for each group of linears sharing an input (the adapter table, ``harness.structure``: q/k/v,
   o, gate/up, down) one scale ``s`` is searched (``core.search_alpha``) on the output of the
   module the repo inspects (``LinearGroup.inspect``, the repo's ``module2inspect``): the whole
   attention for q/k/v, the whole MLP for gate/up, the linear itself for o and down — all
   searches on the original block;
3. the scales are folded (``harness.structure.fold_scale``): the group's weight columns ``×= s``
   and the preceding RMSNorm weight ``/= s`` (q/k/v, gate/up) or the preceding linear's rows
   ``/= s`` (v_proj rows for o_proj, up_proj rows for down_proj). With grouped-query attention
   v_proj has fewer rows than o_proj has inputs, so o_proj is not scaled
   (``harness.structure.can_fold``; the repo's ``v_proj.weight.shape == o_proj.weight.shape``
   test, its PR #67);
4. every linear but those the table marks ``no_clip`` — q/k (repo: "due to qk bmm, it is hard
   to clip precisely") — gets the clipping search on its scaled inputs ``x / s``; then all
   seven are quantized (min-max, asym INT).

The next block's inputs are the *full-precision* block's outputs (``propagate="fp"``, as the
repo, which computes them before scaling) or the quantized block's (``"quantized"``). The walk
itself (calibration forward, resume from ``checkpoint_dir``, report, timing) is
``methods.walk.walk_blocks``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from harness import capture, structure
from harness import stats as statistics
from harness.layers import NO_HOOKS
from harness.model import MLP, Attention, Model, ModelConfig, get_param, set_param
from methods.awq import core
from methods.awq.core import AWQConfig, ScaledQArray, quantize_layer
from methods.base import Method, QuantizedModel, group_view, register
from methods.walk import layer_stats, walk_blocks
from numerics.quantize import quantize
from numerics.sparse import weight_bits

__all__ = [
    "AWQConfig",
    "ScaledQArray",
    "quantize_layer",
    "quantize_model",
    "search_block_scales",
    "awq_block",
]


def _apply(kind: str, cfg: ModelConfig, layer: int, sub: Any, x):
    """The output a scale search measures: ``kind`` is a ``LinearGroup.inspect`` module of the
    block, or ``"linear"`` (the group's one linear ``sub["w"]``)."""
    if kind == "attn":
        return Attention(cfg, layer, NO_HOOKS, "attn.").apply({"params": sub}, x, None)
    if kind == "mlp":
        return MLP(cfg, layer, NO_HOOKS, "mlp.").apply({"params": sub}, x)
    if kind == "linear":
        return jnp.matmul(x, sub["w"].T, precision=jax.lax.Precision.HIGHEST)
    raise ValueError(f"AWQ: no module {kind!r} to inspect; expected 'attn', 'mlp' or 'linear'")


@functools.partial(jax.jit, static_argnames=("kind", "cfg", "layer", "names", "qcfg", "n_grid"))
def _search_group(sub, s_X, xs, *, kind, cfg, layer, names, qcfg, n_grid):
    """Scale search on a module's output; ``xs`` [nb, bs, t, d] (whole, in-order sequences)."""

    def run(p):
        return jax.lax.map(lambda x: _apply(kind, cfg, layer, p, x), xs)

    y0 = run(sub)

    def loss(s):
        p = dict(sub) | {n: core.scaled_fake_quant(sub[n], s, qcfg) for n in names}
        return jnp.mean(jnp.square((run(p) - y0).astype(jnp.float32)))

    return core.search_alpha(loss, s_X, n_grid)


_clip_search = jax.jit(
    core.clip_search,
    static_argnums=2,
    static_argnames=("group_size", "ragged", "n_grid", "max_shrink"),
)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(model: Model, layer: int, bp, h):
    return model.apply_block(bp, layer, h, capture=True)[1]


def _batches(n: int, batch_size: int) -> int:
    """Largest divisor of ``n`` that is ≤ ``batch_size`` (so batches stack into one array)."""
    return max(b for b in range(1, min(batch_size, n) + 1) if n % b == 0)


def _inputs(model: Model, i: int, bp, h, batch_size: int) -> dict[str, Any]:
    """Every linear's inputs ``[n, t, d]`` in the block ``bp`` (captured in micro-batches)."""
    rep = capture.shared_layer(model, i)
    parts = [
        _capture(model, rep, bp, h[s : s + batch_size]) for s in range(0, h.shape[0], batch_size)
    ]
    return {k: jnp.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def search_block_scales(
    model: Model, i: int, bp, ins: dict, s_X: dict, cfg: AWQConfig, batch_size: int = 8
) -> dict[str, dict[str, Any]]:
    """One scale search per input group of block ``i`` (on the unmodified block ``bp``).

    Returns ``{first linear name: {"s", "alpha", "losses"}}``; groups that cannot be folded
    (grouped-query o_proj) are absent."""
    out = {}
    n = next(iter(ins.values())).shape[0]
    bs = _batches(n, batch_size)
    for group in structure.groups(model.cfg.family):
        if not structure.can_fold(bp, group):
            continue
        lead = group.names[0]
        kind = group.inspect or "linear"
        if group.inspect is None:
            if len(group.names) != 1:
                raise ValueError(f"no module to inspect for the group {group.names}")
            sub, names = {"w": get_param(bp, lead)}, ("w",)
        else:  # the members' names inside the inspected module
            sub = bp[kind]
            names = tuple(nm.removeprefix(kind + ".") for nm in group.names)
        x = ins[lead]
        xs = x.reshape((n // bs, bs) + x.shape[1:])
        s, alpha, losses = _search_group(
            sub,
            s_X[lead],
            xs,
            kind=kind,
            cfg=model.cfg,
            layer=capture.shared_layer(model, i),
            names=names,
            qcfg=cfg.quant_config(),
            n_grid=cfg.n_grid,
        )
        out[lead] = {"s": s, "alpha": alpha, "losses": losses}
    return out


def awq_block(
    model: Model, i: int, bp, calib: capture.BlockCalibration, cfg: AWQConfig, batch_size: int = 8
) -> tuple[Any, Any, list[dict[str, Any]]]:
    """AWQ on block ``i``: ``(scaled float block, quantized block, report rows)``."""
    groups = structure.groups(model.cfg.family)
    ins = _inputs(model, i, bp, calib.inputs, batch_size)
    s_X = {g.names[0]: layer_stats(calib[g.names[0]]).act_absmean for g in groups}
    found = search_block_scales(model, i, bp, ins, s_X, cfg, batch_size)
    bp_s = bp
    for g in groups:
        if g.names[0] in found:
            bp_s = structure.fold_scale(bp_s, g, found[g.names[0]]["s"])
    qcfg = cfg.quant_config()
    bp_q, rows = bp_s, []
    for g in groups:
        info = found.get(g.names[0])
        s = info["s"] if info is not None else None
        for name in g.names:
            W = get_param(bp_s, name)
            row: dict[str, Any] = {"name": f"blocks.{i}.{name}", "scaled": info is not None}
            if info is not None:
                row |= {
                    "alpha": float(info["alpha"]),
                    "loss": float(jnp.min(info["losses"])),
                    "loss_rtn": float(info["losses"][0]),
                }
            if cfg.clip and g.clips(name):
                X = ins[g.names[0]].reshape(-1, W.shape[1]).astype(jnp.float32)
                X = core.clip_rows(X, cfg.clip_n_tokens)
                if s is not None:
                    X = X / s[None, :]
                m = _clip_search(
                    W.astype(jnp.float32),
                    X,
                    qcfg,
                    group_size=cfg.group_size,
                    ragged=cfg.ragged,
                    n_grid=cfg.clip_grid,
                    max_shrink=cfg.clip_max_shrink,
                )
                Wg = group_view(W, cfg.group_size, ragged=cfg.ragged, who="AWQ")
                amax = jnp.max(jnp.abs(Wg), axis=-1)
                row["clip_ratio"] = float(jnp.mean(m / jnp.maximum(amax, 1e-30)))
                W = core.apply_clip(W, m, cfg.group_size)
            qa = quantize(W, qcfg)
            bp_q = set_param(bp_q, name, qa)
            row["bits"] = weight_bits(qa)
            rows.append(row)
    return bp_s, bp_q, rows


def quantize_model(
    params,
    model_cfg: ModelConfig,
    calib_tokens,
    cfg: AWQConfig,
    *,
    batch_size: int = 8,
    **walk: Any,
) -> QuantizedModel:
    """AWQ over every block (module docstring); returns params with QArray linears and the
    scales folded into the norms / preceding linears.

    ``walk`` goes to ``methods.walk.walk_blocks``: ``progress``, ``checkpoint_dir`` (save each
    finished block, resume after the last saved one), ``on_block_done(i)``."""
    model = Model(model_cfg)

    def step(i, bp, calib):
        _, bp_q, rows = awq_block(model, i, bp, calib, cfg, batch_size)
        return bp_q, rows

    return walk_blocks(
        params,
        model_cfg,
        calib_tokens,
        step,
        run_parts=(repr(cfg), "methods.awq"),
        accumulators=statistics.plan(("act_absmean",))[0],
        # "fp": the unmodified block, whose outputs the repo computes before scaling
        propagate=cfg.propagate,
        batch_size=batch_size,
        **walk,
    )


METHOD = register(
    Method(
        name="awq",
        config=AWQConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="2306.00978",
        needs=("X", "act_absmean"),
        beats_rtn=True,
    )
)
