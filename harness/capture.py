"""Sequential, block-by-block calibration capture with streaming per-linear statistics.

GPTQ (arXiv:2210.17323, §4 and App. "sequential") quantizes a model one block at a time: the
calibration batch is pushed through block ``i``, the inputs ``X`` of each linear are reduced to
statistics (its Hessian ``H = 2XXᵀ``), the block is quantized, and the *quantized* block's outputs
feed block ``i + 1``. Only one block's activations live at a time, and the statistics are
accumulated over micro-batches, so no layer's full activation matrix is ever held.

* :class:`Accumulator` — an optax-style ``init / update`` pair over the inputs of one linear:
  :func:`hessian` (``H = 2/n Σ x xᵀ`` over the ``n`` token rows seen), :func:`absmax`
  (per-channel ``max |x|``: SmoothQuant arXiv:2211.10438 eq. 4) and :func:`absmean` (per-channel
  mean ``|x|``: AWQ arXiv:2306.00978 §3.2). Methods may pass their own. Build accumulators once
  and reuse them: the jitted capture step is cached on their identity.
* :func:`sequential` — the driver: ``on_block(i, block_params, calib) -> new_block_params``.
  ``calib`` is a :class:`BlockCalibration`: a mapping from block-relative linear names
  (``"attn.q_proj"``) to ``{stat_name: state}`` (default ``{"H": HessianState}``, so
  ``calib["attn.q_proj"]["H"].H``), plus ``recapture(block_params, names)`` to
  recompute statistics after changing part of the block (GPTQ's "true sequential" order:
  quantize q/k/v, recapture o_proj's input, …), ``inputs`` (the block's input hidden states,
  for methods that search scales by running the block, e.g. AWQ; calibration segments are
  whole sequences, so positions are always ``0 … t-1``),
  ``outputs(block_params)`` and ``cache_attention(block_params)`` (once q/k/v are final, compute
  the attention output once and reuse it in later recaptures and outputs); likewise
  ``cache_down_input``; ``cache(kind, block_params)`` is either, by the name the adapter table
  gives (``LinearGroup.then_cache``).
* :func:`shared_layer` — the block whose compiled step serves block ``i`` (one compilation per
  layer type).

Inputs are recorded at the seam *before* any ``act_quant`` hook. Linears that share an input
(the adapter table's groups, ``harness.structure``: q/k/v, gate/up) share one accumulator
state; the table also gives each input's width and which inputs a cache makes unavailable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from harness import structure
from harness.layers import NO_HOOKS, Hooks
from harness.model import BLOCK_LINEARS, KV_SITES, OUTPUT_SITE, Model, ModelConfig


class Accumulator(NamedTuple):
    """Streaming statistic of a linear's inputs ``x [..., d_in]`` (optax-style pair)."""

    init: Callable[[int], Any]  # d_in -> state
    update: Callable[[Any, Array], Any]  # (state, x) -> state


def _rows(x: Array) -> Array:
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


class HessianState(NamedTuple):
    H: Float[Array, "d d"]  # 2/n Σ x xᵀ over the rows seen so far
    n: Int[Array, ""]  # rows seen


class MeanState(NamedTuple):
    mean: Float[Array, " d"]  # running per-channel mean
    n: Int[Array, ""]  # rows seen


def _running(old: Array, n_old: Array, total: Array, m: int) -> tuple[Array, Array]:
    """Running mean update: ``old`` over ``n_old`` rows, plus ``total`` summed over ``m`` rows."""
    n = n_old + m
    keep = n_old.astype(jnp.float32) / n.astype(jnp.float32)
    return old * keep + total / n.astype(jnp.float32), n


def hessian() -> Accumulator:
    """``H = 2/n Σ_rows x xᵀ`` (GPTQ's ``H = 2XXᵀ``, arXiv:2210.17323 §3), as a running mean.

    GPTQ's reference code divides by the number of *sequences*; we divide by token rows ``n``.
    The scale does not change GPTQ (its damping is relative to ``mean(diag H)``).
    State: :class:`HessianState` (``.H`` float32 ``[d, d]``, ``.n`` rows).
    """

    def init(d: int):
        return HessianState(jnp.zeros((d, d), jnp.float32), jnp.zeros((), jnp.int32))

    def update(s, x):
        X = _rows(x)
        if X.shape[0] == 0:
            return s
        XtX = jnp.einsum("ni,nj->ij", X, X, precision=jax.lax.Precision.HIGHEST)
        return HessianState(*_running(s.H, s.n, 2.0 * XtX, X.shape[0]))

    return Accumulator(init, update)


def absmax() -> Accumulator:
    """Per-input-channel ``max |x|``. State: float32 ``[d]``."""

    def init(d: int):
        return jnp.zeros((d,), jnp.float32)

    def update(s, x):
        return jnp.maximum(s, jnp.max(jnp.abs(_rows(x)), axis=0, initial=0.0))

    return Accumulator(init, update)


def absmean() -> Accumulator:
    """Per-input-channel running mean of ``|x|``. State: :class:`MeanState`."""

    def init(d: int):
        return MeanState(jnp.zeros((d,), jnp.float32), jnp.zeros((), jnp.int32))

    def update(s, x):
        X = jnp.abs(_rows(x))
        if X.shape[0] == 0:
            return s
        return MeanState(*_running(s.mean, s.n, jnp.sum(X, axis=0), X.shape[0]))

    return Accumulator(init, update)


DEFAULT_ACCUMULATORS: dict[str, Accumulator] = {"H": hessian()}


def _leaders(cfg: ModelConfig, names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """For each input group touched by ``names``: first wanted member -> wanted members."""
    out = {}
    for g in structure.groups(cfg.family):
        members = tuple(n for n in g.names if n in names)
        if members:
            out[members[0]] = members
    return out


def shared_layer(model: Model, i: int) -> int:
    """A block index whose compiled step can serve block ``i``: without hooks a block depends on
    its index only through its layer type (window, RoPE base), so blocks of one type share one
    compilation; hooks receive layer names and indices, so then every block is its own."""
    if model.hooks != NO_HOOKS:
        return i
    kind = model.cfg.layer_type(i)
    return next(j for j in range(model.cfg.n_layers) if model.cfg.layer_type(j) == kind)


@functools.lru_cache(maxsize=256)
def _stats_step(model: Model, i: int, spec: tuple[tuple[str, tuple[tuple[str, Accumulator], ...]]]):
    """One jitted micro-batch step: ``spec`` = ((captured name, ((stat, accumulator), …)), …)."""

    def step(states, block_params, h, mix, down_in):
        _, ins = model.apply_block(block_params, i, h, capture=True, mix=mix, down_in=down_in)
        return {ld: {k: acc.update(states[ld][k], ins[ld]) for k, acc in accs} for ld, accs in spec}

    return jax.jit(step)


@functools.lru_cache(maxsize=256)
def _block_fn(model: Model, i: int):
    return jax.jit(
        lambda bp, h, mix, down_in: model.apply_block(bp, i, h, mix=mix, down_in=down_in)
    )


@functools.lru_cache(maxsize=256)
def _input_fn(model: Model, i: int, name: str):
    """The input of linear ``name`` alone (XLA drops what comes after it)."""
    return jax.jit(lambda bp, h, mix: model.apply_block(bp, i, h, capture=True, mix=mix)[1][name])


def _part(a: Array | None, sl: slice) -> Array | None:
    return None if a is None else a[sl]


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for s in range(0, n, batch_size):
        yield slice(s, min(s + batch_size, n))


def block_stats(
    model: Model,
    i: int,
    block_params: Any,
    inputs: Float[Array, "n t d"],
    accumulators: Mapping[str, Accumulator],
    *,
    names: tuple[str, ...] | None = None,
    sites: Mapping[str, Mapping[str, Accumulator]] | None = None,
    batch_size: int = 8,
    mix: Float[Array, "n t e"] | None = None,
    down_in: Float[Array, "n t f"] | None = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of the inputs of block ``i``'s linears ``names`` (block-relative; default all),
    streamed over micro-batches of ``batch_size`` sequences. ``names`` may also hold capture
    sites (``KV_SITES``, ``OUTPUT_SITE``): those get the accumulators ``sites[site]`` instead of
    ``accumulators``. ``mix``: cached attention output (see
    :meth:`BlockCalibration.cache_attention`); q/k/v and key/value statistics are then
    unavailable. ``down_in``: cached down_proj input (:meth:`BlockCalibration.cache_down_input`);
    likewise gate/up's."""
    names = BLOCK_LINEARS if names is None else tuple(names)
    sites = sites or {}
    unknown = set(names) - set(BLOCK_LINEARS) - set(KV_SITES) - {OUTPUT_SITE}
    if unknown:
        raise ValueError(
            f"unknown linear names or sites {sorted(unknown)}; expected some of "
            f"{BLOCK_LINEARS + KV_SITES + (OUTPUT_SITE,)}"
        )
    missing = [n for n in names if n not in BLOCK_LINEARS and not sites.get(n)]
    if missing:
        raise ValueError(f"no accumulators given for the capture sites {missing}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for cache, value in (("attention", mix), ("down_input", down_in)):
        skipped = structure.not_recomputed(model.cfg.family, cache) + KV_SITES
        if value is not None and set(names) & set(skipped):
            raise ValueError(
                f"the {cache} cache is set, so the inputs of {skipped} are not recomputed; "
                "capture them before it is cached"
            )
    groups = _leaders(model.cfg, names)
    groups |= {n: (n,) for n in names if n not in BLOCK_LINEARS}
    linear = tuple(sorted(accumulators.items()))
    spec = tuple(
        (ld, linear if ld in BLOCK_LINEARS else tuple(sorted(sites[ld].items()))) for ld in groups
    )
    spec = tuple((ld, accs) for ld, accs in spec if accs)
    if not spec:
        return {}
    dims = structure.capture_dims(model.cfg)
    states = {ld: {k: acc.init(dims[ld]) for k, acc in accs} for ld, accs in spec}
    step = _stats_step(model, shared_layer(model, i), spec)
    for sl in _batches(inputs.shape[0], batch_size):
        states = step(states, block_params, inputs[sl], _part(mix, sl), _part(down_in, sl))
    return {n: states[ld] for ld, members in groups.items() if ld in states for n in members}


@dataclass
class BlockCalibration(Mapping):
    """What ``on_block`` receives: statistics of block ``layer``'s linears (a mapping
    ``"attn.q_proj" -> {stat: state}``), the block's inputs, and helpers to re-run it."""

    model: Model
    layer: int
    inputs: Float[Array, "n t d"]  # hidden states entering the block (after previous blocks)
    accumulators: Mapping[str, Accumulator]
    batch_size: int
    sites: Mapping[str, Mapping[str, Accumulator]] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    mix: Float[Array, "n t e"] | None = None  # cached attention output (cache_attention)
    down_in: Float[Array, "n t f"] | None = None  # cached down_proj input (cache_down_input)

    def __getitem__(self, name: str) -> dict[str, Any]:
        try:
            return self.stats[name]
        except KeyError:
            raise KeyError(f"no statistics captured for {name!r} in block {self.layer}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def recapture(
        self, block_params: Any, names: tuple[str, ...] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Recompute (and store) the statistics of ``names`` with ``block_params`` — e.g. the
        input of o_proj after q/k/v were quantized (GPTQ "true sequential")."""
        new = block_stats(
            self.model,
            self.layer,
            block_params,
            self.inputs,
            self.accumulators,
            names=names,
            sites=self.sites,
            batch_size=self.batch_size,
            mix=self.mix,
            down_in=self.down_in,
        )
        self.stats.update(new)
        return new

    def cache_attention(self, block_params: Any) -> None:
        """Compute the attention heads' output (o_proj's input) once with ``block_params``'s
        q/k/v and norms, and reuse it in every later :meth:`recapture` / :meth:`outputs`.

        GPTQ's true-sequential order quantizes q/k/v first and never touches them again, so the
        attention — the costly part of the block at long sequence lengths — need not be
        recomputed for o_proj, gate/up, down and the block output (the reference recomputes the
        whole block for each). Valid only while q/k/v and the attention norms stay as given.
        """
        self.down_in = None  # computed from the old attention output
        name = structure.cache_input(self.model.cfg.family, "attention")
        self.mix = self._input_of(name, block_params, None)

    def cache_down_input(self, block_params: Any) -> None:
        """Compute down_proj's input ``act(gate(x))·up(x)`` once with ``block_params``'s o_proj,
        gate/up and norms (after :meth:`cache_attention`), and reuse it in every later
        :meth:`recapture` / :meth:`outputs`: the true-sequential order's last group then needs
        no second gate/up pass for the block output. Holds ``n × t × d_ff`` floats."""
        if self.mix is None:
            raise ValueError("cache_attention first: down_proj's input is computed from it")
        name = structure.cache_input(self.model.cfg.family, "down_input")
        self.down_in = self._input_of(name, block_params, self.mix)

    def cache(self, kind: str, block_params: Any) -> None:
        """The cache named by the adapter table (``LinearGroup.then_cache``): ``"attention"``
        (:meth:`cache_attention`) or ``"down_input"`` (:meth:`cache_down_input`)."""
        caches = {"attention": self.cache_attention, "down_input": self.cache_down_input}
        if kind not in caches:
            raise ValueError(f"unknown cache {kind!r}; expected one of {structure.CACHES}")
        caches[kind](block_params)

    def _input_of(self, name: str, block_params: Any, mix: Array | None) -> Array:
        f = _input_fn(self.model, shared_layer(self.model, self.layer), name)
        parts = [
            f(block_params, self.inputs[sl], _part(mix, sl))
            for sl in _batches(self.inputs.shape[0], self.batch_size)
        ]
        return jnp.concatenate(parts, axis=0)

    def outputs(self, block_params: Any) -> Float[Array, "n t d"]:
        """Block outputs for all calibration inputs, with ``block_params``."""
        f = _block_fn(self.model, shared_layer(self.model, self.layer))
        parts = [
            f(block_params, self.inputs[sl], _part(self.mix, sl), _part(self.down_in, sl))
            for sl in _batches(self.inputs.shape[0], self.batch_size)
        ]
        return jnp.concatenate(parts, axis=0)


def sequential(
    params: Any,
    cfg: ModelConfig,
    calib_tokens: Int[Array, "n t"],
    on_block: Callable[[int, Any, BlockCalibration], Any],
    *,
    accumulators: Mapping[str, Accumulator] | None = None,
    names: tuple[str, ...] | None = None,
    sites: Mapping[str, Mapping[str, Accumulator]] | None = None,
    hooks: Hooks = NO_HOOKS,
    batch_size: int = 8,
    progress: bool = False,
    done_blocks: Mapping[int, Any] | None = None,
) -> Any:
    """Run calibration block by block; return params with every block replaced by ``on_block``'s.

    ``calib_tokens`` ``[n, t]`` (e.g. n seeded C4 segments of length t) are embedded once; for
    each block ``i``: statistics of the inputs of its linears ``names`` (default all) are
    accumulated over micro-batches, ``on_block(i, block_params, calib)`` returns the new block
    params (e.g. quantized; it may call ``calib.recapture``), and the NEW block's outputs become
    the next block's inputs.

    ``done_blocks`` (resuming an interrupted run): ``{i: new block params}`` already computed;
    those blocks are not captured nor passed to ``on_block`` — only run forward, so the next
    block sees the same inputs as in an uninterrupted run.

    ``sites`` (``{site: {stat: Accumulator}}``, e.g. from ``harness.stats.plan``): statistics of
    the keys / values / block output (``KV_SITES``, ``OUTPUT_SITE``), captured with the block's
    params as ``on_block`` receives them, beside the linear inputs.
    """
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.size == 0:
        raise ValueError(
            "calib_tokens must be a non-empty integer array [n, t], "
            f"got {tokens.dtype}{tokens.shape}"
        )
    accumulators = DEFAULT_ACCUMULATORS if accumulators is None else accumulators
    sites = dict(sites or {})
    model = Model(cfg, hooks)
    embed = jax.jit(model.embed)
    h = jnp.concatenate(
        [embed(params, tokens[sl]) for sl in _batches(tokens.shape[0], batch_size)], axis=0
    )
    blocks = list(params["blocks"])
    done_blocks = done_blocks or {}
    for i in tqdm(range(cfg.n_layers), desc="calibration", disable=not progress):
        calib = BlockCalibration(model, i, h, accumulators, batch_size, sites)
        if i in done_blocks:
            blocks[i] = done_blocks[i]
            h = calib.outputs(blocks[i])
            continue
        calib.recapture(
            blocks[i], (BLOCK_LINEARS if names is None else tuple(names)) + tuple(sites)
        )
        new = on_block(i, blocks[i], calib)
        if new is None:
            raise TypeError(f"on_block returned None for block {i}; return the (new) block params")
        h = calib.outputs(new)
        blocks[i] = new
    return {**params, "blocks": blocks}
